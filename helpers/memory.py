"""Memory: what a model really holds, what a config implies, and what a release gives back.

Three figures, never confused:
- *reported*: ``model.get_memory_footprint()`` (parameters + buffers);
- *true*: reported + the bitsandbytes quantization constants it leaves out (4-bit absmax, its nested
  double-quantization state and code tables; 8-bit row scales ``SCB``), see ``true_footprint``;
- *estimated*: both of the above computed from a config alone, before anything is loaded.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers import claims
from helpers.environment import T4

SCHEMES = ("fp32", "bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4")
FLOAT_SCHEMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZED_SCHEMES = ("int8", "nf4", "nf4-dq", "fp4")
FOUR_BIT_SCHEMES = ("nf4", "nf4-dq", "fp4")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' default blocksize for weights
BNB_NESTED_BLOCKSIZE = 256  # blocksize of double quantization (absmax of absmax)
NF4_CODE_VALUES = 16  # the 4-bit lookup table each Linear4bit keeps
NESTED_CODE_VALUES = 256  # the 8-bit dynamic map used for double quantization
ROTARY_BUFFERS = 2  # inv_freq and original_inv_freq, float32, head_dim / 2 each


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown scheme {scheme!r}. Choose one of: {', '.join(SCHEMES)}.")
    return scheme


def _config_get(config, key: str):
    return config[key] if isinstance(config, dict) else getattr(config, key, None)


def head_dim_of(config) -> int:
    head_dim = _config_get(config, "head_dim")
    return int(head_dim) if head_dim else _config_get(config, "hidden_size") // _config_get(config, "num_attention_heads")


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear in one decoder layer, read from a Llama config.

    Grouped-query attention shows here: k_proj and v_proj have num_key_value_heads * head_dim outputs.
    """
    hidden = _config_get(config, "hidden_size")
    intermediate = _config_get(config, "intermediate_size")
    heads = _config_get(config, "num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads") or heads
    head_dim = head_dim_of(config)
    if not all(isinstance(v, int) and v > 0 for v in (hidden, intermediate, heads, kv_heads, head_dim)):
        raise ValueError("config must give positive integer hidden_size, intermediate_size, num_attention_heads, "
                         "num_key_value_heads and head_dim (or hidden_size divisible by num_attention_heads)")
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


def parameter_counts_from_config(config) -> dict[str, int]:
    """Parameters by component, computed from the config alone (tied embeddings share one matrix)."""
    hidden = _config_get(config, "hidden_size")
    vocab = _config_get(config, "vocab_size")
    layers = _config_get(config, "num_hidden_layers")
    shapes = linear_shapes(config)
    attention = sum(o * i for name, (o, i) in shapes.items() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    mlp = sum(o * i for name, (o, i) in shapes.items() if name in ("gate_proj", "up_proj", "down_proj"))
    return {
        "embeddings": vocab * hidden,
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norms": (2 * layers + 1) * hidden,
        "lm_head": 0 if _config_get(config, "tie_word_embeddings") else vocab * hidden,
    }


@dataclass(frozen=True)
class FootprintEstimate:
    """Bytes a model built from ``config`` with ``scheme`` holds; all figures are exact integers."""

    scheme: str
    dtype: torch.dtype
    reported: int  # what model.get_memory_footprint() says
    true: int  # what true_footprint(model) says
    breakdown: dict[str, int] = field(default_factory=dict)  # true bytes by part

    @property
    def hidden_constants(self) -> int:
        """Bytes get_memory_footprint() leaves out."""
        return self.true - self.reported


def _quantized_linear_bytes(out_features: int, in_features: int, scheme: str) -> tuple[int, int]:
    """(reported, hidden) bytes of one bitsandbytes Linear: weight storage, then the constants outside it."""
    n = out_features * in_features
    if scheme == "int8":
        return n, out_features * 4  # int8 weight; float32 scale per output row (SCB)
    packed = (n + 1) // 2  # two 4-bit codes per byte
    blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)  # the remainder gets its own block
    code = NF4_CODE_VALUES * 4
    if scheme == "nf4-dq":
        nested_blocks = math.ceil(blocks / BNB_NESTED_BLOCKSIZE)
        hidden = blocks * 1 + nested_blocks * 4 + 4 + NESTED_CODE_VALUES * 4 + code  # absmax codes, scales, offset, maps
    else:
        hidden = blocks * 4 + code  # float32 absmax per block
    return packed, hidden


def estimate_footprint(config, scheme: str, dtype: torch.dtype | None = None) -> FootprintEstimate:
    """Footprint of a Llama-architecture model for ``scheme``, from its config alone, to the byte.

    ``dtype`` is the dtype of everything not quantized (embeddings, norms, lm_head, and for "fp32"/"bf16"/
    "fp16" every weight); it defaults to the scheme's own dtype, or float32 for quantized schemes. The rotary
    buffers stay float32 whatever the dtype. bitsandbytes quantizes the Linear layers of the decoder and
    leaves lm_head alone.
    """
    check_scheme(scheme)
    if scheme in FLOAT_SCHEMES:
        if dtype is not None and dtype != FLOAT_SCHEMES[scheme]:
            raise ValueError(f"scheme {scheme!r} stores everything in {FLOAT_SCHEMES[scheme]}; got dtype={dtype}. "
                             "Leave dtype out for float schemes.")
        dtype = FLOAT_SCHEMES[scheme]
    dtype = dtype or torch.float32
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype for the non-quantized modules, got {dtype}")
    element = torch.empty((), dtype=dtype).element_size()
    counts = parameter_counts_from_config(config)
    layers = _config_get(config, "num_hidden_layers")
    buffers = ROTARY_BUFFERS * (head_dim_of(config) // 2) * 4
    breakdown = {
        "embeddings + lm_head": (counts["embeddings"] + counts["lm_head"]) * element,
        "norms": counts["norms"] * element,
        "buffers": buffers,
    }
    if scheme in FLOAT_SCHEMES:
        breakdown["linear weights"] = (counts["attention"] + counts["mlp"]) * element
        reported = sum(breakdown.values())
        return FootprintEstimate(scheme, dtype, reported, reported, breakdown)
    weights = hidden = 0
    for out_features, in_features in linear_shapes(config).values():
        w, h = _quantized_linear_bytes(out_features, in_features, scheme)
        weights += layers * w
        hidden += layers * h
    breakdown["linear weights"] = weights
    reported = sum(breakdown.values())
    breakdown["quantization constants"] = hidden
    return FootprintEstimate(scheme, dtype, reported, reported + hidden, breakdown)


def _quantization_constants(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors a bitsandbytes Linear holds outside its parameters (absmax, nested state, code maps, SCB)."""
    tensors: list[torch.Tensor] = []
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:  # 4-bit: the state, then its nested state2 when double-quantized
        tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    for holder in (weight, getattr(module, "state", None)):  # 8-bit: scales live on the weight or the matmul state
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    return tensors


def true_footprint(model: torch.nn.Module) -> int:
    """Bytes held by the model: parameters + buffers + bitsandbytes quantization constants.

    Tensors sharing storage (tied embeddings, a scale kept in two places) are counted once.
    """
    seen: set[int] = set()
    total = 0

    def count(tensor: torch.Tensor, nbytes: int) -> None:
        nonlocal total
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)  # meta tensors have no address
        if key not in seen:
            seen.add(key)
            total += nbytes

    for tensor in list(model.parameters()) + list(model.buffers()):
        count(tensor, tensor.nelement() * tensor.element_size())
    for module in model.modules():
        for tensor in _quantization_constants(module):
            count(tensor, tensor.nelement() * tensor.element_size())
    return total


def meta_model(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the model of a config on the meta device: real shapes, no memory, no download.

    ``torch.device("meta")`` (unlike accelerate's ``init_empty_weights``) keeps lm_head tied to the embeddings
    for tied configs such as Llama-3.2-1B/3B; ``tie_weights()`` makes sure of it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config, (str, Path)):
        config = load_reference_config(config)
    elif isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"config must be a transformers config, a dict or a path to config.json, got {type(config)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def load_reference_config(path: str | Path):
    """A transformers config from a config.json file (e.g. data/reference/llama-3.1-8b.config.json)."""
    import json

    from transformers import AutoConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}: the reference configs live in data/reference/.")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(**values)


# --- snapshots and release -------------------------------------------------------------------------------

def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python still references (each storage once). Deterministic, unlike RSS."""
    gc.collect()  # unreachable cycles still holding tensors are garbage, not live: count them as freed
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching some torch objects during the scan raises deprecation notes
        for obj in gc.get_objects():
            storage = real_storage(obj)
            if storage is None or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def real_storage(obj: object) -> torch.UntypedStorage | None:
    """The storage that holds ``obj``'s bytes, or None for anything else.

    None for non-tensors and for tensors without bytes of their own: meta tensors, fake tensors (torch.compile's
    tracing), functional wrappers and other wrapper subclasses (nested jagged tensors, ...), whose storage raises
    or has no address. Anything that walks live objects goes through here, so such a tensor is skipped, never fatal.
    """
    if not isinstance(obj, torch.Tensor):
        return None
    try:
        if obj.device.type == "meta" or type(obj).__name__ == "FakeTensor" or torch._is_functional_tensor(obj):
            return None
        storage = obj.untyped_storage()
        address = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None
    return storage if address != 0 else None


def process_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc, or psutil elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import psutil

    return psutil.Process().memory_info().rss


@dataclass(frozen=True)
class MemorySnapshot:
    label: str
    tensors: int  # live tensor bytes (all devices)
    rss: int  # process resident memory
    gpu_allocated: int | None
    gpu_peak: int | None

    def line(self) -> str:
        text = f"{self.label:<22} tensors {self.tensors / 1e6:9.2f} MB | process RSS {self.rss / 1e9:6.2f} GB"
        if self.gpu_allocated is not None:
            text += f" | GPU allocated {self.gpu_allocated / 1e9:6.2f} GB, peak {self.gpu_peak / 1e9:6.2f} GB"
        return text


def snapshot(label: str = "now", show: bool = True) -> MemorySnapshot:
    """Measure memory now: live tensors, process RSS and, on a GPU, allocated and peak bytes."""
    gpu = torch.cuda.is_available()
    snap = MemorySnapshot(
        label=label,
        tensors=live_tensor_bytes(),  # collects garbage first, so RSS and the GPU figures below come after it
        rss=process_rss_bytes(),
        gpu_allocated=torch.cuda.memory_allocated() if gpu else None,
        gpu_peak=torch.cuda.max_memory_allocated() if gpu else None,
    )
    if show:
        print(snap.line())
    return snap


_BUILTIN_OP_NAMESPACES = ("aten", "prim", "prims")
_BACKEND_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}


class TensorPeak:
    """Count, while active, the bytes of every tensor storage PyTorch creates, and the most alive at once.

    ``with TensorPeak() as watched: ...`` then read ``watched.peak_bytes`` (the most bytes held at one moment by
    storages created inside the block), ``watched.peak_op`` (the operator whose result reached it first),
    ``watched.live_bytes`` (those still alive) and ``watched.op_counts`` (how
    many times each operator ran, e.g. ``bitsandbytes::dequantize_4bit``). Storages that existed before (the
    weights) and views of them are not counted: the figure is what the block adds on top.

    It watches operators as PyTorch dispatches them (a ``TorchDispatchMode``), not the allocator, so a CPU gives the
    same figures on every instruction set, where RSS would not. Custom operators (bitsandbytes') are followed
    inside, so the dense weight a 4-bit product rebuilds is counted. What it cannot see: scratch memory a C or CUDA
    kernel uses internally without returning it (cuBLAS workspaces, for example). On a GPU
    ``torch.cuda.max_memory_allocated`` is the allocator's own, complete, figure.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.peak_op: str | None = None  # the operator whose result first reached the peak
        self.live_bytes = 0
        self.op_counts: dict[str, int] = {}
        self._mode = None

    def __enter__(self) -> "TensorPeak":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        watcher, live = self, {}

        def storage_of(value):
            if not isinstance(value, torch.Tensor) or value.device.type == "meta":
                return None
            try:
                return value.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
                return None

        def freed(key: int, nbytes: int) -> None:
            if live.pop(key, None) is not None:
                watcher.live_bytes -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name
                watcher.op_counts[name] = watcher.op_counts.get(name, 0) + 1
                flat = tree_flatten((args, kwargs))[0]
                inputs = {id(s) for s in map(storage_of, flat) if s is not None}
                device = next((v.device.type for v in flat if isinstance(v, torch.Tensor)), "cpu")
                if func.namespace not in _BUILTIN_OP_NAMESPACES and device in _BACKEND_KEYS:
                    # a custom operator (bitsandbytes' dequantization): run its kernel with the watch still on,
                    # so that the tensors it creates inside (a whole dense weight) are seen too
                    with self:
                        out = func.redispatch(torch._C.DispatchKeySet(_BACKEND_KEYS[device]), *args, **(kwargs or {}))
                else:
                    out = func(*args, **(kwargs or {}))
                for storage in map(storage_of, tree_flatten(out)[0]):
                    # a view or an in-place result shares an input's storage: nothing new was allocated
                    if storage is None or id(storage) in inputs or id(storage) in live:
                        continue
                    nbytes = storage.nbytes()
                    live[id(storage)] = weakref.finalize(storage, freed, id(storage), nbytes)
                    watcher.live_bytes += nbytes
                    if watcher.live_bytes > watcher.peak_bytes:
                        watcher.peak_bytes, watcher.peak_op = watcher.live_bytes, name
                return out

        self._live = live
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
        for finalizer in list(self._live.values()):  # stop watching: nothing may change the figures afterwards
            finalizer.detach()
        self._live.clear()


def _forget_ipython_outputs() -> None:
    """Drop IPython's Out cache and _, __, ___ so a displayed object does not stay alive."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if shell is None:
        return
    shell.user_ns.get("Out", {}).clear()
    for name in ("_", "__", "___"):
        shell.user_ns[name] = None
    if hasattr(shell, "displayhook"):
        shell.displayhook.flush()


def release(*names: str, namespace: dict) -> tuple[MemorySnapshot, MemorySnapshot]:
    """Delete ``names`` from ``namespace`` (pass ``globals()``), collect garbage, empty the CUDA cache.

    Prints memory before and after and returns both snapshots. Names that are not defined are an error,
    so a typo does not leave a model silently alive.
    """
    if not isinstance(namespace, dict):
        raise ValueError("namespace must be the dict that holds the names, usually globals()")
    missing = [name for name in names if name not in namespace]
    if missing:
        raise ValueError(f"Cannot release {missing}: not defined in the namespace given. Defined names are "
                         f"released by passing them as strings, e.g. release('model', namespace=globals()).")
    before = snapshot("before release")
    for name in names:
        del namespace[name]
    _forget_ipython_outputs()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    after = snapshot("after release")
    return before, after


def format_bytes(n: int) -> str:
    """Human-readable bytes in the course's one unit convention: decimal GB = 10^9, MB = 10^6, kB = 10^3 bytes.

    Model sizes are quoted in GB as the original course and Hugging Face print them. GiB (2^30) appears only where
    a tool reports it (nvidia-smi's MiB, for example), and then says so."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,} B"


# --- memory plans: what a notebook will need, checked before anything is loaded --------------------------

NOTEBOOK_SCHEMES: dict[str, tuple[str, ...]] = {
    "01_full_precision": ("fp32",),
    "02_int8": ("fp32", "int8"),
    "03_nf4": ("fp32", "bf16", "int8", "fp4", "nf4", "nf4-dq"),
    "03a_deep_dive_4bit_compute": ("nf4-dq",),
    "04_lora_adapters": ("nf4-dq", "fp32"),
    "05_weight_packing": ("nf4-dq",),
    "06_qlora_finetune": ("nf4-dq",),
    "06a_deep_dive_qlora_memory": ("nf4-dq",),
    "07_beyond_bitsandbytes": ("fp32", "int8", "nf4", "fp4"),
}
"""The models each notebook loads, one at a time (each is released before the next)."""

TRAINING_NOTEBOOKS = ("06_qlora_finetune", "06a_deep_dive_qlora_memory")
"""Notebooks that train: their plan counts gradients of the logits and the float32 upcast of training."""

EVAL_BATCH_WINDOWS = 2  # windows scored at once by quality.evaluate: with a 128k vocabulary the logits dominate
EVAL_WINDOW_TOKENS = 256
EVAL_BATCH_TOKENS = EVAL_BATCH_WINDOWS * EVAL_WINDOW_TOKENS
CUDA_CONTEXT_BYTES = 600 * 10**6  # CUDA context + cuBLAS workspace, roughly, on a T4 (not model-dependent)
MAX_SHARD_BYTES = 5 * 10**9  # Meta's Llama checkpoints are stored in shards of at most 5 GB


@dataclass(frozen=True)
class MemoryLimits:
    gpu_bytes: int | None  # None: no GPU, everything on the CPU
    cpu_bytes: int


T4_GPU_BYTES = T4.gpu_memory_bytes
"""A T4's memory as ``torch.cuda.get_device_properties(0).total_memory`` reports it on Colab (15.83 GB, which
nvidia-smi shows as 15,095 MiB)."""
T4_USABLE_BYTES = T4_GPU_BYTES - CUDA_CONTEXT_BYTES
"""The one definition of "a T4" in the course: what a student can fill with tensors, the total less the CUDA
context and cuBLAS workspace that every session pays first (15.2 GB)."""
T4_LIMITS = MemoryLimits(gpu_bytes=T4_GPU_BYTES, cpu_bytes=12 * 10**9)
"""A Colab T4 session: the T4's total memory (a plan adds the CUDA context to its peak) and about 12 GB of RAM."""


@dataclass(frozen=True)
class MemoryPlan:
    notebook: str
    largest_scheme: str
    gpu_peak: int | None  # bytes, None when the profile runs on the CPU
    cpu_peak: int
    limits: MemoryLimits

    @property
    def fits(self) -> bool:
        gpu_ok = self.gpu_peak is None or (self.limits.gpu_bytes is not None and self.gpu_peak <= self.limits.gpu_bytes)
        return gpu_ok and self.cpu_peak <= self.limits.cpu_bytes


def activation_bytes(config, dtype: torch.dtype, training: bool = False) -> int:
    """Peak activation memory of scoring one evaluation batch: dominated by the logits (model dtype + a
    float32 copy for the loss); training also keeps the logits' gradient."""
    vocab = _config_get(config, "vocab_size")
    element = torch.empty((), dtype=dtype).element_size()
    logits = EVAL_BATCH_TOKENS * vocab * (element + 4)
    return logits * (2 if training else 1)


def plan_notebook(notebook: str, config, on_gpu: bool, limits: MemoryLimits,
                  dtypes: dict[str, torch.dtype] | None = None) -> MemoryPlan:
    """Peak GPU and CPU memory a notebook needs for a model config, from the estimator (pure).

    ``dtypes`` maps a scheme to the dtype of its non-quantized modules (``from_pretrained_kwargs`` decides
    it); by default float16 for int8 and bfloat16 for 4-bit, which is also a 4-bit layer's compute dtype: its peak
    holds one rebuilt dense weight (``dense_copy_bytes``). On a GPU the CPU holds at most one checkpoint
    shard while loading; on the CPU the model, its activations and the checkpoint file all live in RAM.
    """
    if notebook not in NOTEBOOK_SCHEMES:
        raise ValueError(f"Unknown notebook {notebook!r}. Known: {', '.join(NOTEBOOK_SCHEMES)}.")
    dtypes = {"int8": torch.float16, "nf4": torch.bfloat16, "nf4-dq": torch.bfloat16, "fp4": torch.bfloat16,
              **(dtypes or {})}
    checkpoint = estimate_footprint(config, "bf16").reported  # Meta stores Llama in bfloat16
    training = notebook in TRAINING_NOTEBOOKS
    compute = dict(dtypes)  # before the upcast: a 4-bit layer still rebuilds its weight in its compute dtype
    if training:
        # peft.prepare_model_for_kbit_training upcasts every parameter that is not 4-bit (embeddings, norms,
        # lm_head) to float32: for Llama-3.1-8B that is about 4.2 GB of the QLoRA model's weights.
        dtypes = {scheme: torch.float32 for scheme in dtypes}
    peaks = {scheme: _load_peak(config, scheme, FLOAT_SCHEMES.get(scheme) or dtypes[scheme], training)
             + (dense_copy_bytes(config, compute[scheme]) if scheme in FOUR_BIT_SCHEMES else 0)
             for scheme in NOTEBOOK_SCHEMES[notebook]}
    largest = max(peaks, key=peaks.get)
    return _plan(notebook, largest, peaks[largest], checkpoint, on_gpu, limits, notebook_cpu_extra_bytes(notebook, config))


CPU_BACKUP_NOTEBOOKS = ("07_beyond_bitsandbytes",)
"""Notebooks that keep a CPU copy of every decoder-layer parameter while they work (07 undoes each method with it)."""


def notebook_cpu_extra_bytes(notebook: str, config) -> int:
    """CPU memory a notebook holds beside its model: 07's backup of the decoder layers, in bfloat16 as read from a
    bfloat16 checkpoint (``helpers.groupwise.backup_decoder_weights``), for as long as it runs; 0 for the others."""
    if notebook not in CPU_BACKUP_NOTEBOOKS:
        return 0
    hidden = _config_get(config, "hidden_size")
    per_layer = sum(rows * columns for rows, columns in linear_shapes(config).values()) + 2 * hidden  # + two norms
    return _config_get(config, "num_hidden_layers") * per_layer * torch.bfloat16.itemsize


def dense_copy_bytes(config, compute_dtype: torch.dtype) -> int:
    """The largest temporary dense weight a 4-bit model makes: its largest Linear rebuilt in the compute dtype.

    bitsandbytes rebuilds a whole weight for a product past a few tokens (on a CPU, always) and in every backward
    pass (notebook 03a, section 5), one layer at a time: the peak holds one such copy above the 4-bit weights."""
    rows, columns = max(linear_shapes(config).values(), key=lambda shape: shape[0] * shape[1])
    return rows * columns * torch.empty((), dtype=compute_dtype).element_size()


def _load_peak(config, scheme: str, dtype: torch.dtype, training: bool) -> int:
    estimate = estimate_footprint(config, scheme, None if scheme in FLOAT_SCHEMES else dtype)
    return estimate.true + activation_bytes(config, dtype, training)


def _plan(label: str, scheme: str, peak: int, checkpoint: int, on_gpu: bool, limits: MemoryLimits,
          cpu_extra: int = 0) -> MemoryPlan:
    if on_gpu:
        return MemoryPlan(label, scheme, peak + CUDA_CONTEXT_BYTES, min(checkpoint, MAX_SHARD_BYTES) + cpu_extra, limits)
    return MemoryPlan(label, scheme, None, peak + checkpoint + cpu_extra, limits)


def plan_optional_load(label: str, config, scheme: str, on_gpu: bool, limits: MemoryLimits,
                       training: bool = False) -> MemoryPlan:
    """The plan of one load a notebook makes only where it fits (pure), e.g. a 16-bit base to compare LoRA with
    QLoRA: the notebook skips that part, saying why, where ``fits`` is False, instead of stopping."""
    if scheme not in FLOAT_SCHEMES:
        raise ValueError(f"an optional load is a float scheme ({', '.join(FLOAT_SCHEMES)}), got {scheme!r}.")
    checkpoint = estimate_footprint(config, "bf16").reported
    return _plan(label, scheme, _load_peak(config, scheme, FLOAT_SCHEMES[scheme], training), checkpoint, on_gpu,
                 limits)


def check_memory_plan(plan: MemoryPlan, profile_name: str) -> None:
    """Print the plan; stop with what to choose instead when it does not fit the device."""
    gpu = "runs on the CPU" if plan.gpu_peak is None else f"GPU peak {plan.gpu_peak / 1e9:.2f} GB"
    print(f"Memory plan for {plan.notebook} with {profile_name}: largest load {plan.largest_scheme}; {gpu}; "
          f"CPU peak {plan.cpu_peak / 1e9:.2f} GB")
    if not plan.fits:
        gpu_limit = "none" if plan.limits.gpu_bytes is None else f"{plan.limits.gpu_bytes / 1e9:.2f} GB"
        raise RuntimeError(
            f"{plan.notebook} needs more memory than this device has with profile {profile_name!r} (its "
            f"{plan.largest_scheme} load; limits: GPU {gpu_limit}, CPU {plan.limits.cpu_bytes / 1e9:.2f} GB). "
            f"Choose a smaller profile, e.g. PROFILE = 'llama-3.2-3b' on a T4, "
            f"or PROFILE = 'tiny' on any machine.")
    claims.check("it fits this machine", plan.fits)
