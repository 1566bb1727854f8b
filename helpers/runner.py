"""Execute the course notebooks top to bottom, and summarize what each measured.

``python -m helpers.runner run``      executes every notebook into build/ (the committed ones stay untouched)
``python -m helpers.runner refresh``  re-executes the committed notebooks in place (new reference outputs)
``python -m helpers.runner portability`` strict nbval over every notebook under other CPU instruction-set levels
                                      and thread counts than the pinned ones (run it before re-recording outputs)
``python -m helpers.runner gpu-smoke`` the GPU smoke lane: every notebook on the tiny profile placed on the GPU,
                                      no Hub, no token; executed copies and junit.xml in build/gpu-smoke/
``python -m helpers.runner gpu-test`` the Hub lane: every notebook on a real Llama profile, Hub access on
``python -m helpers.runner gpu-setup`` the pinned requirements, torch excepted, into this Python (only what is missing;
                                      from wheelhouse/ alone when it exists, see helpers/wheelhouse.py)

Both GPU lanes are ``pytest --nbval-lax`` over the notebooks, with ``helpers.nbval_keep`` keeping what nbval executed
(see README, "The GPU lanes").

A notebook marks the code cell whose output summarizes it with the cell tag ``summary``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
SUMMARY_TAG = "summary"


NOTEBOOK_NAME = re.compile(r"(\d\d[a-z]?)_\w+\.ipynb")
"""A course notebook's file name: its key (``03``; an optional deep dive after lesson 03 is ``03a``), then a name."""


def notebook_key(path: Path | str) -> str:
    """The key of a course notebook (``"03"`` for 03_nf4.ipynb, ``"03a"`` for a deep dive that follows it)."""
    found = NOTEBOOK_NAME.fullmatch(Path(path).name)
    if found is None:
        raise ValueError(f"not a course notebook name (NN_name.ipynb or NNa_name.ipynb): {Path(path).name!r}")
    return found.group(1)


def course_notebooks() -> list[Path]:
    """Every course notebook in course order: the lessons 00, 01, ... with each optional deep dive (``03a_...``)
    right after the lesson it deepens."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb") if NOTEBOOK_NAME.fullmatch(p.name))


def execute(notebook_path: Path, output_path: Path, timeout: int = 1800, *, kernel_env: dict[str, str] | None = None):
    """Run one notebook once in a fresh kernel, from its own folder, and write the executed copy, failed or not.

    ``timeout`` limits each cell; ``kernel_env`` is the kernel's environment (default: this process's). On failure the
    copy is written with the error in the cell where it happened (a time limit or a dead kernel too), then it raises.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # per-cell timestamps would make every refresh a noisy diff
    running: list[int] = []  # index of the cell being executed, for errors that nbclient does not record
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            on_cell_start=lambda cell, cell_index: running.append(cell_index),
                            # the kernel is local; its warning about unencrypted local TCP is noise here
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(notebook_path.parent)}})
    try:
        client.execute(**({} if kernel_env is None else {"env": kernel_env}))
    except CellExecutionError:
        raise  # nbclient has put the error in the failing cell
    except Exception as error:
        if running:
            record_error(notebook.cells[running[-1]], type(error).__name__, str(error).strip())
        raise
    finally:  # a failed notebook is kept too, with the error in the failing cell: that is the copy people need
        output_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, output_path)
    return notebook


def record_error(cell, ename: str, evalue: str) -> None:
    """Append an error output to a cell, as a failing cell shows one, for failures that raise no cell error."""
    import nbformat

    cell.outputs.append(nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"]))


def summary_of(notebook) -> str:
    """The text printed by the cell tagged ``summary`` (empty if the notebook has none)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout")
    return ""


GPU_LANE_EXIT_REFUSED = 2
GPU_LANE_DIRS = {"gpu-smoke": BUILD_DIR / "gpu-smoke", "gpu-test": BUILD_DIR / "gpu"}
GPU_LANE_HUB_OFFLINE = {"gpu-smoke": "1", "gpu-test": "0"}
GPU_LANE_CELL_TIMEOUTS = {"gpu-smoke": 240, "gpu-test": 3600}
"""Seconds per cell (nbval's ``--nbval-cell-timeout``; ``TIMEOUT=`` in the Makefile). nbval interrupts a cell at its
limit and fails it; the notebook's later cells still run, marked xfail by nbval, so only that cell counts."""
JUNIT_NAME = "junit.xml"
SUMMARY_ERROR_WIDTH = 100


def gpu_lane_command(lane: str, profile_name: str, notebooks: list[Path], *, cell_timeout: int, output_dir: Path,
                     environ: Mapping[str, str], python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a GPU lane: ``pytest --nbval-lax`` over ``notebooks`` (pure).

    The kernels inherit the environment: ``environ`` with the lane's profile (``COURSE_PROFILE``) and Hub setting
    (``HF_HUB_OFFLINE``). nbval runs every cell of every notebook, past a failing one, in the ``python3`` kernel
    that ``kernel_refusal`` checked; ``helpers.nbval_keep`` writes the executed copies into ``output_dir``, next to
    the junit report. A notebook that cannot be read fails on its own instead of stopping the lane.
    """
    from helpers import profiles

    if lane not in GPU_LANE_HUB_OFFLINE:
        raise ValueError(f"unknown GPU lane {lane!r}; expected one of {sorted(GPU_LANE_HUB_OFFLINE)}")
    argv = nbval_lax_argv(notebooks, cell_timeout=cell_timeout, output_dir=output_dir, python=python)
    env = {**environ, profiles.PROFILE_ENV_VAR: profile_name, "HF_HUB_OFFLINE": GPU_LANE_HUB_OFFLINE[lane]}
    return argv, env


def nbval_lax_argv(notebooks: list[Path], *, cell_timeout: int, output_dir: Path, python: str = sys.executable,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """``pytest --nbval-lax`` over ``notebooks`` with the executed copies and the junit report in ``output_dir``
    (pure): the command of the GPU lanes and of the rehearsal. ``extra`` goes before the notebooks."""
    if cell_timeout < 1:
        raise ValueError(f"the cell time limit must be at least 1 s, got {cell_timeout}")
    paths = [str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path) for path in notebooks]
    return [python, "-m", "pytest", "--nbval-lax", "--nbval-kernel-name=python3",
            f"--nbval-cell-timeout={cell_timeout}", "-p", "helpers.nbval_keep", f"--nbval-keep={output_dir}",
            f"--junitxml={output_dir / JUNIT_NAME}", "-o", "junit_family=xunit1",  # xunit1 keeps nbval_error
            "-p", "no:cacheprovider", "--continue-on-collection-errors", "--color=no", *extra, *paths]


@dataclass(frozen=True)
class NotebookResult:
    """One notebook's outcome in a GPU lane."""

    name: str
    seconds: float
    problem: str | None = None  # the first failure, one line; None when it passed

    @property
    def passed(self) -> bool:
        return self.problem is None


def junit_results(junit_path: Path, notebooks: list[Path]) -> list[NotebookResult]:
    """Each notebook's outcome in nbval's junit report: its time and its first failing cell, if any.

    A notebook's time is that of its cells, setup (the kernel's start) and teardown included. The first failure
    reads ``Cell N: <error>``, N counting code cells from 0 as nbval does; the error is the ``nbval_error`` property
    that ``helpers.nbval_keep`` records, else the first line of pytest's message. A notebook missing from the report
    (the run stopped before it) failed.
    """
    import xml.etree.ElementTree as ET

    from helpers.nbval_keep import ERROR_PROPERTY

    cases = ET.parse(junit_path).getroot().iter("testcase")
    by_name: dict[str, list] = {path.name: [] for path in notebooks}
    for case in cases:
        where = case.get("classname") or case.get("name", "")  # a collection error has the file in its name
        name = next((n for n in by_name if where == n or where.endswith("." + n) or where.endswith("/" + n)), None)
        if name is not None:
            by_name[name].append(case)
    results = []
    for path in notebooks:
        found = by_name[path.name]
        seconds = sum(float(case.get("time", 0) or 0) for case in found)
        problem = None if found else "no result in the junit report (the run stopped before this notebook)"
        for case in found:
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            if failure is not None:
                recorded = [p.get("value", "") for p in case.iter("property") if p.get("name") == ERROR_PROPERTY]
                message = recorded[0] if recorded else next(
                    (line.strip() for line in (failure.get("message") or failure.text or "").splitlines()
                     if line.strip()), failure.tag)
                cell = case.get("name", "") if case.get("classname") else "collection"
                problem = f"{cell}: {message}"
                break
        results.append(NotebookResult(path.stem, seconds, problem))
    return results


def lane_summary(lane: str, profile_name: str, results: list[NotebookResult], output_dir: Path) -> str:
    """One screen: the lane's verdict, then per notebook passed or FAILED, its time and its first error (pure)."""
    passed = sum(result.passed for result in results)
    minutes = sum(result.seconds for result in results) / 60
    shown = output_dir.relative_to(REPO_ROOT) if output_dir.is_relative_to(REPO_ROOT) else output_dir
    lines = [f"{lane} on profile {profile_name}: {passed} of {len(results)} notebooks passed in {minutes:.1f} min; "
             f"executed copies and {JUNIT_NAME} in {shown}/"]
    width = max([len(result.name) for result in results] + [22])
    for result in results:
        problem = result.problem or ""
        if len(problem) > SUMMARY_ERROR_WIDTH:
            problem = problem[:SUMMARY_ERROR_WIDTH - 3] + "..."
        verdict = "passed" if result.passed else "FAILED"
        lines.append(f"  {verdict}  {result.name:<{width}} {result.seconds:5.0f} s  {problem}".rstrip())
    return "\n".join(lines)


def smoke_refusal(cuda_available: bool, torch_cuda_build: str | None) -> str | None:
    """Why the GPU smoke lane cannot start here, or None when it can (pure)."""
    if cuda_available:
        return None
    why = ("this torch is a CPU-only build (torch.version.cuda is None): install a CUDA build of torch into "
           "GPU_PYTHON's environment first" if torch_cuda_build is None else
           f"torch (built for CUDA {torch_cuda_build}) sees no CUDA device")
    return (f"The GPU smoke lane needs a CUDA GPU, and {why}. Run it on a GPU runner (see "
            ".github/workflows/gpu-smoke.yml); on this machine use `make test`, the offline lane.")


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


def kernel_refusal(kernel_python: str, executable: str) -> str | None:
    """Why the notebooks' kernel would not run in this Python, or None (pure).

    Jupyter replaces a kernel command's ``python`` by the running Python; a kernelspec that names another
    interpreter (a user-level ``python3`` kernel, say) would test another environment than the one set up.
    """
    replaced = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if kernel_python in replaced or os.path.abspath(kernel_python) == os.path.abspath(executable):
        return None
    return (f"the Jupyter kernel `python3` runs {kernel_python}, not this Python ({executable}), so the notebooks "
            "would not see the packages set up here. Remove or rename that kernel (`jupyter kernelspec list`).")


def run_gpu_lane(lane: str, profile_name: str | None, timeout: int | None, notebooks: list[Path]) -> int:
    """A GPU lane: ``gpu-smoke`` (tiny profile on the GPU, Hub off) or ``gpu-test`` (a Hub profile, Hub on).

    Refuses with exit code 2 when it cannot start; otherwise runs ``pytest --nbval-lax`` over the notebooks
    (``gpu_lane_command``; ``timeout``: seconds per cell), which reports every failing cell; keeps every executed
    copy and the junit report; prints a one-screen summary; exits 1 when a notebook failed.
    """
    import subprocess

    import torch

    from helpers import environment, profiles

    cuda = torch.cuda.is_available()
    if lane == "gpu-smoke":
        profile_name = "tiny"
        refusal = smoke_refusal(cuda, torch.version.cuda)
    else:
        if cuda and profile_name is None:
            profile_name = profiles.automatic_profile_name(environment.detect_hardware())[0]
        refusal = gpu_lane_refusal(cuda, profile_name, cuda and profiles.hub_token_available())
    if refusal is None:
        from jupyter_client.kernelspec import KernelSpecManager

        refusal = kernel_refusal(KernelSpecManager().get_kernel_spec("python3").argv[0], sys.executable)
    if refusal:
        print(f"{lane} refused: {refusal}", file=sys.stderr)
        return GPU_LANE_EXIT_REFUSED
    output_dir = GPU_LANE_DIRS[lane]
    argv, env = gpu_lane_command(lane, profile_name, notebooks, cell_timeout=timeout or GPU_LANE_CELL_TIMEOUTS[lane],
                                 output_dir=output_dir, environ=os.environ)
    print(f"{lane}: profile {profile_name} on {torch.cuda.get_device_name(0)}, "
          f"HF_HUB_OFFLINE={env['HF_HUB_OFFLINE']}\n{' '.join(argv)}", flush=True)
    for stale in [output_dir / JUNIT_NAME, *(output_dir / path.name for path in notebooks)]:
        stale.unlink(missing_ok=True)  # never report an older run's copies
    code = subprocess.run(argv, env=env, cwd=REPO_ROOT).returncode
    junit = output_dir / JUNIT_NAME
    if not junit.is_file():
        print(f"{lane}: pytest exited with {code} and wrote no {junit}; its output above says why", file=sys.stderr)
        return 1
    results = junit_results(junit, notebooks)
    print(lane_summary(lane, profile_name, results, output_dir))
    return 0 if code == 0 and all(result.passed for result in results) else 1


GPU_SETUP_KEEPS = ("torch", "torchvision", "torchaudio")
"""What gpu-setup never installs: the GPU machine's own CUDA build of torch stays."""


def gpu_setup_pins(pins: dict[str, str]) -> dict[str, str]:
    """The pins gpu-setup installs: every one except the torch family (pure)."""
    return {name: version for name, version in pins.items() if name not in GPU_SETUP_KEEPS}


def run_gpu_setup(requirements: Path, wheelhouse: Path | None = None) -> int:
    """Install the pinned requirements, torch excepted, into this Python: only those missing or at other versions.

    The ``#no-deps name==version`` lines are installed with pip's ``--no-deps``, as the Makefile does. When all are
    present it installs nothing, so it works without a network. When the folder ``wheelhouse`` exists (``make
    wheelhouse``), pip installs from it alone, with no index, after checking it fits this Python, these pins and
    torch's CUDA version (``helpers.wheelhouse.setup_refusal``). Exit code 2 when there is no torch or it does not fit.
    """
    from helpers import colab

    installed = colab.installed_versions()
    if "torch" not in installed:
        print("gpu-setup refused: this Python has no torch. Install the CUDA build of torch your GPU needs first "
              "(https://pytorch.org/get-started/locally/); gpu-setup keeps it and installs the rest.", file=sys.stderr)
        return GPU_LANE_EXIT_REFUSED
    text = requirements.read_text()
    index_options: list[str] = []
    if wheelhouse is not None and wheelhouse.is_dir():
        from helpers import wheelhouse as wheels

        manifest = wheels.read_manifest(wheelhouse)
        torch_cuda = wheels.torch_cuda_version() if manifest and manifest.get("cuda") else None
        refusal = wheels.setup_refusal(manifest, text, f"{sys.version_info.major}.{sys.version_info.minor}", torch_cuda)
        if refusal is not None:
            print(f"gpu-setup refused: {refusal}", file=sys.stderr)
            return GPU_LANE_EXIT_REFUSED
        index_options = wheels.install_options(wheelhouse)
        print(f"gpu-setup: installing from {wheelhouse} only, no package index")
    pins, no_deps_pins = gpu_setup_pins(colab.read_pins(text)), gpu_setup_pins(colab.read_no_deps_pins(text))
    report = colab.install_missing(pins, protected=GPU_SETUP_KEEPS, index_options=index_options)
    loose = colab.install_missing_no_deps(no_deps_pins, protected=GPU_SETUP_KEEPS,  # after their run-time needs
                                          index_options=index_options)
    right = len(report.left_alone) + len(no_deps_pins) - len(loose)
    print(f"gpu-setup: torch {installed['torch']} kept; installed {', '.join(report.installed + loose) or 'nothing'}; "
          f"{right} of {len(pins) + len(no_deps_pins)} pinned packages were already right")
    return 0


def portability_settings() -> list[dict[str, str]]:
    """The numeric settings the portability check runs under: the same on every CPU (pure).

    The committed outputs are recorded with the pins of ``helpers.PINNED_CPU_NUMERICS`` (PyTorch's AVX2 kernels,
    oneMKL at AVX2 and STRICT, oneDNN at AVX2, 2 threads). The check varies what those pins do not fix, and nothing
    that depends on the machine it runs on:

    - a CPU below the pinned level: PyTorch's portable C++ kernels (capability ``default``, no vector
      instructions), on 1 thread;
    - another core count, set the way a user or a job scheduler sets it: only ``OMP_NUM_THREADS=3``, everything
      else from the pins (``MKL_NUM_THREADS`` follows it).

    It does not run "this CPU's best kernels": on an AVX2 CPU that is the pinned level itself, on an AVX-512 CPU it
    is an override of the pins, whose effects the README lists; a check that meant a different thing on each kind
    of CPU would pass on one and fail on the other for the same outputs.
    """
    return [
        {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
        {"OMP_NUM_THREADS": "3"},
    ]


def portability_environment(environ: dict[str, str], setting: dict[str, str]) -> dict[str, str]:
    """The environment of one portability run: ``environ`` without any pinned variable, plus ``setting`` (pure).

    The kernel's ``import helpers`` then pins the rest exactly as on a user's machine (``helpers.coherent_pins``).
    """
    import helpers

    unknown = set(setting) - set(helpers.PINNED_CPU_NUMERICS)
    if unknown:
        raise ValueError(f"a portability setting may only set pinned variables, got {sorted(unknown)}")
    clean = {name: value for name, value in environ.items() if name not in helpers.PINNED_CPU_NUMERICS}
    return {**clean, **setting}


def run_portability_check(notebooks: list[Path]) -> int:
    """Strict nbval over the notebooks under each setting of ``portability_settings``; a summary at the end."""
    import re
    import subprocess

    failures: list[str] = []
    for setting in portability_settings():
        label = ", ".join(f"{name}={value}" for name, value in setting.items())
        print(f"=== strict nbval with {label}", flush=True)
        command = [sys.executable, "-m", "pytest", "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg",
                   "--nbval-cell-timeout=900", "-q", "-p", "no:cacheprovider", "-rf", "--color=no",
                   *[str(path.relative_to(REPO_ROOT)) for path in notebooks]]
        result = subprocess.run(command, env=portability_environment(dict(os.environ), setting), cwd=REPO_ROOT,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        print(result.stdout, flush=True)  # nbval names each differing cell and prints both texts
        failed_items = re.findall(r"^FAILED (.+?)(?: - |$)", result.stdout, flags=re.MULTILINE)
        failures += [f"{item} [{label}]" for item in failed_items]
        if result.returncode != 0 and not failed_items:
            failures.append(f"pytest exited with {result.returncode} [{label}]")
    print("portability check: " + ("every compared output is the same under every setting" if not failures else
                                   f"{len(failures)} differences:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course notebooks top to bottom.")
    parser.add_argument("mode", choices=["run", "refresh", "portability", "gpu-smoke", "gpu-test", "gpu-setup"],
                        help="run: into build/; refresh: in place; portability: other CPU settings; "
                             "gpu-smoke: tiny profile on the GPU; gpu-test: a Hub profile; gpu-setup: install")
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--profile", default=None, help="gpu-test: a Hub profile (default: the automatic choice)")
    parser.add_argument("--jobs", type=int, default=default_jobs(os.cpu_count()),
                        help="run/refresh: notebooks executed at once (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=None,
                        help=f"GPU lanes: seconds per cell (default: {GPU_LANE_CELL_TIMEOUTS})")
    args = parser.parse_args(argv)
    if args.mode == "gpu-setup":
        return run_gpu_setup(REPO_ROOT / "requirements.txt", REPO_ROOT / "wheelhouse")
    chosen = [NOTEBOOK_DIR / name for name in args.notebooks] if args.notebooks else course_notebooks()
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.mode in GPU_LANE_DIRS:
        return run_gpu_lane(args.mode, args.profile or None, args.timeout, chosen)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode == "portability":
        return run_portability_check(chosen)
    return execute_all(chosen, in_place=args.mode == "refresh", jobs=args.jobs)


def default_jobs(cpu_count: int | None) -> int:
    """How many notebooks ``run``/``refresh`` execute at once: 2 where there are 2 cores or more, else 1 (pure).

    Much of a notebook's time is single-threaded (imports, Python loops, small tensors), so two kernels side by side
    finish sooner, each with its share of the pinned threads (``kernel_threads``).
    """
    return 2 if (cpu_count or 1) >= 2 else 1


def kernel_threads(jobs: int, pinned: int) -> int:
    """Threads per kernel when ``jobs`` kernels run side by side: the pinned count shared out, at least 1 (pure).

    Two kernels with 2 busy-waiting OpenMP threads each on 2 cores took 229 s for ``make run``; with 1 thread each,
    100 s. The outputs do not depend on the thread count: ``make portability`` runs every notebook on 1 and on 3
    threads and compares every output with the committed one (recorded on 2).
    """
    if jobs < 1 or pinned < 1:
        raise ValueError(f"jobs and pinned threads must be at least 1, got {jobs} and {pinned}")
    return max(1, pinned // jobs)


def _execute_one(path: Path, target: Path, threads: int) -> tuple[str, str, float, str | None]:
    """Execute one notebook (in a worker process); return (name, summary, seconds, error or None)."""
    started = time.time()
    kernel_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        notebook = execute(path, target, kernel_env=kernel_env)
    except Exception as error:  # report every notebook, then fail
        return path.name, "", time.time() - started, f"{type(error).__name__}: {str(error)[-2000:]}"
    return path.name, summary_of(notebook).rstrip() or "(no summary cell)", time.time() - started, None


def execute_all(chosen: list[Path], in_place: bool, jobs: int) -> int:
    """Execute the notebooks, ``jobs`` at a time, into build/ (or in place); print each summary in course order."""
    from concurrent.futures import ProcessPoolExecutor

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    import helpers

    targets = [path if in_place else BUILD_DIR / path.name for path in chosen]
    threads = kernel_threads(jobs, int(os.environ.get("OMP_NUM_THREADS", helpers.PINNED_CPU_NUMERICS["OMP_NUM_THREADS"])))
    started = time.time()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        outcomes = pool.map(_execute_one, chosen, targets, [threads] * len(chosen))
        failures = 0
        for (name, summary, seconds, error), target in zip(outcomes, targets):
            print(f"=== {name}", flush=True)
            if error:
                failures += 1
                print(f"FAILED after {seconds:.0f} s: {error}")
                continue
            print(summary)
            print(f"--- executed in {seconds:.0f} s -> {os.path.relpath(target, REPO_ROOT)}\n", flush=True)
    print(f"{len(chosen) - failures} notebooks executed, {failures} failed, in {time.time() - started:.0f} s "
          f"({jobs} at a time, {threads} thread{'s' if threads > 1 else ''} each)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
