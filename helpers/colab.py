"""The notebooks' first cell on Colab: install only what is missing, never break the runtime; the repository's address.

Standard library only, on purpose: the setup cell imports this module before anything it may install is imported.
A package replaced on disk after the session imported it keeps running its old code until the session restarts,
so this module installs before the course imports the Hugging Face libraries, asks for a restart only when an
already-imported package changed, and never touches what a Colab runtime stands on (torch, numpy, the Jupyter
kernel), which it pins to the versions present while pip runs.

``python -m helpers.colab setup-cell`` prints the notebooks' first code cell (``setup_cell_source``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

REPOSITORY_URL = "https://github.com/llm-quantization-course/llm-quantization-course"
"""The course's repository. A fork changes this line and REPOSITORY_BRANCH, or runs ``make set-repository``."""

REPOSITORY_BRANCH = "main"
"""The branch the Colab badges open and the setup cell clones."""

REPOSITORY_NAME = REPOSITORY_URL.rstrip("/").rsplit("/", 1)[-1]

COLAB_LIBRARIES = ("transformers", "tokenizers", "safetensors", "huggingface-hub", "bitsandbytes", "peft", "accelerate")
"""The libraries the notebooks import that Colab may lack or have at another version (canonical names)."""

PROTECTED = ("torch", "torchvision", "torchaudio", "numpy", "ipykernel", "ipython", "jupyter-client", "jupyter-core",
             "traitlets", "pyzmq", "tornado")
"""What the running runtime stands on: held at its installed version while pip runs (a conflict fails instead)."""

RESTART_HOW = ("In Colab: Runtime > Restart session, then run all cells again (Runtime > Run all). The clone and the "
               "installs are already done, so the first cell will then only print versions.")

_URL_PATTERN = re.compile(r"https://github\.com/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_BRANCH_PATTERN = re.compile(r"[A-Za-z0-9._/-]+")


class RestartRequired(RuntimeError):
    """Raised after an install changed a package this session had already imported (stops a Run all there)."""


@dataclass(frozen=True)
class InstallReport:
    """What an install decided and did; names are canonical (PEP 503)."""

    installed: list[str] = field(default_factory=list)  # "name==version" specs given to pip
    left_alone: list[str] = field(default_factory=list)  # pinned names already at their pin
    changed: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # name: (before, after)
    restart_for: list[str] = field(default_factory=list)  # changed distributions the session had imported


def canonical_name(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def read_pins(requirements_text: str) -> dict[str, str]:
    """The exact pins (``name==version``) of a requirements text, by canonical name, in file order.

    Raises ValueError for a requirement that is not an exact pin: the course installs nothing open-ended.
    """
    pins: dict[str, str] = {}
    for line in requirements_text.splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]*)\s*==\s*([A-Za-z0-9_.+!-]+)", text)
        if match is None:
            raise ValueError(f"not an exact pin (name==version): {text!r}")
        pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def colab_pins(pins: Mapping[str, str]) -> dict[str, str]:
    """The pins of COLAB_LIBRARIES only: never torch, numpy, Jupyter or test tools."""
    return {name: version for name, version in pins.items() if name in COLAB_LIBRARIES}


def packages_to_install(pins: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """``name==version`` for each pin that is missing or at another version (pure; names canonical)."""
    return [f"{name}=={version}" for name, version in pins.items() if installed.get(name) != version]


def installed_versions() -> dict[str, str]:
    """Every installed distribution's version by canonical name, as the next import would find it (first on path)."""
    importlib.invalidate_caches()
    versions: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions.setdefault(canonical_name(name), distribution.version)
    return versions


def changed_packages(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """Distributions added, removed or at another version between two ``installed_versions``, by name:
    (version before, version after), None for absent (pure, sorted by name)."""
    names = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    return {name: (before.get(name), after.get(name)) for name in names}


def packages_needing_restart(changed: Iterable[str], loaded_modules: Iterable[str],
                             owners: Mapping[str, Sequence[str]]) -> list[str]:
    """The changed distributions that provide a module the session has already imported (pure, sorted).

    ``loaded_modules``: names in ``sys.modules``; ``owners``: top-level module -> distributions, as
    ``importlib.metadata.packages_distributions()`` gives it. A distribution with no entry there is assumed to
    provide the module named like it (``huggingface-hub`` -> ``huggingface_hub``).
    """
    loaded_tops = {name.split(".", 1)[0] for name in loaded_modules}
    loaded_dists = {canonical_name(dist) for top in loaded_tops for dist in owners.get(top, ())}
    return sorted(name for name in set(changed)
                  if name in loaded_dists or canonical_name(name).replace("-", "_") in loaded_tops)


def restart_message(packages: Sequence[str], changes: Mapping[str, tuple[str | None, str | None]]) -> str:
    """What changed under the running session, and exactly how to restart (pure)."""
    described = ", ".join(f"{name} {changes[name][0] or 'absent'} -> {changes[name][1] or 'removed'}"
                          for name in packages)
    return (f"Restart needed: this session had already imported {', '.join(packages)}, which the install just "
            f"changed ({described}); the old code is still the one running.\n{RESTART_HOW}")


def protected_constraints(installed: Mapping[str, str], protected: Sequence[str] = PROTECTED) -> list[str]:
    """``name==version`` constraints that hold every installed protected distribution where it is (pure)."""
    return [f"{name}=={installed[name]}" for name in protected if name in installed]


PIP_BUILD_ENVIRONMENT = {"DISABLE_CUDA": "1"}
"""Set for every pip the course runs. hqq 0.2.8 exists only as a source distribution whose setup.py compiles CUDA
kernels at install unless DISABLE_CUDA=1 (minutes of nvcc on Colab, and a failure it hides where nvcc is missing);
the course uses hqq's PyTorch backend, which needs none of them."""


def pip_install(specs: Sequence[str], constraints: Sequence[str], python: str = sys.executable,
                no_deps: bool = False, index_options: Sequence[str] = ()) -> None:
    """``pip install`` the specs under the constraints, printing pip's own output line by line as it comes.

    Printed through Python, so a notebook shows it (output a child process writes itself does not reach a Jupyter
    cell). Raises RuntimeError, after pip's messages, when pip fails. ``no_deps``: pip's ``--no-deps``;
    ``index_options``: where pip looks (``--no-index --find-links wheelhouse``; default: the configured index).
    """
    with tempfile.TemporaryDirectory() as folder:
        constraint_file = Path(folder) / "constraints.txt"
        constraint_file.write_text("".join(f"{line}\n" for line in constraints))
        command = [python, "-m", "pip", "install", "--no-input", "--progress-bar", "off", "-c", str(constraint_file),
                   *(["--no-deps"] if no_deps else []), *index_options, *specs]
        held = f"  (held: {', '.join(constraints)})" if constraints else ""
        print("$ pip install " + " ".join([*index_options, *specs]) + held)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **PIP_BUILD_ENVIRONMENT}) as process:
            for line in process.stdout or ():
                print(line, end="", flush=True)
            returncode = process.wait()
    if returncode != 0:
        raise RuntimeError(f"pip could not install {', '.join(specs)} (exit code {returncode}); its messages are "
                           "above. What the runtime stands on (torch, numpy, Jupyter) was held where it was.")


def install_missing(pins: Mapping[str, str], protected: Sequence[str] = PROTECTED,
                    python: str = sys.executable, index_options: Sequence[str] = ()) -> InstallReport:
    """Install the pins that are missing or at another version, holding ``protected`` where it is.

    Returns what was installed, what was left alone, what changed on disk and which of those changes the running
    session had already imported (those need a restart). ``index_options``: as for ``pip_install``.
    """
    before = installed_versions()
    specs = packages_to_install(pins, before)
    left_alone = [name for name, version in pins.items() if before.get(name) == version]
    if not specs:
        return InstallReport(left_alone=left_alone)
    pip_install(specs, protected_constraints(before, protected), python, index_options=index_options)
    after = installed_versions()
    changed = changed_packages(before, after)
    owners = importlib.metadata.packages_distributions()
    return InstallReport(installed=specs, left_alone=left_alone, changed=changed,
                         restart_for=packages_needing_restart(changed, list(sys.modules), owners))


def install_missing_no_deps(pins: Mapping[str, str], protected: Sequence[str] = PROTECTED,
                            python: str = sys.executable, index_options: Sequence[str] = ()) -> list[str]:
    """Install with pip's ``--no-deps`` the pins that are missing or at another version, holding ``protected`` where
    it is; return the ``name==version`` specs given to pip (none when every pin is already right).

    For the ``#no-deps`` lines of requirements.txt: libraries whose declared pins conflict with ours.
    ``index_options``: as for ``pip_install``.
    """
    before = installed_versions()
    specs = packages_to_install(pins, before)
    if specs:
        pip_install(specs, protected_constraints(before, protected), python, no_deps=True,
                    index_options=index_options)
    return specs


def in_colab() -> bool:
    """True inside a Google Colab runtime (its kernel has imported ``google.colab``)."""
    return "google.colab" in sys.modules


MIN_TORCH_FOR_TRANSFORMERS = (2, 6)
"""The oldest torch the pinned transformers runs on (its ``torch>=2.6`` requirement; tests check it against the
installed transformers' metadata). With an older torch, transformers 5 disables PyTorch with one logged line and
every model class then fails with a confusing import error."""


class TorchTooOld(RuntimeError):
    """The machine's torch is older than the pinned transformers needs; the course never replaces torch itself."""


def check_torch_for_transformers(torch_version: str | None) -> None:
    """Raise TorchTooOld, with what to do, when ``torch_version`` is missing or older than the pinned transformers
    needs (``MIN_TORCH_FOR_TRANSFORMERS``). Standard library only: it runs before anything is installed."""
    needed = ".".join(map(str, MIN_TORCH_FOR_TRANSFORMERS))
    if torch_version is None:
        raise TorchTooOld(f"This runtime has no torch. The course needs torch {needed} or newer, with CUDA on a GPU "
                          "(Colab ships one: choose Runtime > Change runtime type > T4 GPU).")
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise ValueError(f"not a torch version: {torch_version!r}")
    if (int(match[1]), int(match[2])) < MIN_TORCH_FOR_TRANSFORMERS:
        raise TorchTooOld(
            f"This runtime's torch is {torch_version}; the pinned transformers needs torch {needed} or newer and "
            "would silently disable PyTorch. The course does not replace torch (that needs a matching CUDA build and "
            "a restart). Use a current Colab runtime (Runtime > Change runtime type, latest version), or install a "
            f"torch >= {needed} built for your CUDA, restart, and run all cells again.")


def install_on_colab(repo_root: str | Path) -> InstallReport | None:
    """On Colab, install the course's Hugging Face libraries that are missing or at another version; elsewhere nothing.

    Prints what it installs and leaves alone, pip's output, then the versions loaded. Raises TorchTooOld before
    installing anything when Colab's torch is older than the pinned transformers needs, and RestartRequired, with
    the exact steps, when a package the session had already imported changed (a Run all stops there).
    """
    if not in_colab():
        return None
    check_torch_for_transformers(installed_versions().get("torch"))
    pins = colab_pins(read_pins((Path(repo_root) / "requirements.txt").read_text()))
    report = install_missing(pins)
    if report.installed:
        print(f"Installed {', '.join(report.installed)}; already at the pinned version: "
              f"{', '.join(report.left_alone) or 'none'} (torch, numpy and Jupyter are never touched).")
    else:
        print(f"Colab already has {', '.join(pins)} at the pinned versions: nothing installed.")
    print_loaded_versions()
    if report.restart_for:
        raise RestartRequired(restart_message(report.restart_for, report.changed))
    return report


NO_DEPS_PREFIX = "#no-deps "
"""requirements.txt lines that start so pin a library installed with ``--no-deps`` (its own pins conflict with ours)."""

BEYOND_BITSANDBYTES_LIBRARIES = ("hqq", "einops", "termcolor", "gguf", "loguru", "datasets", "compressed-tensors",
                                 "llmcompressor")
"""What notebook 07 imports beyond COLAB_LIBRARIES (canonical names; the last two are ``#no-deps`` pins)."""

TRAINING_LIBRARIES = ("trl", "datasets")
"""What notebook 06 imports beyond COLAB_LIBRARIES: TRL's SFTTrainer and the datasets it reads."""

NOTEBOOK_EXTRAS = {"06_qlora_finetune": TRAINING_LIBRARIES, "07_beyond_bitsandbytes": BEYOND_BITSANDBYTES_LIBRARIES}
"""Notebooks that need libraries beyond COLAB_LIBRARIES, by notebook name (without ``.ipynb``). Their setup cell
passes the name to ``course.start``, which installs them on Colab before the lesson starts, so that a restart asked for
by an install never costs the student a training run."""


def read_no_deps_pins(requirements_text: str) -> dict[str, str]:
    """The ``#no-deps name==version`` pins of a requirements text, by canonical name (pip itself skips them)."""
    return read_pins("\n".join(line[len(NO_DEPS_PREFIX):] for line in requirements_text.splitlines()
                               if line.startswith(NO_DEPS_PREFIX)))


def install_extras_on_colab(repo_root: str | Path, libraries: Sequence[str]) -> InstallReport | None:
    """On Colab, install one notebook's extra pinned libraries that are missing or at another version; elsewhere
    nothing. Pins come from requirements.txt; those on ``#no-deps`` lines are installed with ``--no-deps``.

    Raises ValueError for a library requirements.txt does not pin, RestartRequired as ``install_on_colab`` does.
    """
    if not in_colab():
        return None
    text = (Path(repo_root) / "requirements.txt").read_text()
    pinned, no_deps = read_pins(text), read_no_deps_pins(text)
    unknown = [name for name in libraries if canonical_name(name) not in pinned | no_deps]
    if unknown:
        raise ValueError(f"not pinned in requirements.txt: {', '.join(unknown)}")
    wanted = [canonical_name(name) for name in libraries]
    report = install_missing({name: pinned[name] for name in wanted if name in pinned})
    loose = install_missing_no_deps({name: no_deps[name] for name in wanted if name in no_deps})
    installed = report.installed + loose
    print(f"Installed {', '.join(installed)}." if installed else "Every extra library is at its pinned version.")
    if report.restart_for:
        raise RestartRequired(restart_message(report.restart_for, report.changed))
    return InstallReport(installed=installed, left_alone=report.left_alone, changed=report.changed)


def module_name(distribution: str) -> str:
    """The import name of a course library's distribution (``huggingface-hub`` -> ``huggingface_hub``)."""
    return canonical_name(distribution).replace("-", "_")


def loaded_versions(distributions: Sequence[str], modules: Mapping[str, object]) -> dict[str, str]:
    """``__version__`` of each library's module already imported into ``modules``; absent ones are left out (pure)."""
    versions = {}
    for distribution in distributions:
        module = modules.get(module_name(distribution))
        if module is not None:
            versions[module_name(distribution)] = str(getattr(module, "__version__", "unknown"))
    return versions


def print_loaded_versions(distributions: Sequence[str] = ("torch", "numpy", *COLAB_LIBRARIES)) -> None:
    """Print the version each library runs at: ``__version__`` of the imported module, not what lies on disk.

    A library not imported yet is listed with the version its import will load, and says so.
    """
    loaded = loaded_versions(distributions, sys.modules)
    on_disk = installed_versions()
    for distribution in distributions:
        name, disk = module_name(distribution), on_disk.get(canonical_name(distribution), "not installed")
        if name not in loaded:
            print(f"{name:>15}: {disk} (not imported yet)")
        elif disk != loaded[name]:
            print(f"{name:>15}: {loaded[name]} (imported; disk has {disk}: restart the session to load it)")
        else:
            print(f"{name:>15}: {loaded[name]} (imported)")


def check_repository(url: str, branch: str) -> None:
    """Raise ValueError unless ``url`` is a GitHub repository's https address and ``branch`` a plain branch name."""
    if not _URL_PATTERN.fullmatch(url) or url.endswith(".git"):
        raise ValueError(f"expected https://github.com/OWNER/NAME (no .git, no trailing slash), got {url!r}")
    if not _BRANCH_PATTERN.fullmatch(branch) or ".." in branch or branch.startswith(("-", "/")):
        raise ValueError(f"not a plain branch name: {branch!r}")


def colab_badge_url(notebook_name: str, url: str = REPOSITORY_URL, branch: str = REPOSITORY_BRANCH) -> str:
    """Where a notebook's "Open in Colab" badge points: the notebook on GitHub, opened by Colab."""
    check_repository(url, branch)
    slug = url.split("github.com/", 1)[1]
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/notebooks/{notebook_name}"


_FIND_THE_COURSE = '''\
import sys
from pathlib import Path

REPOSITORY_URL = "{url}"
REPOSITORY_BRANCH = "{branch}"
CLONE = Path(REPOSITORY_URL.rsplit("/", 1)[-1])
if "google.colab" in sys.modules and not CLONE.is_dir():  # Colab: fetch the course code once per runtime
    import subprocess
    subprocess.run(["git", "clone", "--depth", "1", "--branch", REPOSITORY_BRANCH, REPOSITORY_URL], check=True)
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents, CLONE.resolve()] if (p / "helpers").is_dir())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
'''

_SETUP_CELL = ('''\
PROFILE = None  # None: chosen from the hardware; or "tiny", "llama-3.2-3b", "llama-3.1-8b"
''' + _FIND_THE_COURSE + '''\
from helpers import course  # on Colab it installs what is missing (never torch); then quiets known noise
{start}''')

_START = "profile = course.start(ROOT, PROFILE)  # chooses, checks and prints the profile"
_START_WITH_EXTRAS = ("# on Colab it also installs this notebook's own libraries (helpers/colab.py, NOTEBOOK_EXTRAS)\n"
                      'profile = course.start(ROOT, PROFILE, extras_for="{stem}")  # chooses, checks, prints the profile')


_LESSON_SETUP_CELL = _FIND_THE_COURSE + '''\
from helpers import course  # this lesson needs torch, numpy and matplotlib only: nothing to install
course.start_lesson()'''

MODEL_FREE_NOTEBOOKS = ("00_quantization_basics.ipynb",)
"""Notebooks that load no model and import no Hugging Face library. Their setup cell (``_LESSON_SETUP_CELL``) only
fetches the course code on Colab, which already has everything they import, and prints one line of versions; they
have no profile, no memory plan and no model to release, and ask Colab for no GPU."""


def needs_model(notebook_name: str) -> bool:
    """Whether a notebook loads a model (every notebook but those of ``MODEL_FREE_NOTEBOOKS``)."""
    return notebook_name not in MODEL_FREE_NOTEBOOKS


def setup_cell_source(url: str = REPOSITORY_URL, branch: str = REPOSITORY_BRANCH,
                      notebook_name: str | None = None) -> str:
    """The exact source of a notebook's first code cell, for this repository and branch: the installing one, or for
    a notebook of ``MODEL_FREE_NOTEBOOKS`` the short one (None: the installing one, which most notebooks use)."""
    check_repository(url, branch)
    template = _SETUP_CELL if notebook_name is None or needs_model(notebook_name) else _LESSON_SETUP_CELL
    stem = Path(notebook_name or "").stem
    start = _START_WITH_EXTRAS.format(stem=stem) if stem in NOTEBOOK_EXTRAS else _START
    return template.format(url=url, branch=branch, start=start)


if __name__ == "__main__":
    if sys.argv[1:] != ["setup-cell"]:
        sys.exit("usage: python -m helpers.colab setup-cell   (prints the notebooks' first code cell)")
    print(setup_cell_source())
