"""Where the notebook runs: Colab or not, CPU or which GPU, online or offline; seeding; quieting known noise.

Nothing here imports bitsandbytes: `quiet_known_noise` must run before the first import of it, because
bitsandbytes logs its one known warning at import time.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import helpers

from helpers.colab import REPOSITORY_BRANCH, REPOSITORY_NAME, REPOSITORY_URL  # noqa: F401  (named in one place)
from helpers.colab import in_colab  # noqa: F401  (one definition, importable before torch)

BF16_NATIVE_MIN_CAPABILITY = (8, 0)
"""Ampere (compute capability 8.0) is the first NVIDIA generation with bfloat16 tensor cores."""

COURSE_PACKAGES = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "matplotlib")


@dataclass(frozen=True)
class Hardware:
    """What a profile choice and a loading plan depend on, and nothing else (so tests can fake it)."""

    device: str  # "cuda" or "cpu"
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    gpu_memory_bytes: int | None = None
    cpu_bf16_native: bool | None = None  # AVX512-BF16 or AMX on the host CPU; None when unknown
    rehearsal: bool = False  # decisions for this GPU, execution on the CPU (helpers.rehearsal, make rehearse)

    @property
    def execution_device(self) -> str:
        """Where tensors really go: the device, except in a rehearsal, which runs on the CPU."""
        return "cpu" if self.rehearsal else self.device

    @property
    def bf16_native(self) -> bool:
        """True only where bfloat16 runs in hardware (capability 8.0+), not where it is emulated."""
        return self.compute_capability is not None and self.compute_capability >= BF16_NATIVE_MIN_CAPABILITY

    def describe(self) -> str:
        """One line about the device. For a CPU it does not name the CPU's instruction sets, so it prints the same
        on every CPU (``describe_cpu`` does name them)."""
        if self.device == "cpu":
            return "CPU only (no CUDA GPU)"
        major, minor = self.compute_capability or (0, 0)
        text = f"{self.gpu_name}, {(self.gpu_memory_bytes or 0) / 1e9:.1f} GB, compute capability {major}.{minor}"
        return text + (" (rehearsed: its decisions, executed on this CPU)" if self.rehearsal else "")


CPU = Hardware(device="cpu")
T4 = Hardware(device="cuda", gpu_name="Tesla T4", compute_capability=(7, 5), gpu_memory_bytes=15_828_320_256)
A100_40GB = Hardware(device="cuda", gpu_name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
                     gpu_memory_bytes=42_474_471_424)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), read from the CPU, not from the pin."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


REHEARSAL_ENV_VAR = "COURSE_REHEARSAL"
"""Set to ``t4`` or ``a100-40gb`` by ``make rehearse``: every decision is made for that GPU, everything runs here."""


def rehearsed_hardware(name: str) -> Hardware:
    """The GPU a rehearsal makes its decisions for (``COURSE_REHEARSAL``), executing on the CPU."""
    choices = {"t4": T4, "a100-40gb": A100_40GB}
    if name.strip().lower() not in choices:
        raise ValueError(f"{REHEARSAL_ENV_VAR} must be one of {', '.join(choices)}, got {name!r}")
    from dataclasses import replace

    return replace(choices[name.strip().lower()], rehearsal=True, cpu_bf16_native=cpu_has_native_bf16())


_FLOAT16_PRODUCT_LIBRARY = None


def emulate_gpu_float16_products() -> bool:
    """From now on in this process, compute every float16 matrix product on the CPU as a GPU does: the float16
    inputs multiplied with float32 accumulation, the result rounded once to float16. True the first time.

    The rehearsal needs it: a CPU without native float16 arithmetic runs PyTorch's float16 GEMM about 100 times
    slower than float32 (0.8 against 83 GFLOP/s measured on one core of an AMD EPYC), which a T4's float16 decisions
    would make the lane's bottleneck. A T4's tensor cores accumulate float16 products in float32, so this is also
    closer to the GPU than the CPU's own kernel.

    It replaces the CPU kernels of ``aten::mm`` and ``aten::bmm`` (what ``nn.Linear`` without bias, ``@`` and
    ``matmul`` reach, in forward and backward passes, from Python or C++) with ones that call ``addmm`` /
    ``baddbmm`` with ``beta=0``: the same BLAS product for float32, float32 inputs for float16 and bfloat16 ones (an
    A100's bfloat16 tensor cores also accumulate in float32; a CPU without AVX512-BF16 multiplies bfloat16 slowly).
    Only the product kernels pay a Python call; a mode that saw every operator cost 5 times on a loop of small ones.
    """
    global _FLOAT16_PRODUCT_LIBRARY
    if _FLOAT16_PRODUCT_LIBRARY is not None:
        return False
    SIXTEEN_BIT = (torch.float16, torch.bfloat16)  # bfloat16 too: a CPU without AVX512-BF16 (Zen 3) is slow there

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in SIXTEEN_BIT:
            return torch.addmm(a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32), a.float(), b.float(),
                               beta=0).to(a.dtype)
        return torch.addmm(a.new_empty((a.shape[0], b.shape[1])), a, b, beta=0)

    def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = (a.shape[0], a.shape[1], b.shape[2])
        if a.dtype in SIXTEEN_BIT:
            return torch.baddbmm(a.new_empty(shape, dtype=torch.float32), a.float(), b.float(), beta=0).to(a.dtype)
        return torch.baddbmm(a.new_empty(shape), a, b, beta=0)

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        library.impl("mm", mm, "CPU")
        library.impl("bmm", bmm, "CPU")
    _FLOAT16_PRODUCT_LIBRARY = library
    return True


def detect_hardware() -> Hardware:
    """Read the hardware of this machine (the first CUDA device if there is one), or the rehearsed GPU."""
    if os.environ.get(REHEARSAL_ENV_VAR, "").strip():
        return rehearsed_hardware(os.environ[REHEARSAL_ENV_VAR])
    bf16 = cpu_has_native_bf16()
    if not torch.cuda.is_available():
        return Hardware(device="cpu", cpu_bf16_native=bf16)
    properties = torch.cuda.get_device_properties(0)
    return Hardware(
        device="cuda",
        gpu_name=properties.name,
        compute_capability=(properties.major, properties.minor),
        gpu_memory_bytes=properties.total_memory,
        cpu_bf16_native=bf16,
    )


def describe_cpu() -> str:
    """The CPU's vector instruction sets and the numeric pins in force: what decides CPU results and speed."""
    flags = {"AVX2": torch.cpu._is_avx2_supported(), "AVX-512": torch.cpu._is_avx512_supported(),
             "AVX512-BF16": torch.cpu._is_avx512_bf16_supported(), "AMX": torch.cpu._is_amx_tile_supported()}
    has = ", ".join(name for name, present in flags.items() if present) or "none of AVX2/AVX-512/AMX"
    pins = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in helpers.PINNED_CPU_NUMERICS)
    late = " (torch was imported before helpers: the pins may not apply)" if helpers.TORCH_WAS_IMPORTED_FIRST else ""
    return (f"{platform.processor() or platform.machine()} with {has}; PyTorch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; {pins}{late}")


def portable_randn(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal float32 values that are the same on every CPU.

    ``torch.randn`` draws its normal values with code compiled per instruction set, so the same seed gives other
    numbers under another CPU capability. NumPy's generator (PCG64, ziggurat) is plain C with no such dispatch.
    """
    if not shape or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"portable_randn needs positive int sizes, got {shape!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(values)


def hub_offline() -> bool:
    """True when the Hugging Face Hub must not be contacted (HF_HUB_OFFLINE set to a true value)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def seed_everything(seed: int = 0) -> None:
    """Seed Python, torch (CPU and CUDA) so that sampling and random tensors repeat."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)


def package_versions(packages: tuple[str, ...] = COURSE_PACKAGES) -> dict[str, str]:
    """The version each package runs at: the imported module's ``__version__`` (what this session really uses,
    even after an install replaced the files), else the installed distribution's, marked as not imported yet."""
    from helpers import colab

    versions = {"python": platform.python_version()}
    loaded = colab.loaded_versions(packages, sys.modules)
    for name in packages:
        if colab.module_name(name) in loaded:
            versions[name] = loaded[colab.module_name(name)]
            continue
        try:
            versions[name] = f"{importlib.metadata.version(name)} (not imported yet)"
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


LESSON_PACKAGES = ("torch", "numpy", "matplotlib")
"""What a lesson without a model (notebook 00) computes and draws with."""


def versions_line(packages: tuple[str, ...] = COURSE_PACKAGES) -> str:
    """One line: python and each package at the version it runs at, then how PyTorch computes on this CPU."""
    versions = package_versions(packages)
    text = ", ".join(f"{name} {version.removesuffix(' (not imported yet)')}" for name, version in versions.items())
    late = "; torch was imported before helpers, so the CPU pins may not apply" if helpers.TORCH_WAS_IMPORTED_FIRST else ""
    threads = torch.get_num_threads()
    return (f"{text}; PyTorch CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{threads} thread{'s' if threads != 1 else ''}{late}")


def print_versions() -> None:
    """Print package versions and the hardware: the first thing to compare when a result differs."""
    for name, version in package_versions().items():
        print(f"{name:>13}: {version}")
    print(f"{'hardware':>13}: {detect_hardware().describe()}")
    print(f"{'cpu':>13}: {describe_cpu()}")
    print(f"{'colab':>13}: {in_colab()}   hub offline: {hub_offline()}")


_KNOWN_NOISE = {
    "progress bars": "transformers' and huggingface_hub's loading/saving bars (and tqdm's note about ipywidgets)",
    "bitsandbytes kernels line": "bitsandbytes' note that the optional `kernels` package (Hub-fetched CPU "
                                 "kernels) is missing; the built-in CPU kernels are used instead",
    "LLM.int8 cast note": "bitsandbytes' log line `MatMul8bitLt: inputs will be cast from torch.float32 to float16 "
                          "during quantization`, repeated on every call (the cast is how LLM.int8 works)",
    "transformers info/warnings": "transformers' logging below ERROR (e.g. generation-config notes)",
}
_quieted = False


class _Int8CastFilter(logging.Filter):
    """Drops only bitsandbytes' `MatMul8bitLt: inputs will be cast ...` record; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


def quiet_known_noise(verbose: bool = True) -> list[str]:
    """Silence the known, harmless noise of the offline profile and say once what was silenced.

    Call it before anything imports bitsandbytes. Returns the names of what was silenced.
    """
    global _quieted
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes logs the LLM.int8 cast through `logging`, on every call; a `warnings` filter would not see it
    int8_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastFilter) for f in int8_logger.filters):
        int8_logger.addFilter(_Int8CastFilter())
    warnings.filterwarnings("ignore", message=r"IProgress not found")  # tqdm.auto without ipywidgets
    import huggingface_hub.utils
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if verbose and not _quieted:  # one line: the lesson, not the setup, should open the notebook
        print(f"Silenced known noise, nothing else: {', '.join(_KNOWN_NOISE)} "
              f"(helpers.environment.describe_known_noise() says what each is)")
    _quieted = True
    return list(_KNOWN_NOISE)


def describe_known_noise() -> None:
    """Print what :func:`quiet_known_noise` silences, and why each is harmless."""
    for name, what in _KNOWN_NOISE.items():
        print(f"  - {name}: {what}")
