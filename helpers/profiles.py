"""Profiles: which model, adapter, reference config and dtypes a notebook uses, chosen from the hardware.

The same notebook cells run everywhere; only the profile changes. The choice is automatic (a pure function
of the hardware, tested with fake hardware) and can be overridden by the notebook's ``PROFILE`` parameter
or the ``COURSE_PROFILE`` environment variable, in that order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from helpers import environment, workload
from helpers.environment import Hardware, detect_hardware, hub_offline

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
PROFILE_ENV_VAR = "COURSE_PROFILE"
LARGE_GPU_MIN_BYTES = 40 * 10**9
"""Llama-3.1-8B in float32 needs about 32 GB of weights alone, so the 8B profile needs a 40 GB-class GPU."""


@dataclass(frozen=True)
class Profile:
    """Everything a notebook needs to know about the model it teaches with."""

    name: str
    model_id: str  # a Hub repo id, or a local folder for the offline profile
    adapter_id: str
    reference_config: Path  # architecture facts, usable offline on the meta device
    on_hub: bool
    gated: bool
    needs_gpu: bool
    description: str

    @property
    def model_page(self) -> str:
        return f"https://huggingface.co/{self.model_id}" if self.on_hub else str(self.model_id)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        model_id=str(DATA_DIR / "tiny-llama"),
        adapter_id=str(DATA_DIR / "pricer-adapter"),
        reference_config=DATA_DIR / "tiny-llama" / "config.json",
        on_hub=False,
        gated=False,
        needs_gpu=False,
        description="the course's own tiny Llama, trained on the King James Bible and product listings, shipped in data/ (CPU, offline)",
    ),
    "llama-3.2-3b": Profile(
        name="llama-3.2-3b",
        model_id="meta-llama/Llama-3.2-3B",
        adapter_id="ed-donner/price-2025-11-30_15.10.55-lite",
        reference_config=DATA_DIR / "reference" / "llama-3.2-3b.config.json",
        on_hub=True,
        gated=True,
        needs_gpu=True,
        description="Meta's Llama-3.2-3B from the Hub: its float32 weights fit a T4",
    ),
    "llama-3.1-8b": Profile(
        name="llama-3.1-8b",
        model_id="meta-llama/Llama-3.1-8B",
        adapter_id="ed-donner/pricer-2024-09-13_13.04.39",
        reference_config=DATA_DIR / "reference" / "llama-3.1-8b.config.json",
        on_hub=True,
        gated=True,
        needs_gpu=True,
        description="Meta's Llama-3.1-8B from the Hub, as in the original course: float32 needs a 40 GB GPU",
    ),
}


def automatic_profile_name(hardware: Hardware) -> tuple[str, str]:
    """The profile this hardware should use, and why (pure: no I/O)."""
    if hardware.device != "cuda":
        return "tiny", "no CUDA GPU found"
    memory_gb = (hardware.gpu_memory_bytes or 0) / 1e9
    if (hardware.gpu_memory_bytes or 0) >= LARGE_GPU_MIN_BYTES:
        return "llama-3.1-8b", f"{hardware.gpu_name} has {memory_gb:.0f} GB, enough for Llama-3.1-8B in float32"
    return "llama-3.2-3b", f"{hardware.gpu_name} has {memory_gb:.0f} GB: Llama-3.2-3B fits in float32, 3.1-8B would not"


def get_profile(name: str) -> Profile:
    """Look a profile up by name, with a message listing the valid names when it is unknown."""
    if not isinstance(name, str) or name.strip().lower() not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}. Choose one of: {', '.join(PROFILES)} "
                         f"(or None for the automatic choice).")
    return PROFILES[name.strip().lower()]


def resolve_profile_name(requested: str | None, hardware: Hardware, environ: dict[str, str]) -> tuple[str, str]:
    """Apply the override order: notebook parameter, then environment variable, then automatic (pure)."""
    if requested:
        return get_profile(requested).name, "requested in the notebook (PROFILE parameter)"
    from_env = environ.get(PROFILE_ENV_VAR, "").strip()
    if from_env:
        return get_profile(from_env).name, f"requested by the {PROFILE_ENV_VAR} environment variable"
    return automatic_profile_name(hardware)


def check_profile_usable(profile: Profile, hardware: Hardware, offline: bool, has_token: bool) -> None:
    """Raise a clear error when the profile cannot run here (pure: the caller supplies the facts)."""
    if profile.needs_gpu and hardware.device != "cuda":
        raise RuntimeError(
            f"Profile {profile.name!r} needs a CUDA GPU and this machine has none. Use PROFILE = 'tiny' "
            f"(or unset {PROFILE_ENV_VAR}); on Colab choose Runtime > Change runtime type > T4 GPU.")
    if profile.on_hub and offline and not hardware.rehearsal:  # a rehearsal reads its own local cache
        raise RuntimeError(
            f"Profile {profile.name!r} downloads {profile.model_id} from the Hugging Face Hub, but HF_HUB_OFFLINE "
            f"is set. Unset HF_HUB_OFFLINE to allow downloads, or use PROFILE = 'tiny', which is shipped in data/.")
    if profile.gated and not has_token and not hardware.rehearsal:
        raise RuntimeError(
            f"{profile.model_id} is gated: accept Meta's license on {profile.model_page} with your Hugging Face "
            f"account, create a read token, then provide it as HF_TOKEN (on Colab: the key icon > add a secret "
            f"named HF_TOKEN and allow notebook access; elsewhere: `export HF_TOKEN=...` or `hf auth login`).")


def hub_token_available() -> bool:
    """Whether huggingface_hub can find a token (environment, login cache or Colab secret). Never returns it."""
    from huggingface_hub import get_token

    return get_token() is not None


def choose_profile(requested: str | None = None, hardware: Hardware | None = None) -> Profile:
    """Choose, check and announce the profile for this notebook.

    ``requested`` is the notebook's PROFILE parameter (None = automatic). Prints the choice and the reason.
    """
    hardware = hardware or detect_hardware()
    name, reason = resolve_profile_name(requested, hardware, dict(os.environ))
    profile = PROFILES[name]
    check_profile_usable(profile, hardware, offline=hub_offline(),
                         has_token=(not profile.gated) or hardware.rehearsal or hub_token_available())
    others = " or ".join(f'"{other}"' for other in PROFILES if other != profile.name)
    print(f"Profile {profile.name}: {profile.description}; {reason}. "
          f"To choose: PROFILE = {others} above, or {PROFILE_ENV_VAR}.")
    if hardware.rehearsal:
        print(f"  rehearsal: {hardware.describe()}")
        if environment.emulate_gpu_float16_products():
            print("  float16 and bfloat16 matrix products: float32 accumulation, rounded once, as on the GPU "
                  "(this CPU's own float16 GEMM is about 100x slower)")
    work = workload.current()  # a wrong COURSE_WORKLOAD stops here, with the choices
    if work.reduced:  # the full lesson prints nothing here
        print(f"  workload: {work.describe()}, set by {workload.WORKLOAD_ENV_VAR}; unset it for the lesson's sizes")
    return profile
