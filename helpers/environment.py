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
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPOSITORY_URL = "https://github.com/llm-quantization-course/llm-quantization-course"
"""The course's repository: the Colab badges and setup cells point here (tests/test_notebooks.py checks it)."""

REPOSITORY_NAME = REPOSITORY_URL.rstrip("/").rsplit("/", 1)[-1]

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

    @property
    def bf16_native(self) -> bool:
        """True only where bfloat16 runs in hardware (capability 8.0+), not where it is emulated."""
        return self.compute_capability is not None and self.compute_capability >= BF16_NATIVE_MIN_CAPABILITY

    def describe(self) -> str:
        if self.device == "cpu":
            return "CPU only (no CUDA GPU)"
        major, minor = self.compute_capability or (0, 0)
        gib = (self.gpu_memory_bytes or 0) / 2**30
        return f"{self.gpu_name}, {gib:.1f} GiB, compute capability {major}.{minor}"


CPU = Hardware(device="cpu")
T4 = Hardware(device="cuda", gpu_name="Tesla T4", compute_capability=(7, 5), gpu_memory_bytes=15_828_320_256)
A100_40GB = Hardware(device="cuda", gpu_name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
                     gpu_memory_bytes=42_474_471_424)


def detect_hardware() -> Hardware:
    """Read the hardware of this machine (the first CUDA device if there is one)."""
    if not torch.cuda.is_available():
        return CPU
    properties = torch.cuda.get_device_properties(0)
    return Hardware(
        device="cuda",
        gpu_name=properties.name,
        compute_capability=(properties.major, properties.minor),
        gpu_memory_bytes=properties.total_memory,
    )


def in_colab() -> bool:
    return "google.colab" in sys.modules


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
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def print_versions() -> None:
    """Print package versions and the hardware: the first thing to compare when a result differs."""
    for name, version in package_versions().items():
        print(f"{name:>13}: {version}")
    print(f"{'hardware':>13}: {detect_hardware().describe()}")
    print(f"{'colab':>13}: {in_colab()}   hub offline: {hub_offline()}")


def requirements_without_torch(requirements: str | Path) -> list[str]:
    """The pinned requirements minus torch, for machines whose CUDA build of torch must stay (Colab, GPU runners)."""
    lines = Path(requirements).read_text().splitlines()
    return [line.strip() for line in lines
            if line.strip() and not line.lstrip().startswith("#")
            and re.split(r"[=<>!~\[ ;]", line.strip(), maxsplit=1)[0].lower() != "torch"]


def install_on_colab(repo_root: Path) -> None:
    """On Colab, install the pinned requirements except torch (Colab's CUDA build must stay). Elsewhere: nothing."""
    if not in_colab():
        return
    packages = requirements_without_torch(Path(repo_root) / "requirements.txt")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *packages], check=True)


_KNOWN_NOISE = {
    "progress bars": "transformers' and huggingface_hub's loading/saving bars (and tqdm's note about ipywidgets)",
    "bitsandbytes kernels line": "bitsandbytes' note that the optional `kernels` package (Hub-fetched CPU "
                                 "kernels) is missing; the built-in CPU kernels are used instead",
    "LLM.int8 cast warning": "`MatMul8bitLt: inputs will be cast from torch.float32 to float16`, repeated on every call",
    "transformers info/warnings": "transformers' logging below ERROR (e.g. generation-config notes)",
}
_quieted = False


def quiet_known_noise(verbose: bool = True) -> list[str]:
    """Silence the known, harmless noise of the offline profile and say once what was silenced.

    Call it before anything imports bitsandbytes. Returns the names of what was silenced.
    """
    global _quieted
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from")
    warnings.filterwarnings("ignore", message=r"IProgress not found")  # tqdm.auto without ipywidgets
    import huggingface_hub.utils
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if verbose and not _quieted:
        print("Silenced known noise (nothing else is hidden):")
        for name, what in _KNOWN_NOISE.items():
            print(f"  - {name}: {what}")
    _quieted = True
    return list(_KNOWN_NOISE)
