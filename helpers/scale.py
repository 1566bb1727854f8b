"""The scale smoke: the course's self-checking claims on the real Llama-3.2-3B architecture, with random weights.

Any CUDA machine can run it with no network and no Hugging Face token::

    python -m helpers.scale --config data/reference/llama-3.2-3b.config.json --work build/scale-smoke --device cuda

It builds a ``LlamaForCausalLM`` from a public architecture config (``data/reference/*.config.json``) with random
weights, saves it as a local checkpoint (safetensors, plus the tiny Llama's tokenizer), then loads it once per
precision scheme the way the notebooks do (``helpers.models.from_pretrained_kwargs``) and checks, with
``helpers.claims.check``, every claim that does not depend on what the weights learned:

- footprints: ``get_memory_footprint()`` and ``memory.true_footprint`` equal ``memory.estimate_footprint``, to the byte;
- on CUDA, the memory a load really allocates (``torch.cuda.memory_allocated``) against the estimator;
- from-scratch LLM.int8 and NF4 (+ double quantization) against the bytes bitsandbytes stored
  (``quantization.compare_codes``, which knows the CUDA kernels' tolerances), and a 4-bit weight rebuilt by hand
  against ``bitsandbytes.functional.dequantize_4bit``;
- a forward pass on the device gives finite logits;
- a fresh LoRA adapter (r = 8 on q/k/v/o): trainable count = ``lora.lora_param_count``, and the adapted layer's
  output = base output + x ΔWᵀ (``lora.lora_delta_weight``);
- the memory comes back after the release (``memory.release``).

``SCALE_SMOKE_CELLS`` lists, notebook by notebook and section by section, which cells this covers, which would hold
on random weights but are not re-run here, which need no weights at all, and which need trained weights (quality,
greedy generations, the pricer answers, the loss going down) and therefore stay with the Hub lane.

Time budget for Llama-3.2-3B on a T4-class GPU (16 GB, PCIe 3, Colab-like disk of ~100-200 MB/s), well under 10 min:

======================================  =====================  ==========================================
step                                    T4 estimate            what dominates
======================================  =====================  ==========================================
build on the GPU, random init           < 5 s                  3.2 G normal values on the GPU
save 6.43 GB of bfloat16 safetensors    30-70 s                disk writes (shards of 2 GB via host RAM)
load int8 + checks                      30-80 s                reading 6.4 GB, quantizing on the GPU
load nf4-dq + checks                    30-80 s                the same
load fp32 + checks (only if it fits)    40-90 s                reading and upcasting 12.9 GB
from-scratch checks (CPU, one layer)    < 5 s per scheme       25 M weights, vectorized
memory snapshots, LoRA, forward         < 10 s per scheme      walking live tensors, wrapping 112 layers
delete the checkpoint                   < 2 s
======================================  =====================  ==========================================

So about 2.5 to 5.5 minutes in all (measured: the same run with ``--device cpu`` on a 2-core CPU with 24 GB of RAM
took 7.2 minutes, 85 s of it writing the checkpoint and 80 to 140 s per 4-bit or int8 load). Disk: the checkpoint takes 6.43 GB (bfloat16, tied embeddings stored once) under
``--work``; it is deleted at the end unless ``--keep``. Host RAM: one 2 GB shard at a time while saving.

What cannot be checked here without a GPU (the course's machines have none) and was written against the documented
APIs only: the CUDA memory figures (tolerances below), and the exactness of bitsandbytes' CUDA kernels (the code
tolerances live in ``helpers.quantization.CUDA_CODE_TOLERANCES``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from helpers import claims, lora, memory, quantization
from helpers.environment import Hardware, detect_hardware
from helpers.models import from_pretrained_kwargs, model_device, parameter_counts_by_component, use_portable_cpu_path
from helpers.profiles import DATA_DIR, Profile

# --------------------------------------------------------------------------------------------- constants

INIT_STD = 0.02
"""Standard deviation of the random Linear and Embedding weights: Llama's own ``initializer_range``."""

CHECKPOINT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu", "cuda")
TOKENIZER_SOURCE = DATA_DIR / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MARKER_FILE = "random_checkpoint.json"
"""Written into every folder ``build_random_checkpoint`` makes; only such folders are ever overwritten or deleted."""

MAX_SHARD_SIZE = "2GB"
"""safetensors copies a whole shard into host RAM while writing it: 2 GB shards keep a 12 GB Colab VM comfortable."""

DEFAULT_SCHEMES = ("int8", "nf4-dq", "fp32")
"""Loaded one at a time, in this order: the quantized ones first (they always fit), float32 last, if it fits."""

FROM_SCRATCH_SCHEMES = ("int8", "nf4", "nf4-dq")
"""Schemes whose stored bytes ``helpers.quantization`` rebuilds from scratch."""

QUANTIZED_LAYER = "model.layers.0.mlp.down_proj"
"""The layer whose stored codes are compared with the from-scratch ones (the largest Linear of a Llama layer)."""

LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = lora.ATTENTION_MODULES  # q_proj, k_proj, v_proj, o_proj, as in the course's adapters
LORA_LAYER = "model.layers.0.self_attn.q_proj"
LORA_B_STD = 0.05
"""peft starts lora_B at zero (ΔW = 0); the smoke gives it random values so that x ΔWᵀ is not trivially 0."""

PROMPT = "In the beginning God created the heaven and the earth."
FORWARD_TOKENS = 8
"""The forward pass uses the prompt's first tokens: enough to run every kernel, too few to cost memory."""

CUDA_GROWTH_SHARE = 0.02
CUDA_GROWTH_SLACK_BYTES = 16 * 2**20
"""``torch.cuda.memory_allocated`` after a load may exceed the estimate by the caching allocator's rounding (every
tensor rounded up to 512 bytes: about 1,500 tensors for a 4-bit Llama-3.2-3B, under 1 MB) and by small buffers
bitsandbytes or transformers keep on the device; 2% of the model plus 16 MiB covers both with room, and still fails a
load that keeps a second copy of any sizeable weight (the embedding matrix alone is 5% of the 4-bit model)."""

RELEASE_SHARE = 0.01
"""Memory left over after a release, as a share of the model's true bytes: the notebooks' own 1% rule."""

CUDA_HEADROOM_BYTES = 10**9
"""Room a scheme needs on the GPU beyond its weights (CUDA workspaces, activations of a few tokens, the adapter)."""

CPU_HEADROOM_BYTES = 10**9

DEVICE_MAP_GPU_SHARE = 0.9
"""transformers' ``device_map="auto"`` on a single GPU places weights in at most 90% of its free memory and offloads
the rest to the CPU, so a scheme runs on CUDA only when its weights fit that share (else it would be split)."""

SUMMARY_DETAIL_CHARS = 96


# --------------------------------------------------------------------------------------------- which cells are covered

COVERED = "covered"
ANY_WEIGHTS = "any weights, not re-run"
NO_WEIGHTS = "no weights"
TRAINED = "needs trained weights"
COVERAGE_STATUSES = (COVERED, ANY_WEIGHTS, NO_WEIGHTS, TRAINED)


@dataclass(frozen=True)
class CellCoverage:
    """One group of notebook cells (named by its section heading) and what the scale smoke does with its claims."""

    notebook: str  # file name without .ipynb
    section: str  # the section heading, without the leading '## '
    claims: str  # what the cells claim or show
    status: str  # one of COVERAGE_STATUSES
    how: str  # the smoke checks that cover it, or why they cannot


def _cells(notebook: str, *rows: tuple[str, str, str, str]) -> tuple[CellCoverage, ...]:
    return tuple(CellCoverage(notebook, section, what, status, how) for section, what, status, how in rows)


SCALE_SMOKE_CELLS: tuple[CellCoverage, ...] = (
    *_cells(
        "01_full_precision",
        ("3. One decoder layer, part by part", "SiLU = x·sigmoid(x), RMSNorm by hand", ANY_WEIGHTS,
         "hold for any weights; the smoke's forward pass runs both modules on the device but does not re-check them"),
        ("4. The model at work", "next-token probabilities and greedy text", TRAINED,
         "random weights predict nothing"),
        ("5. Where the parameters are", "counts from the modules = counts from the config", COVERED,
         "fp32: footprint == estimate (checks the counts too; runs when float32 fits the device)"),
        ("6. The footprint: measured and predicted, to the byte", "reported == true == estimated", COVERED,
         "fp32: footprint == estimate; on CUDA also fp32: CUDA memory == estimate"),
        ("7. The real Llamas, built on the meta device", "meta-device models and their footprints", NO_WEIGHTS,
         "config only: every lane checks it"),
        ("8. When a model does not fit", "device_map='auto' on the meta 8B", NO_WEIGHTS, "config only"),
        ("9. Give the memory back, without restarting", "memory returned after the release (within 1%)", COVERED,
         "fp32: release"),
        ("Summary", "footprint reported == true == estimated; memory returned", COVERED,
         "fp32: footprint == estimate, fp32: release"),
    ),
    *_cells(
        "02_int8",
        ("1. The float32 reference, measured first", "greedy reference texts", TRAINED,
         "the texts are meaningless on random weights (the float32 release is covered by fp32: release)"),
        ("2. Load the model with LLM.int8", "the int8 load and its knobs", COVERED, "int8: load"),
        ("3. What changed, and what did not", "which modules became Linear8bitLt", COVERED,
         "int8: load (7 quantized Linear per layer, lm_head kept)"),
        ("4. Inside one int8 layer", "from-scratch int8 values and row scales == bitsandbytes", COVERED,
         "int8: from-scratch == stored (compare_codes, CUDA tolerance)"),
        ("5. The outlier threshold is about activations", "outlier features above the 6.0 threshold", TRAINED,
         "outlier features emerge in trained models; random activations have none"),
        ("6. Memory: reported, true, and float32", "estimate == measured, to the byte", COVERED,
         "int8: footprint == estimate; on CUDA int8: CUDA memory == estimate"),
        ("7. Quality against float32", "perplexity, top-1 agreement, logit error, greedy texts", TRAINED,
         "quality of random weights means nothing"),
        ("8. Give the memory back", "memory returned after each release", COVERED, "int8: release"),
    ),
    *_cells(
        "03_nf4",
        ("1. Every 4-bit knob, and what the defaults mean", "BitsAndBytesConfig defaults and the course's knobs",
         NO_WEIGHTS, "configuration objects only"),
        ("2. The float32 reference, measured once and released", "float32 footprint and release",
         COVERED, "fp32: footprint == estimate, fp32: release"),
        ("3. NF4 is an index into a table of 16 normal quantiles", "the NF4 table derived from normal quantiles",
         NO_WEIGHTS, "pure tensors"),
        ("4. Load in NF4 and read what bitsandbytes stored", "from-scratch codes, absmax and dequantized weight",
         COVERED, "nf4-dq: from-scratch == stored and nf4-dq: dequantize by hand (plain NF4 with --schemes nf4)"),
        ("5. Double quantization, measured in true bytes", "8-bit scale codes, scales and offset == stored; true bytes",
         COVERED, "nf4-dq: from-scratch == stored, nf4-dq: footprint == estimate"),
        ("6. More schemes, down to where quality breaks", "footprints of each scheme; 4-bit round-trip error per layer",
         COVERED, "int8: footprint == estimate (bf16 and fp4 with --schemes bf16,fp4; their quality needs training)"),
        ("7. Quality against size", "perplexity, KL divergence and agreement per scheme", TRAINED,
         "quality of random weights means nothing"),
        ("8. The real Llamas: what 4 bits buy on a T4", "estimates for the real configs", NO_WEIGHTS, "config only"),
        ("Summary", "from-scratch NF4 == bitsandbytes; memory returned; quality", COVERED,
         "nf4-dq: from-scratch == stored, nf4-dq: release (the quality claims need trained weights)"),
    ),
    *_cells(
        "03a_deep_dive_4bit_compute",
        ("1. The model, in NF4 with double quantization", "the NF4 + double quantization load", COVERED,
         "nf4-dq: load, footprint == estimate"),
        ("2. The compute dtype, chosen by the hardware", "the compute dtype of each machine", NO_WEIGHTS,
         "hardware descriptions only"),
        ("3. What the three dtypes hold, and what they change", "output error ordered float32 < float16 < bfloat16",
         ANY_WEIGHTS, "holds for any weight; not re-run"),
        ("4. bitsandbytes' fused CPU kernel", "every Linear4bit on the portable path", COVERED,
         "nf4-dq: load (load_model sets the portable path on every 4-bit load)"),
        ("5. What a 4-bit layer holds while it computes", "whole-weight dequantizations per forward and backward",
         ANY_WEIGHTS, "counts calls, not values: holds for any weights; not re-run"),
        ("6. Give the memory back", "memory returned", COVERED, "nf4-dq: release"),
        ("Summary", "compute dtypes ordered; dense copies; memory returned", COVERED,
         "nf4-dq: release (the rest holds for any weights; not re-run)"),
    ),
    *_cells(
        "04_lora_adapters",
        ("1. The 4-bit base", "the NF4 + double quantization base", COVERED, "nf4-dq: load, footprint == estimate"),
        ("2. The adapter on disk", "the published adapter's config and file", TRAINED,
         "needs the published adapter (the Hub lane)"),
        ("6. Counting the parameters three ways", "LoRA parameters: model = formula = file", COVERED,
         "<scheme>: LoRA count == formula with a fresh r = 8 adapter (the file count needs the published adapter)"),
        ("7. The same formula on the real Llamas", "closed-form counts for the real configs", NO_WEIGHTS,
         "config only"),
        ("9. The update `ΔW` has rank at most `r`", "rank of ΔW <= r; update size and directions (LoRA's Table 7)",
         ANY_WEIGHTS, "the rank holds for any adapter; the directions' order needs the trained adapter; not re-run"),
        ("10. The forward pass, by hand", "PEFT output = base output + x ΔWᵀ", COVERED,
         "<scheme>: LoRA forward == base + x ΔWᵀ"),
        ("11. What the adapter changes: the pricer task", "format share and price error, base vs adapted", TRAINED,
         "needs the trained adapter and base"),
        ("12. Three ways to merge, and the one that keeps what was trained", "memory returned (the 4-bit model)",
         COVERED, "nf4-dq: release"),
        ("12. Three ways to merge, and the one that keeps what was trained", "W + ΔW answers vs the trained model's",
         TRAINED, "needs the trained adapter and the pricer prompts"),
        ("13. Why not merge into the 4-bit base?", "Q(W) of the float32 weight == stored 4-bit weight", ANY_WEIGHTS,
         "close kin of nf4-dq: from-scratch == stored; not re-run"),
        ("14. Dequantize, then merge", "Q(W) + ΔW answers vs the trained model's", TRAINED,
         "needs the trained adapter and the pricer prompts"),
        ("15. Merge it", "merged weight = Q(W) + ΔW; same logits merged and unmerged", ANY_WEIGHTS,
         "holds for any weights; not re-run (its 'same answers' use the pricer prompts)"),
        ("16. Give the memory back", "memory returned", COVERED, "fp32: release"),
    ),
    *_cells(
        "05_weight_packing",
        ("1. Why pack at all?", "sub-byte dtypes, pack/unpack round trip", NO_WEIGHTS, "pure tensors"),
        ("3. A readable loop, and why we do not use it", "loop == vectorized, speed", NO_WEIGHTS, "pure tensors"),
        ("6. What packing saves on a real model", "packed sizes of the real configs", NO_WEIGHTS, "config only"),
        ("7. Two bit orders", "bitsandbytes' nibble order", NO_WEIGHTS, "pure tensors"),
        ("8. Reading a real NF4 weight by hand", "NF4 weight rebuilt by hand == dequantize_4bit", COVERED,
         "nf4-dq: dequantize by hand == dequantize_4bit"),
        ("9. Give the memory back", "memory returned", COVERED, "nf4-dq: release"),
    ),
    *_cells(
        "06_qlora_finetune",
        ("1. Load the base in 4 bits", "the NF4 + double quantization base", COVERED, "nf4-dq: load"),
        ("2. `prepare_model_for_kbit_training`", "dtypes after preparation", ANY_WEIGHTS,
         "holds for any weights; not re-run"),
        ("4. Wrap the model: only the LoRA matrices train", "peft's count = formula; only LoRA trains; lora_B = 0",
         COVERED, "<scheme>: LoRA count == formula"),
        ("6. A short training run", "the loss goes down", TRAINED,
         "needs the pricer data and a real base to learn from"),
        ("7. The same run through TRL's `SFTTrainer`", "trainer loss = loop loss; labels; checkpoints kept",
         TRAINED, "needs the pricer data and a real base to learn from"),
        ("8. Reading the loss curve", "graded tokens per step, smoothed curve, epoch ends", TRAINED,
         "needs the training run"),
        ("10. Load it back onto a fresh base", "reloaded adapter identical; memory returned", ANY_WEIGHTS,
         "the reload is not re-run; the release is covered by nf4-dq: release"),
    ),
    *_cells(
        "06a_deep_dive_qlora_memory",
        ("1. The QLoRA model of lesson 06", "the NF4 + double quantization base", COVERED, "nf4-dq: load"),
        ("2. Memory: full fine-tuning vs LoRA vs QLoRA", "training memory measured = predicted", ANY_WEIGHTS,
         "needs a training step; not re-run (the weights' estimate is covered by nf4-dq: footprint == estimate)"),
        ("3. 8-bit and paged optimizers", "8-bit optimizer states measured = predicted", ANY_WEIGHTS,
         "needs a training step; not re-run"),
        ("4. QLoRA against LoRA, measured here", "dequantizations per step; QLoRA holds less at its peak",
         ANY_WEIGHTS, "holds for any weights; not re-run"),
        ("5. LoftQ: start LoRA from the quantization error", "peft's split = formula; ours lowers every error",
         ANY_WEIGHTS, "holds for any weights; not re-run"),
        ("6. Give the memory back", "memory returned; no paged buffer left", COVERED, "nf4-dq: release"),
    ),
)
"""What the scale smoke covers, notebook by notebook, by section heading (tests check the headings exist)."""


def coverage_table(rows: Sequence[CellCoverage] = SCALE_SMOKE_CELLS) -> str:
    """``SCALE_SMOKE_CELLS`` as text: one block per notebook, one line per section."""
    lines = []
    for notebook in dict.fromkeys(row.notebook for row in rows):
        lines.append(f"{notebook}:")
        for row in rows:
            if row.notebook == notebook:
                lines.append(f"  [{row.status}] {row.section}: {row.claims} -> {row.how}")
    counts = {status: sum(row.status == status for row in rows) for status in COVERAGE_STATUSES}
    lines.append("sections: " + "; ".join(f"{status}: {count}" for status, count in counts.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- argument checks

def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch.cuda.is_available() is False here (torch "
                           f"{torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu' with a small "
                           "config, or run on a machine with a CUDA GPU and a CUDA build of torch.")
    return device


def _read_llama_config(config_path: str | Path):
    """The transformers config of a Llama config.json, with clear errors for a wrong path or architecture."""
    if not isinstance(config_path, (str, Path)):
        raise TypeError(f"config_path must be a path to a config.json, got {type(config_path).__name__}.")
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}: the public Llama configs live in data/reference/ "
                                "(e.g. data/reference/llama-3.2-3b.config.json).")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a JSON object of config values ({error}).") from error
    if model_type != "llama":
        raise ValueError(f"{path} describes model_type {model_type!r}; the scale smoke builds Llama models only "
                         "(model_type 'llama').")
    return memory.load_reference_config(path)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return seed


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in CHECKPOINT_DTYPES:
        names = ", ".join(str(d) for d in CHECKPOINT_DTYPES)
        raise ValueError(f"dtype must be one of {names} (how the checkpoint is stored), got {dtype!r}.")
    return dtype


def _check_schemes(schemes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(schemes, str) or not schemes:
        raise ValueError(f"schemes must be a non-empty list of scheme names such as ['int8', 'nf4-dq'], "
                         f"got {schemes!r}.")
    for scheme in schemes:
        memory.check_scheme(scheme)
    if len(set(schemes)) != len(schemes):
        raise ValueError(f"schemes lists a scheme more than once: {list(schemes)}.")
    return tuple(schemes)


def _is_our_checkpoint(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose a folder for the checkpoint.")
    if folder.is_dir() and any(folder.iterdir()):
        if not (overwrite and _is_our_checkpoint(folder)):
            raise ValueError(f"{folder} is not empty. Choose an empty or new folder, or pass overwrite=True to replace "
                             f"a checkpoint made by build_random_checkpoint (only folders holding its {MARKER_FILE} "
                             "are replaced).")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------- the random checkpoint

def _materialize(model: torch.nn.Module, device: str) -> None:
    """Give every meta tensor real, uninitialized storage on ``device``, keeping shared parameters shared.

    ``Module.to_empty`` would give a tied lm_head its own copy of the embedding matrix (tying it again afterwards
    frees that copy, but only after allocating it); here each parameter is allocated once. Buffers (the rotary
    inverse frequencies) are computed, not random: their modules are rebuilt on the device from the config.
    """
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if id(parameter) not in replaced:
                fresh = torch.empty_like(parameter, device=device)
                replaced[id(parameter)] = torch.nn.Parameter(fresh, requires_grad=parameter.requires_grad)
            module.register_parameter(name, replaced[id(parameter)])
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(buffer.is_meta for buffer in child.buffers(recurse=False)):
                if not hasattr(child, "config"):
                    raise RuntimeError(f"{type(child).__name__} holds meta buffers and no config to rebuild it from.")
                with torch.device(device):
                    setattr(parent, child_name, type(child)(child.config))
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"still on the meta device after materializing: {left[:3]}")


@torch.no_grad()
def _randomize(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Normal(0, INIT_STD) Linear and Embedding weights, zero biases, norms at one; returns the values drawn."""
    done: set[int] = set()
    drawn = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) in done:
            continue
        done.add(id(weight))
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weight.normal_(0.0, INIT_STD, generator=generator)
            drawn += weight.numel()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif type(module).__name__.endswith("RMSNorm"):  # a scale per feature, one at initialization
            weight.fill_(1.0)
        else:
            raise RuntimeError(f"No initialization rule for {type(module).__name__}: the scale smoke builds Llama "
                               "models, whose weights are Linear, Embedding and RMSNorm.")
    return drawn


def _checkpoint_bytes(config, dtype: torch.dtype) -> int:
    counts = memory.parameter_counts_from_config(config)
    return sum(counts.values()) * torch.empty((), dtype=dtype).element_size()


def build_random_checkpoint(config_path: str | Path, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, device: str = "cpu", overwrite: bool = False,
                            max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Save a ``LlamaForCausalLM`` of ``config_path``'s architecture with random weights into ``folder``.

    The model is built on the meta device (no memory), given storage once on ``device`` and initialized in place:
    Linear and Embedding weights normal with std ``INIT_STD``, norms at one. Tied configs (Llama-3.2-1B/3B) stay
    tied, so the file holds the embedding matrix once. The folder gets the safetensors checkpoint (shards of at most
    ``max_shard_size`` and an index when larger), ``config.json``, the tiny Llama's tokenizer (its 4,096 token ids
    fit any Llama vocabulary) and ``random_checkpoint.json`` saying how it was made. The model is freed before
    returning. The same seed gives the same weights on the same kind of device (CPU and CUDA draw differently).
    """
    config = _read_llama_config(config_path)
    dtype, seed, device = _check_dtype(dtype), _check_seed(seed), _check_device(device)
    folder = _prepare_folder(folder, overwrite)
    needed = _checkpoint_bytes(config, dtype)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"{folder} has {free / 1e9:.2f} GB free; the checkpoint needs {needed / 1e9:.2f} GB.")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _materialize(model, device)
    model.tie_weights()
    drawn = _randomize(model, torch.Generator(device=device).manual_seed(seed))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied != bool(config.tie_word_embeddings):
        raise RuntimeError(f"lm_head tied: {tied}, but the config says "
                           f"tie_word_embeddings={config.tie_word_embeddings}.")
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    del model
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SOURCE / name, folder / name)
    (folder / MARKER_FILE).write_text(json.dumps({
        "config": str(config_path), "dtype": str(dtype).removeprefix("torch."), "seed": seed, "device": device,
        "init_std": INIT_STD, "parameters": parameters, "random_values": drawn, "tied": tied,
        "tokenizer": f"{', '.join(TOKENIZER_FILES)} copied from {TOKENIZER_SOURCE.name}",
    }, indent=2) + "\n")
    _collect(device)
    return folder


def _collect(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, sorted."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors file in {folder}: build it with build_random_checkpoint first.")
    return files


def checkpoint_tensor(folder: str | Path, name: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) safetensors checkpoint, read alone, on the CPU, in its stored dtype."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        if name not in weight_map:
            raise KeyError(f"{name!r} is not in {index}.")
        files = [folder / weight_map[name]]
    else:
        files = checkpoint_files(folder)
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise KeyError(f"{name!r} is not stored in {folder}.")


def random_checkpoint_profile(config_path: str | Path, folder: str | Path, device: str) -> Profile:
    """A ``Profile`` for a random checkpoint (local, not gated), named after its config: e.g. llama-3.2-3b-random."""
    name = Path(config_path).name.removesuffix(".json").removesuffix(".config")
    return Profile(
        name=f"{name}-random",
        model_id=str(folder),
        adapter_id="",
        reference_config=Path(config_path),
        on_hub=False,
        gated=False,
        needs_gpu=device == "cuda",
        description=f"the {name} architecture with random weights, built locally by helpers.scale (no Hub, no token)",
    )


# --------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SmokeResult:
    """One step of the scale smoke: passed (or skipped, which counts as passed), what it found, and how long it took."""

    name: str
    passed: bool
    detail: str
    seconds: float
    skipped: bool = False

    def line(self) -> str:
        """One summary line: status, seconds, name and the detail's first line (shortened)."""
        status = "SKIP" if self.skipped else ("ok" if self.passed else "FAILED")
        first = self.detail.strip().splitlines()[0] if self.detail.strip() else ""
        if len(first) > SUMMARY_DETAIL_CHARS:
            first = first[: SUMMARY_DETAIL_CHARS - 3] + "..."
        return f"{status:>6} {self.seconds:7.1f}s  {self.name}: {first}"


def _record(results: list[SmokeResult], name: str, step: Callable[[], str]) -> bool:
    """Run one step, append its result (a failure keeps its first error line), and say whether it passed."""
    print(f"-- {name}", flush=True)
    started = time.perf_counter()
    try:
        detail, passed = step(), True
    except Exception as error:  # one failure must not hide the others: record it and go on
        detail, passed = f"{type(error).__name__}: {error}", False
        print(f"   FAILED: {detail.splitlines()[0] if detail else ''}", flush=True)
    results.append(SmokeResult(name, passed, detail, time.perf_counter() - started))
    return passed


# --------------------------------------------------------------------------------------------- the checks of one scheme

@dataclass(frozen=True)
class _Context:
    config_path: Path
    config: object
    checkpoint: Path
    device: str
    hardware: Hardware
    profile: Profile
    seed: int


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    import psutil

    return psutil.virtual_memory().available


def scheme_fits(estimate: memory.FootprintEstimate, device: str) -> tuple[bool, str]:
    """Whether a model of ``estimate.true`` bytes fits what is free on the device now, and why.

    It needs its bytes plus a headroom, and on CUDA its bytes must also fit ``DEVICE_MAP_GPU_SHARE`` of the free
    memory, or ``device_map="auto"`` would put part of it on the CPU. (A T4 with about 14.7 GB free takes Llama-3.2-3B
    in float32, 12.85 GB, by both rules.)
    """
    headroom = CUDA_HEADROOM_BYTES if device == "cuda" else CPU_HEADROOM_BYTES
    available = _available_bytes(device)
    needed = estimate.true + headroom
    fits = needed <= available and (device != "cuda" or estimate.true <= DEVICE_MAP_GPU_SHARE * available)
    where = "GPU memory free" if device == "cuda" else "RAM available"
    return fits, (f"needs {needed / 1e9:.2f} GB ({estimate.true / 1e9:.2f} GB of model + "
                  f"{headroom / 1e9:.0f} GB headroom), {where}: {available / 1e9:.2f} GB")


def _allocated(device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _load(ctx: _Context, scheme: str, held: dict) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = from_pretrained_kwargs(ctx.profile, scheme, ctx.hardware)
    model = AutoModelForCausalLM.from_pretrained(ctx.profile.model_id, **kwargs)
    model.eval()
    held["model"] = model
    held["tokenizer"] = AutoTokenizer.from_pretrained(ctx.profile.model_id)
    portable = use_portable_cpu_path(model)
    gc.collect()
    devices = sorted({t.device.type for t in (*model.parameters(), *model.buffers())})
    claims.check(f"every weight on {ctx.device}", devices == [ctx.device], f"found {devices}")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    claims.check("lm_head tied as the config says", tied == bool(ctx.config.tie_word_embeddings))
    import bitsandbytes as bnb

    kinds = {"int8": bnb.nn.Linear8bitLt}.get(scheme, bnb.nn.Linear4bit)
    quantized = sum(isinstance(m, kinds) for m in model.modules()) if scheme in memory.QUANTIZED_SCHEMES else 0
    if scheme in memory.QUANTIZED_SCHEMES:
        expected = len(memory.LINEAR_NAMES) * ctx.config.num_hidden_layers
        claims.check(f"{expected} quantized Linear layers (7 per decoder layer), lm_head kept", quantized == expected,
                     f"found {quantized}")
    return (f"dtype {kwargs['dtype']}, {quantized} quantized Linear layers ({portable} on the portable CPU path), "
            f"tied {tied}, on {ctx.device}")


def _footprint(ctx: _Context, scheme: str, held: dict, estimate: memory.FootprintEstimate) -> str:
    model = held["model"]
    reported, true = model.get_memory_footprint(), memory.true_footprint(model)
    claims.check("get_memory_footprint() == estimate", reported == estimate.reported,
                 f"measured {reported:,}, estimated {estimate.reported:,}")
    claims.check("true_footprint() == estimate", true == estimate.true,
                 f"measured {true:,}, estimated {estimate.true:,}")
    if scheme in memory.FLOAT_SCHEMES:
        counts = parameter_counts_by_component(model)
        claims.check("counts from the modules equal counts from the config",
                     counts == memory.parameter_counts_from_config(ctx.config), f"from the modules {counts}")
    return f"reported {reported:,} bytes, true {true:,} bytes, both as estimated"


def _cuda_growth(before: int, estimate: memory.FootprintEstimate) -> str:
    growth = _allocated("cuda") - before
    allowed = CUDA_GROWTH_SHARE * estimate.true + CUDA_GROWTH_SLACK_BYTES
    difference = growth - estimate.true
    claims.check(f"CUDA memory allocated by the load within {CUDA_GROWTH_SHARE:.0%} + 16 MiB of the estimate",
                 abs(difference) <= allowed, f"allocated {growth:,}, estimated {estimate.true:,}")
    peak = torch.cuda.max_memory_allocated() - before
    return (f"allocated {growth:,} bytes for an estimated {estimate.true:,} ({difference:+,}); "
            f"peak during the load {peak:,}")


def _quant_state_on_cpu(state):
    """A CPU copy of a bitsandbytes QuantState (the layer's own state is left where it is)."""
    from bitsandbytes.functional import QuantState

    copy = QuantState(absmax=state.absmax.cpu(), shape=state.shape, code=state.code.cpu(), blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=state.dtype,
                      offset=state.offset.cpu() if isinstance(state.offset, torch.Tensor) else state.offset,
                      state2=_quant_state_on_cpu(state.state2) if state.nested else None)
    copy.packing_format_for_cpu = getattr(state, "packing_format_for_cpu", False)
    return copy


def stored_nf4_on_cpu(layer: torch.nn.Module) -> quantization.StoredNF4:
    """``quantization.nf4_storage_of`` for a Linear4bit on any device: its bytes and state are read into CPU copies.

    (``nf4_storage_of`` rebuilds a double-quantized absmax with CPU lookup tables, which cannot mix with CUDA tensors.)
    """
    weight = SimpleNamespace(data=layer.weight.data.cpu(), quant_state=_quant_state_on_cpu(layer.weight.quant_state))
    return quantization.nf4_storage_of(SimpleNamespace(weight=weight))


CUDA_FLOAT_RTOL = 1e-5
"""Relative tolerance for float32 scales computed on CUDA. Double quantization subtracts ``absmax.mean()``, and a GPU
sums the ~400,000 block maxima of a Llama-3.2-3B MLP weight in another order than the CPU, so the offset may differ in
its last bits, and each block's scale (the largest |absmax - offset|, several times smaller than the offset) a few
ulps more. 1e-5 (about 80 float32 ulps) allows that and still catches any real error (a wrong block, a missing offset),
which moves values by whole percents."""


def _same_floats(ours: torch.Tensor, theirs: torch.Tensor, device: str) -> bool:
    """Exact on the CPU; on CUDA within ``CUDA_FLOAT_RTOL`` (float32 reductions run in another order there)."""
    theirs = theirs.cpu()
    if device == "cpu":
        return torch.equal(ours, theirs)
    return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=CUDA_FLOAT_RTOL, atol=0)


def _from_scratch(ctx: _Context, scheme: str, held: dict) -> str:
    layer = held["model"].get_submodule(QUANTIZED_LAYER)
    float_weight = checkpoint_tensor(ctx.checkpoint, f"{QUANTIZED_LAYER}.weight")
    if scheme == "int8":
        values, scales = quantization.int8_storage_of(layer)
        ours_values, ours_scales = quantization.quantize_int8_rowwise(float_weight)
        match = quantization.compare_codes(ours_values, values, "int8", ctx.device)
        claims.check(f"from-scratch int8 values == bitsandbytes ({match.describe()})", match.within_tolerance)
        claims.check("from-scratch row scales == bitsandbytes' SCB", torch.equal(ours_scales, scales.cpu()))
        return f"{QUANTIZED_LAYER}: {match.describe()}; {scales.numel():,} row scales identical"
    stored = stored_nf4_on_cpu(layer)
    state_dtype = layer.weight.quant_state.dtype  # the dtype bitsandbytes quantized from (the load's dtype)
    packed, absmax = quantization.quantize_nf4(float_weight.to(state_dtype), stored.blocksize)
    numel = stored.shape.numel()
    match = quantization.compare_codes(quantization.unpack_nf4_codes(packed, numel),
                                       quantization.unpack_nf4_codes(stored.packed, numel), "nf4", ctx.device)
    claims.check(f"from-scratch NF4 codes == bitsandbytes ({match.describe()})", match.within_tolerance)
    detail = f"{QUANTIZED_LAYER} from {state_dtype}: {match.describe()}"
    if stored.nested is None:
        claims.check("from-scratch absmax == stored absmax", _same_floats(absmax, stored.absmax, ctx.device))
        return detail + f"; {absmax.numel():,} absmax identical"
    ours = quantization.double_quantize_absmax(absmax, layer.weight.quant_state.state2.blocksize)
    scale_match = quantization.compare_codes(ours.codes, stored.nested.codes, "absmax-8bit", ctx.device)
    claims.check(f"8-bit scale codes == stored ({scale_match.describe()})", scale_match.within_tolerance)
    rule = "exactly" if ctx.device == "cpu" else f"within {CUDA_FLOAT_RTOL:.0e} relative"
    claims.check(f"float32 scales and offset == stored ({rule})",
                 _same_floats(ours.scales, stored.nested.scales, ctx.device)
                 and _same_floats(ours.offset.reshape(1), stored.nested.offset.reshape(1), ctx.device),
                 f"offset: ours {ours.offset.item()!r}, stored {stored.nested.offset.item()!r}")
    return detail + f"; double quantization: {scale_match.describe()}"


def _dequantize_by_hand(ctx: _Context, held: dict) -> str:
    import bitsandbytes.functional as bnb_functional

    layer = held["model"].get_submodule(QUANTIZED_LAYER)
    state = layer.weight.quant_state
    stored = stored_nf4_on_cpu(layer)
    by_hand = quantization.dequantize_nf4(stored.packed, stored.absmax, stored.shape, stored.blocksize, state.dtype)
    by_bitsandbytes = bnb_functional.dequantize_4bit(layer.weight.data, state).cpu()
    difference = (by_hand.float() - by_bitsandbytes.float()).abs().max().item()
    claims.check("torch.equal(by hand, dequantize_4bit)", torch.equal(by_hand, by_bitsandbytes),
                 f"largest difference {difference:.3e}")
    return f"{QUANTIZED_LAYER}: {stored.shape.numel():,} weights in {state.dtype}, identical"


def _forward(ctx: _Context, held: dict) -> str:
    model, tokenizer = held["model"], held["tokenizer"]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, :FORWARD_TOKENS].to(model_device(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    shape = (1, ids.shape[1], ctx.config.vocab_size)
    claims.check(f"logits of {ids.shape[1]} tokens, shape {shape}, on {ctx.device}",
                 tuple(logits.shape) == shape and logits.device.type == ctx.device, f"got {tuple(logits.shape)} on "
                 f"{logits.device}")
    claims.check("every logit finite", bool(torch.isfinite(logits).all()))
    return f"{ids.shape[1]} tokens -> logits {tuple(logits.shape)} {logits.dtype}, largest |logit| " \
           f"{logits.abs().max().item():.3g}"


def _lora_count(ctx: _Context, held: dict) -> str:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # transformers' deprecation note peft triggers; the notebooks filter it too
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(held["model"], config)
    held["peft_model"] = peft_model
    trainable = peft_model.get_nb_trainable_parameters()[0]
    formula = lora.lora_param_count(ctx.config, LORA_RANK, LORA_TARGETS)
    named = list(peft_model.named_parameters())
    claims.check(f"peft's trainable count {trainable:,} = formula {formula:,}", trainable == formula)
    claims.check("only LoRA trains", all(".lora_A." in n or ".lora_B." in n for n, p in named if p.requires_grad))
    claims.check("every lora_B starts at zero", all(torch.count_nonzero(p) == 0 for n, p in named if ".lora_B." in n))
    return f"r = {LORA_RANK} on {', '.join(LORA_TARGETS)}: {trainable:,} trainable = formula"


def forward_tolerance(dtype: torch.dtype) -> float:
    """Largest difference allowed between peft's output and base + x ΔWᵀ, relative to the output's largest value.

    Both sides round the same sums in ``dtype``: the LoRA product once (peft casts it to the output dtype) and the
    sum once, each within half an ulp, so 4 eps is a safe bound; float32 gets the notebooks' 1e-5 (the two orders of
    summation, B(Ax) against (BA)x, differ by more than an ulp over thousands of terms).
    """
    return max(1e-5, 4 * torch.finfo(dtype).eps)


def _lora_forward(ctx: _Context, held: dict) -> str:
    layer = held["peft_model"].base_model.model.get_submodule(LORA_LAYER)
    generator = torch.Generator().manual_seed(ctx.seed)
    lora_B = layer.lora_B["default"].weight
    with torch.no_grad():
        lora_B.copy_(torch.randn(lora_B.shape, generator=generator) * LORA_B_STD)
        dtype = held["model"].get_input_embeddings().weight.dtype  # what the layer receives inside the model
        x = torch.randn(1, FORWARD_TOKENS, layer.in_features, generator=generator).to(lora_B.device, dtype)
        peft_output = layer(x)
        base_output = layer.base_layer(x)
        by_hand = base_output + (x.float() @ lora.lora_delta_weight(layer).T).to(base_output.dtype)
    scale = by_hand.float().abs().max().item()
    difference = (peft_output.float() - by_hand.float()).abs().max().item()
    tolerance = forward_tolerance(peft_output.dtype)
    claims.check("the adapter changes the layer's output", not torch.equal(peft_output, base_output))
    claims.check(f"PEFT output = base + x ΔWᵀ within {tolerance:.1e} of its size", difference <= tolerance * scale,
                 f"largest difference {difference:.3e}, largest value {scale:.3e}")
    return f"{LORA_LAYER} in {peft_output.dtype}: largest difference {difference:.2e} of values up to {scale:.2e}"


def _release(ctx: _Context, held: dict, baseline: memory.MemorySnapshot, model_bytes: int, memo: dict) -> str:
    _, after = memory.release(*list(held), namespace=held)
    memo["after release"] = after  # the next scheme's baseline: nothing is allocated in between
    if ctx.device == "cuda":
        leftover = after.gpu_allocated - baseline.gpu_allocated
        what = "CUDA memory allocated"
    else:
        leftover = after.tensors - baseline.tensors
        what = "live tensor bytes"
    claims.check(f"memory returned after the release (within {RELEASE_SHARE:.0%})",
                 leftover <= RELEASE_SHARE * model_bytes,
                 f"{leftover:,} bytes of {what} left over for a model of {model_bytes:,}")
    return f"{what} back to {leftover:+,} bytes of before loading (model: {model_bytes:,})"


def _run_scheme(ctx: _Context, scheme: str, results: list[SmokeResult], memo: dict) -> None:
    """Load one scheme, run its checks in an order that reads storage before any forward pass, release it.

    ``memo`` carries the snapshot taken after the previous scheme's release, which serves as this one's baseline
    (walking every live object for a snapshot is the slowest part of a small run).
    """
    kwargs = from_pretrained_kwargs(ctx.profile, scheme, ctx.hardware)
    estimate = memory.estimate_footprint(ctx.config, scheme,
                                         None if scheme in memory.FLOAT_SCHEMES else kwargs["dtype"])
    fits, why = scheme_fits(estimate, ctx.device)
    if not fits:
        print(f"-- {scheme}: skipped, {why}", flush=True)
        results.append(SmokeResult(f"{scheme}: load", True, f"skipped: {why}", 0.0, skipped=True))
        return
    held: dict = {}
    _collect(ctx.device)
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = memo.pop("after release", None) or memory.snapshot(f"{scheme}: before loading")
    _record(results, f"{scheme}: load", lambda: _load(ctx, scheme, held))
    if "model" not in held:  # nothing to check; give back whatever the failed load left
        if held:
            _record(results, f"{scheme}: release", lambda: _release(ctx, held, baseline, estimate.true, memo))
        return
    _record(results, f"{scheme}: footprint == estimate", lambda: _footprint(ctx, scheme, held, estimate))
    if ctx.device == "cuda":
        _record(results, f"{scheme}: CUDA memory == estimate", lambda: _cuda_growth(baseline.gpu_allocated, estimate))
    if scheme in FROM_SCRATCH_SCHEMES:  # before any forward pass, which may re-lay 4-bit storage on a CPU
        _record(results, f"{scheme}: from-scratch == stored", lambda: _from_scratch(ctx, scheme, held))
    if scheme in ("nf4", "nf4-dq"):
        _record(results, f"{scheme}: dequantize by hand == dequantize_4bit", lambda: _dequantize_by_hand(ctx, held))
    _record(results, f"{scheme}: forward pass", lambda: _forward(ctx, held))
    _record(results, f"{scheme}: LoRA count == formula", lambda: _lora_count(ctx, held))
    if "peft_model" in held:  # the adapter was attached, even if its count was wrong
        _record(results, f"{scheme}: LoRA forward == base + x ΔWᵀ", lambda: _lora_forward(ctx, held))
    _record(results, f"{scheme}: release", lambda: _release(ctx, held, baseline, estimate.true, memo))


def _warm_up(device: str) -> str:
    """Run each kernel family once before any baseline is measured, so one-time allocations are not counted as
    leftovers: cuBLAS/cuBLASLt workspaces, bitsandbytes' lookup tables and matmul paths (a tiny Linear8bitLt and
    Linear4bit), the from-scratch code's cached tables. It also shows at once whether bitsandbytes' kernels run here."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    compute_dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):  # the layers' default init must not move the caller's random state
        int8_layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(device)
        nf4_layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                                      compress_statistics=True, quant_storage=torch.uint8).to(device)
    nf4_layer.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        int8_layer(torch.ones(2, 64, device=device, dtype=torch.float16))
        nf4_layer(torch.ones(2, 64, device=device, dtype=compute_dtype))
    del int8_layer, nf4_layer
    for dtype in CHECKPOINT_DTYPES:
        weight = torch.full((64, 64), 0.5, device=device, dtype=dtype)
        torch.nn.functional.linear(torch.ones(2, 64, device=device, dtype=dtype), weight, torch.zeros(64, device=device,
                                                                                                       dtype=dtype))
    sample = torch.linspace(-1, 1, 64 * 64, device=device).reshape(64, 64)
    packed, state = bnb_functional.quantize_4bit(sample, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_functional.dequantize_4bit(packed, state)
    bnb_functional.int8_vectorwise_quant(sample.half())
    nf4_packed, nf4_absmax = quantization.quantize_nf4(sample.cpu())
    quantization.dequantize_absmax(*quantization.double_quantize_absmax(nf4_absmax))
    quantization.quantize_int8_rowwise(sample.cpu())
    _collect(device)
    dtypes = ", ".join(str(d).removeprefix("torch.") for d in CHECKPOINT_DTYPES)
    return f"matmuls in {dtypes}, bitsandbytes' int8 and NF4 layers and kernels ran on {device}"


def run_scale_smoke(config_path: str | Path, work_dir: str | Path, device: str,
                    schemes: Sequence[str] = DEFAULT_SCHEMES, seed: int = 0, keep: bool = False,
                    dtype: torch.dtype = torch.bfloat16) -> list[SmokeResult]:
    """Build a random checkpoint of ``config_path`` under ``work_dir``, check every scheme on ``device``, clean up.

    Returns one ``SmokeResult`` per step, in order; a failed step never stops the others (a failed load skips the
    rest of that scheme). The checkpoint folder (``work_dir/checkpoint``) is deleted at the end unless ``keep``.
    """
    config = _read_llama_config(config_path)
    device, seed, dtype = _check_device(device), _check_seed(seed), _check_dtype(dtype)
    schemes = _check_schemes(schemes)
    if not isinstance(work_dir, (str, Path)):
        raise TypeError(f"work_dir must be a path, got {type(work_dir).__name__}.")
    checkpoint = Path(work_dir) / "checkpoint"
    hardware = detect_hardware() if device == "cuda" else Hardware(device="cpu")
    ctx = _Context(Path(config_path), config, checkpoint, device, hardware,
                   random_checkpoint_profile(config_path, checkpoint, device), seed)
    results: list[SmokeResult] = []
    _record(results, "warm up the kernels", lambda: _warm_up(device))
    built = _record(results, "build the random checkpoint", lambda: _build_step(ctx, dtype))
    if built:
        memo: dict = {}
        for scheme in schemes:
            _run_scheme(ctx, scheme, results, memo)
    if not keep and _is_our_checkpoint(checkpoint):
        _record(results, "delete the checkpoint", lambda: _delete_step(checkpoint))
    return results


def _build_step(ctx: _Context, dtype: torch.dtype) -> str:
    build_random_checkpoint(ctx.config_path, ctx.checkpoint, dtype, ctx.seed, ctx.device, overwrite=True)
    files = checkpoint_files(ctx.checkpoint)
    stored = sum(f.stat().st_size for f in files)
    made = json.loads((ctx.checkpoint / MARKER_FILE).read_text())
    return (f"{made['parameters']:,} parameters in {made['dtype']}, tied {made['tied']}: {stored:,} bytes in "
            f"{len(files)} safetensors file(s) at {ctx.checkpoint}")


def _delete_step(checkpoint: Path) -> str:
    stored = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    shutil.rmtree(checkpoint)
    return f"{stored:,} bytes freed on disk"


# --------------------------------------------------------------------------------------------- command line

def summary(results: Sequence[SmokeResult]) -> str:
    """One screen: a line per step, then the counts and the total time."""
    failed = sum(not r.passed for r in results)
    skipped = sum(r.skipped for r in results)
    passed = len(results) - failed - skipped
    lines = [r.line() for r in results]
    lines.append(f"scale smoke: {passed} ok, {failed} FAILED, {skipped} skipped in "
                 f"{sum(r.seconds for r in results):.1f} s")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.scale",
        description="Check the course's claims that need no trained weights on a real Llama architecture with "
                    "random weights: no Hub, no token. Exit code 0: every check passed; 1: a check failed; "
                    "2: cannot run here.")
    parser.add_argument("--config", default=str(DATA_DIR / "reference" / "llama-3.2-3b.config.json"),
                        help="the architecture config.json (default: Llama-3.2-3B)")
    parser.add_argument("--work", default="build/scale-smoke", help="folder for the random checkpoint")
    parser.add_argument("--device", choices=DEVICES, default="cuda",
                        help="where to build, load and check (default cuda)")
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                        help=f"comma-separated schemes in order, from {', '.join(memory.SCHEMES)} "
                             f"(default {','.join(DEFAULT_SCHEMES)}; any that does not fit is skipped)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (it is deleted by default)")
    parser.add_argument("--list-cells", action="store_true", help="print which notebook cells this covers, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit code (0 all passed, 1 a check failed, 2 cannot run here)."""
    args = _parser().parse_args(argv)
    if args.list_cells:
        print(coverage_table())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"scale smoke refused: --device cuda, but no CUDA device is available here (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}). Run it on a CUDA machine, or use --device cpu with a small config.",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub
    from helpers.environment import quiet_known_noise

    quiet_known_noise(verbose=False)
    try:
        schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
        results = run_scale_smoke(args.config, args.work, args.device, schemes, seed=args.seed, keep=args.keep)
    except (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"scale smoke refused: {error}", file=sys.stderr)
        return 2
    print(f"scale smoke of {args.config} on {detect_hardware().describe() if args.device == 'cuda' else 'the CPU'}, "
          f"schemes {', '.join(schemes)}")
    print(summary(results))
    loads = [r for r in results if r.name.endswith(": load")]
    if loads and all(r.skipped for r in loads):
        print("scale smoke: no scheme fits this device, so nothing was checked.", file=sys.stderr)
        return 1
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
