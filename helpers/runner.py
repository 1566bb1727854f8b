"""Execute the course notebooks top to bottom, and summarize what each measured.

``python -m helpers.runner run``      executes every notebook into build/ (the committed ones stay untouched)
``python -m helpers.runner refresh``  re-executes the committed notebooks in place (new reference outputs)
``python -m helpers.runner portability`` strict nbval over every notebook under other CPU instruction-set levels
                                      and thread counts than the pinned ones (run it before re-recording outputs)
``python -m helpers.runner gpu-test`` the GPU lane: ``pytest --nbval-lax`` over every notebook on a real Llama
                                      profile, Hub access on (see README, "The GPU lane")

A notebook marks the code cell whose output summarizes it with the cell tag ``summary``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
SUMMARY_TAG = "summary"


def course_notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute(notebook_path: Path, output_path: Path, timeout: int = 1800):
    """Run one notebook in a fresh kernel, from its own folder, and write the executed copy."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # per-cell timestamps would make every refresh a noisy diff
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            # the kernel is local; its warning about unencrypted local TCP is noise here
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(notebook_path.parent)}})
    try:
        client.execute()
    finally:  # a failed notebook is kept too, with the error in the failing cell: that is the copy people need
        output_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, output_path)
    return notebook


def summary_of(notebook) -> str:
    """The text printed by the cell tagged ``summary`` (empty if the notebook has none)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout")
    return ""


GPU_LANE_EXIT_REFUSED = 2


def gpu_lane_refusal(cuda_available: bool, profile_name: str | None, has_token: bool) -> str | None:
    """Why the GPU lane cannot start here, or None when it can (pure)."""
    from helpers import profiles

    if not cuda_available:
        return ("The GPU lane needs a CUDA GPU and this machine has none. Run it on a GPU runner (see "
                ".github/workflows/gpu-lane.yml); on this machine use `make test`, the offline lane.")
    if profile_name is not None:
        try:
            profile = profiles.get_profile(profile_name)
        except ValueError as error:
            return str(error)
        if not profile.on_hub:
            return f"The GPU lane checks a Hub profile; {profile.name!r} is the offline one (use `make test`)."
        if profile.gated and not has_token:
            return (f"{profile.model_id} is gated: accept its license on {profile.model_page} and export HF_TOKEN "
                    "(a read token) before running the GPU lane.")
    return None


def run_gpu_lane(profile_name: str | None, timeout_per_notebook: int) -> int:
    """pytest --nbval-lax over every notebook with a Hub profile; executed copies kept in build/gpu/."""
    import subprocess

    import torch

    from helpers import environment, profiles

    os.environ["HF_HUB_OFFLINE"] = "0"
    cuda = torch.cuda.is_available()
    if cuda and profile_name is None:
        profile_name = profiles.automatic_profile_name(environment.detect_hardware())[0]
    has_token = cuda and profiles.hub_token_available()
    refusal = gpu_lane_refusal(cuda, profile_name, has_token)
    if refusal:
        print(f"gpu-test refused: {refusal}", file=sys.stderr)
        return GPU_LANE_EXIT_REFUSED
    env = {**os.environ, profiles.PROFILE_ENV_VAR: profile_name, "HF_HUB_OFFLINE": "0"}
    failures = 0
    for path in course_notebooks():
        print(f"=== {path.name} on {profile_name}", flush=True)
        command = [sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={timeout_per_notebook}",
                   "-p", "no:cacheprovider", str(path)]
        try:
            result = subprocess.run(command, env=env, cwd=REPO_ROOT, timeout=timeout_per_notebook)
            failures += result.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"{path.name}: over the {timeout_per_notebook} s limit")
            failures += 1
        try:  # an executed copy for people to read, whatever the test said
            os.environ[profiles.PROFILE_ENV_VAR] = profile_name
            execute(path, BUILD_DIR / "gpu" / path.name, timeout=timeout_per_notebook)
        except Exception as error:
            print(f"{path.name}: executed copy incomplete ({type(error).__name__})")
    print(f"{len(course_notebooks()) - failures} notebooks passed, {failures} failed on {profile_name}")
    return 1 if failures else 0


def portability_settings(native_capability: str) -> list[dict[str, str]]:
    """The numeric settings the portability check runs under (pure).

    The committed outputs are recorded with the pins of ``helpers.PINNED_CPU_NUMERICS`` (AVX2 kernels, 2 threads).
    The check runs the notebooks with PyTorch's portable C++ kernels (capability ``default``, no vector
    instructions) on 1 thread, and with this CPU's own best kernels on 3 threads: if a compared output depended on
    the instruction set or the core count, one of the two would differ from the committed text.
    """
    native = native_capability.lower()
    return [
        {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        {"ATEN_CPU_CAPABILITY": native, "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"},
    ]


def run_portability_check(notebooks: list[Path]) -> int:
    """Strict nbval over the notebooks under each setting of ``portability_settings``; a summary at the end."""
    import re
    import subprocess

    import torch

    native = "avx512" if torch.cpu._is_avx512_supported() else "avx2" if torch.cpu._is_avx2_supported() else "default"
    failures: list[str] = []
    for setting in portability_settings(native):
        label = ", ".join(f"{name}={value}" for name, value in setting.items())
        print(f"=== strict nbval with {label}", flush=True)
        command = [sys.executable, "-m", "pytest", "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg",
                   "--nbval-cell-timeout=900", "-q", "-p", "no:cacheprovider", "-rf",
                   *[str(path.relative_to(REPO_ROOT)) for path in notebooks]]
        result = subprocess.run(command, env={**os.environ, **setting}, cwd=REPO_ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(result.stdout, flush=True)  # nbval names each differing cell and prints both texts
        failed_items = re.findall(r"^FAILED (\S+)", result.stdout, flags=re.MULTILINE)
        failures += [f"{item} [{label}]" for item in failed_items]
        if result.returncode != 0 and not failed_items:
            failures.append(f"pytest exited with {result.returncode} [{label}]")
    print("portability check: " + ("every compared output is the same under every setting" if not failures else
                                   f"{len(failures)} differences:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course notebooks top to bottom.")
    parser.add_argument("mode", choices=["run", "refresh", "portability", "gpu-test"],
                        help="run: into build/; refresh: in place; portability: other CPU settings; "
                             "gpu-test: the GPU lane")
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--profile", default=None, help="gpu-test: a Hub profile (default: the automatic choice)")
    parser.add_argument("--timeout", type=int, default=3600, help="gpu-test: seconds per notebook")
    args = parser.parse_args(argv)
    if args.mode == "gpu-test":
        return run_gpu_lane(args.profile or None, args.timeout)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = [NOTEBOOK_DIR / name for name in args.notebooks] if args.notebooks else course_notebooks()
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.mode == "portability":
        return run_portability_check(chosen)
    failures = 0
    for path in chosen:
        target = path if args.mode == "refresh" else BUILD_DIR / path.name
        started = time.time()
        print(f"=== {path.name} ", flush=True)
        try:
            notebook = execute(path, target)
        except Exception as error:  # report every notebook, then fail
            failures += 1
            print(f"FAILED after {time.time() - started:.0f} s: {type(error).__name__}: {str(error)[-2000:]}")
            continue
        print(summary_of(notebook).rstrip() or "(no summary cell)")
        print(f"--- executed in {time.time() - started:.0f} s -> {target.relative_to(REPO_ROOT)}\n", flush=True)
    print(f"{len(chosen) - failures} notebooks executed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
