"""Loading a profile's model in a precision scheme, and reading its anatomy.

The decisions (dtype, quantization config, device map) are made by ``from_pretrained_kwargs``, a pure
function of (profile, scheme, hardware), so they are tested for every combination without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from helpers.environment import Hardware, detect_hardware
from helpers import memory
from helpers.memory import FLOAT_SCHEMES, LINEAR_NAMES, check_scheme
from helpers.profiles import Profile

REQUIRED_LOCAL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


CPU_COMPUTE_REASON = ("CPU: float32, the one dtype every x86-64 CPU multiplies natively and fast; bfloat16 and "
                      "float16 are emulated without AVX512-BF16/AMX (several times slower: notebook 03a times them) "
                      "and round differently from one instruction set to the next, so float32 also gives the same "
                      "answers on every CPU")


def compute_dtype_for(hardware: Hardware) -> tuple[torch.dtype, str]:
    """The 4-bit compute dtype for this hardware, and why: the fastest dtype the device runs natively.

    bfloat16 where a GPU has it natively (capability 8.0+). A T4 (7.5) only emulates bfloat16, although
    ``torch.cuda.is_bf16_supported()`` says True, so float16 is used there. On a CPU the same rule gives float32:
    it is native everywhere, while 16-bit matmuls are native only with AVX512-BF16/AMX. Even there the course
    keeps float32, because 16-bit results differ between instruction sets and the committed outputs must not
    depend on which CPU ran them (the reason printed is therefore the same on every CPU).
    """
    if hardware.device == "cpu":
        return torch.float32, CPU_COMPUTE_REASON
    if hardware.bf16_native:
        return torch.bfloat16, f"compute capability {hardware.compute_capability} has native bfloat16"
    return torch.float16, (f"compute capability {hardware.compute_capability} has no native bfloat16 "
                           "(it would be emulated, slowly), so float16")


def from_pretrained_kwargs(profile: Profile, scheme: str, hardware: Hardware) -> dict:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (pure: no I/O, no GPU needed).

    Every BitsAndBytesConfig knob is set on purpose, since its defaults (fp4, no double quantization,
    float32 compute) are rarely what a course means. On a GPU, LLM.int8 keeps the non-quantized modules in
    float16, the dtype its matmul computes in, so no cast happens on each call. On a CPU everything that is not
    quantized stays float32 (see ``compute_dtype_for``): LLM.int8's integer products are exact, and its outlier
    columns and rescaling then run in float32 too, the same on every CPU.
    """
    from transformers import BitsAndBytesConfig

    check_scheme(scheme)
    if profile.needs_gpu and hardware.device != "cuda":
        raise RuntimeError(f"Profile {profile.name!r} needs a CUDA GPU; this hardware is {hardware.describe()}. "
                           "Use the 'tiny' profile on a CPU.")
    kwargs: dict = {"device_map": "auto"} if hardware.execution_device == "cuda" else {}
    if scheme in FLOAT_SCHEMES:
        kwargs["dtype"] = FLOAT_SCHEMES[scheme]
    elif scheme == "int8":
        kwargs["dtype"] = torch.float16 if hardware.device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=6.0,  # activation magnitude above which a feature takes the float16 path
            llm_int8_has_fp16_weight=False,  # keep only the int8 weight, not a float16 copy
            llm_int8_skip_modules=None,  # None: transformers keeps lm_head unquantized by itself
        )
    else:
        compute_dtype, _ = compute_dtype_for(hardware)
        kwargs["dtype"] = compute_dtype
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if scheme == "fp4" else "nf4",
            bnb_4bit_use_double_quant=scheme == "nf4-dq",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    return kwargs


def check_local_model_files(folder: str | Path) -> None:
    """Fail early, with the fix, when a shipped checkpoint is missing or damaged."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_LOCAL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The model folder {folder} lacks {', '.join(missing)}. Restore it with "
            f"`git checkout -- {folder.name}` from the data/ folder, or rebuild it with `make rebuild-tiny-llama`.")
    from safetensors import safe_open

    weights = folder / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            for name in names:  # reading every tensor catches truncation, which the header alone does not
                handle.get_slice(name)[:]
    except Exception as error:  # safetensors raises several types for the same problem
        raise RuntimeError(
            f"{weights} is corrupted or truncated ({type(error).__name__}: {error}). Restore it with "
            "`git checkout -- data/tiny-llama/model.safetensors` or rebuild it with `make rebuild-tiny-llama`."
        ) from error


def load_model(profile: Profile, scheme: str = "fp32", hardware: Hardware | None = None):
    """Load (model, tokenizer) of a profile in a scheme: "fp32", "bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hardware = hardware or detect_hardware()
    kwargs = from_pretrained_kwargs(profile, scheme, hardware)
    if not profile.on_hub:
        check_local_model_files(profile.model_id)
    if scheme == "int8" and hardware.execution_device == "cpu":  # first: a wrong int8 kernel is no rounding matter
        from helpers.quantization import require_exact_int8_matmul

        require_exact_int8_matmul("cpu")
    model = AutoModelForCausalLM.from_pretrained(profile.model_id, **kwargs)
    model.eval()
    use_portable_cpu_path(model)
    tokenizer = AutoTokenizer.from_pretrained(profile.model_id)
    if tokenizer.pad_token is None:  # Llama 3 base checkpoints ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def use_portable_cpu_path(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer on bitsandbytes' portable CPU path; returns how many layers were set.

    On CPUs with AVX512-BF16, bitsandbytes would otherwise repack a layer's storage at its first forward pass and
    compute in bfloat16 whatever the compute dtype says, so results (and bytes held) would depend on the CPU.
    The portable path dequantizes to the compute dtype and multiplies with PyTorch. A GPU ignores the flag.
    Every 4-bit load of ``load_model`` goes through here; call it yourself on a Linear4bit you build by hand.
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs should go (the embeddings' device under a device map)."""
    return model.get_input_embeddings().weight.device


def component_of(parameter_name: str) -> str:
    """Which part of a Llama a parameter belongs to: embeddings, attention, mlp, norms or lm_head."""
    if "embed_tokens" in parameter_name:
        return "embeddings"
    if parameter_name.startswith("lm_head"):
        return "lm_head"
    if "norm" in parameter_name:
        return "norms"
    if any(name in parameter_name for name in LINEAR_NAMES[:4]):
        return "attention"
    if any(name in parameter_name for name in LINEAR_NAMES[4:]):
        return "mlp"
    raise ValueError(f"Parameter {parameter_name!r} is not part of a Llama architecture this course knows")


def parameter_counts_by_component(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of a loaded (or meta) model by component, read from its modules (tied weights once)."""
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for name, parameter in model.named_parameters():  # named_parameters() skips a tied lm_head
        counts[component_of(name)] += parameter.numel()
    return counts


def machine_limits(hardware: Hardware) -> memory.MemoryLimits:
    """This machine's memory: the GPU's total (if any) and the system RAM."""
    import psutil

    return memory.MemoryLimits(gpu_bytes=hardware.gpu_memory_bytes, cpu_bytes=psutil.virtual_memory().total)


def memory_plan(notebook: str, profile: Profile, hardware: Hardware, limits: memory.MemoryLimits) -> memory.MemoryPlan:
    """The memory plan of a notebook for a profile on given hardware and limits (pure: reads only the config file)."""
    on_gpu = hardware.device == "cuda"
    dtypes = {scheme: from_pretrained_kwargs(profile, scheme, hardware)["dtype"]
              for scheme in memory.QUANTIZED_SCHEMES}
    config = memory.load_reference_config(profile.reference_config)
    return memory.plan_notebook(notebook, config, on_gpu, limits, dtypes)


def lora_base_scheme(hardware: Hardware) -> str:
    """The float scheme of a LoRA run without quantization on this hardware: the 4-bit compute dtype's
    (``compute_dtype_for``), so that LoRA and QLoRA compute in the same dtype and differ only in the base."""
    dtype, _ = compute_dtype_for(hardware)
    return next(scheme for scheme, float_dtype in FLOAT_SCHEMES.items() if float_dtype == dtype)


def check_optional_load(label: str, profile: Profile, scheme: str, hardware: Hardware | None = None,
                        training: bool = False) -> memory.MemoryPlan:
    """Print the plan of a load a notebook makes only where it fits, and whether it does; never raises for size."""
    hardware = hardware or detect_hardware()
    config = memory.load_reference_config(profile.reference_config)
    plan = memory.plan_optional_load(label, config, scheme, hardware.device == "cuda", machine_limits(hardware),
                                     training)
    where = "runs on the CPU" if plan.gpu_peak is None else f"GPU peak {plan.gpu_peak / 1e9:.2f} GB"
    print(f"Memory plan for {label} with {profile.name}: {scheme}; {where}; CPU peak {plan.cpu_peak / 1e9:.2f} GB; "
          f"{'fits' if plan.fits else 'does not fit, so it is skipped'}")
    return plan


def checkpoint_folder(profile: Profile) -> Path:
    """The local folder of the profile's safetensors checkpoint: the shipped folder, or the Hub snapshot
    ``from_pretrained`` already downloaded. peft's ``replace_lora_weights_loftq(model, model_path=...)`` needs it:
    without ``model_path`` it looks a model loaded from a folder up as a Hub repository id, and raises."""
    if not profile.on_hub:
        return Path(profile.model_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(profile.model_id, allow_patterns=["*.safetensors", "*.json"]))


def checkpoint_reader(profile: Profile):
    """A function ``name -> tensor`` reading one unquantized weight from the profile's safetensors checkpoint (the
    shipped folder, or the Hub snapshot ``from_pretrained`` already downloaded), lazily: one tensor at a time."""
    from safetensors import safe_open

    folder = checkpoint_folder(profile)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors file in {folder}: LoftQ reads the unquantized weights from there.")
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(f"{name!r} is not in {profile.model_id}'s checkpoint (e.g. {next(iter(where))!r}).")
        with safe_open(str(where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    return read


def check_memory_before_loading(notebook: str, profile: Profile, hardware: Hardware | None = None) -> memory.MemoryPlan:
    """Print the notebook's peak memory for this profile here, and stop with advice if it will not fit."""
    hardware = hardware or detect_hardware()
    plan = memory_plan(notebook, profile, hardware, machine_limits(hardware))
    memory.check_memory_plan(plan, profile.name)
    return plan


def rope_frequencies(config) -> tuple[torch.Tensor, str]:
    """``(inv_freq, rule)``: RoPE's inverse frequencies for a Llama config, from scratch in float64, and the rule
    in words.

    ``default``: ``theta^(-2i / head_dim)``. ``llama3`` (Llama 3.1 and 3.2): the same, then rescaled for long
    contexts by wavelength ``2 pi / f``: frequencies whose wavelength is shorter than
    ``original_max_position_embeddings / high_freq_factor`` positions stay, those longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and the ones between move
    smoothly from one to the other. Other rope types are refused.
    """
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = parameters.get("rope_type", "default")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the config has no rope_theta (in rope_parameters or at top level)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope_type == "default":
        return frequencies, "theta^(-2i / head_dim)"
    if rope_type != "llama3":
        raise ValueError(f"rope_frequencies knows the rope types 'default' and 'llama3', got {rope_type!r}")
    factor, low, high = parameters["factor"], parameters["low_freq_factor"], parameters["high_freq_factor"]
    original = parameters["original_max_position_embeddings"]
    wavelength = 2 * math.pi / frequencies
    smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: divide by factor, 1: keep
    rescaled = (1 - smooth) * frequencies / factor + smooth * frequencies
    return rescaled, (f"theta^(-2i / head_dim), rescaled as Llama 3 does (factor {factor:g} for wavelengths over "
                      f"{original / low:,.0f} positions, kept under {original / high:,.0f})")
