"""The Colab setup: pure decisions with exact values, then a simulated Colab (a fake ``google.colab`` module) in a
real, separate virtual environment that installs from PyPI."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

from helpers import colab, environment

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_PINS = colab.read_pins((REPO_ROOT / "requirements.txt").read_text())


def test_read_pins_canonical_names_in_file_order():
    text = "# comment\ntorch==2.13.0\n\nhuggingface_hub==2.4.0  # why\nPyYAML == 6.0.3\n"
    assert colab.read_pins(text) == {"torch": "2.13.0", "huggingface-hub": "2.4.0", "pyyaml": "6.0.3"}
    with pytest.raises(ValueError, match="not an exact pin"):
        colab.read_pins("transformers>=5\n")


def test_colab_pins_are_the_seven_hugging_face_libraries_only():
    assert colab.colab_pins(REAL_PINS) == {
        "transformers": "5.23.0", "tokenizers": "0.23.3", "safetensors": "0.8.0", "huggingface-hub": "2.4.0",
        "bitsandbytes": "0.50.2", "peft": "0.21.2", "accelerate": "1.15.0"}


def test_packages_to_install_missing_or_other_version_only():
    pins = {"transformers": "5.23.0", "safetensors": "0.8.0", "peft": "0.21.2", "accelerate": "1.15.0"}
    installed = {"transformers": "4.57.1", "safetensors": "0.8.0", "accelerate": "1.15.0", "torch": "2.8.0+cu126"}
    assert colab.packages_to_install(pins, installed) == ["transformers==5.23.0", "peft==0.21.2"]
    assert colab.packages_to_install(pins, {**installed, "transformers": "5.23.0", "peft": "0.21.2"}) == []


def test_changed_packages_before_and_after():
    before = {"safetensors": "0.4.5", "tqdm": "4.67.1", "old": "1.0"}
    after = {"safetensors": "0.8.0", "tqdm": "4.67.1", "regex": "2025.1.1"}
    assert colab.changed_packages(before, after) == {
        "old": ("1.0", None), "regex": (None, "2025.1.1"), "safetensors": ("0.4.5", "0.8.0")}


def test_restart_only_for_changed_packages_the_session_imported():
    owners = {"safetensors": ["safetensors"], "tqdm": ["tqdm"], "yaml": ["PyYAML"]}
    changed = ["safetensors", "tqdm", "pyyaml", "huggingface-hub", "peft"]
    loaded = ["json", "safetensors.torch", "yaml", "huggingface_hub.utils"]
    assert colab.packages_needing_restart(changed, loaded, owners) == ["huggingface-hub", "pyyaml", "safetensors"]
    assert colab.packages_needing_restart(["peft", "tqdm"], loaded, owners) == []


def test_restart_message_says_what_changed_and_exactly_how_to_restart():
    message = colab.restart_message(["safetensors"], {"safetensors": ("0.4.5", "0.8.0")})
    assert message == (
        "Restart needed: this session had already imported safetensors, which the install just changed "
        "(safetensors 0.4.5 -> 0.8.0); the old code is still the one running.\n"
        "In Colab: Runtime > Restart session, then run all cells again (Runtime > Run all). The clone and the "
        "installs are already done, so the first cell will then only print versions.")


def test_protected_packages_are_held_at_their_installed_versions():
    installed = {"torch": "2.8.0+cu126", "numpy": "2.0.2", "ipykernel": "6.17.1", "peft": "0.17.1"}
    assert colab.protected_constraints(installed) == ["torch==2.8.0+cu126", "numpy==2.0.2", "ipykernel==6.17.1"]


def test_loaded_versions_read_the_modules_not_the_disk():
    class Module:
        __version__ = "0.4.5"

    assert colab.loaded_versions(["safetensors", "huggingface-hub", "peft"],
                                 {"safetensors": Module(), "peft": None}) == {"safetensors": "0.4.5"}


def test_the_module_imports_the_standard_library_only():
    tree = ast.parse((REPO_ROOT / "helpers" / "colab.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_setup_cell_text_and_one_place_for_the_repository():
    source = colab.setup_cell_source()
    lines = source.splitlines()
    assert lines[0].startswith("PROFILE = None  # ") and len(lines) <= 15
    assert f'REPOSITORY_URL = "{colab.REPOSITORY_URL}"' in lines and 'REPOSITORY_BRANCH = "main"' in lines
    assert lines[-2:] == ["from helpers import course  # on Colab it installs what is missing (never torch); then "
                          "quiets known noise", "profile = course.start(ROOT, PROFILE)  # chooses, checks and prints "
                          "the profile"]
    assert "transformers" not in source and "torch" not in source.replace("(never torch)", "")
    assert environment.REPOSITORY_URL == colab.REPOSITORY_URL and environment.REPOSITORY_BRANCH == "main"
    assert colab.colab_badge_url("01_full_precision.ipynb") == (
        "https://colab.research.google.com/github/llm-quantization-course/llm-quantization-course/blob/main/"
        "notebooks/01_full_precision.ipynb")
    compile(source, "setup cell", "exec")


@pytest.mark.parametrize("url,branch", [("https://github.com/a/b.git", "main"), ("http://github.com/a/b", "main"),
                                        ("https://github.com/a/b", "x y"), ("https://github.com/a/b", "../x")])
def test_bad_repository_addresses_are_refused(url, branch):
    with pytest.raises(ValueError):
        colab.setup_cell_source(url, branch)


def test_outside_colab_nothing_happens(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert colab.install_on_colab(tmp_path) is None  # no requirements.txt there: it would fail if it tried


def test_on_a_colab_that_has_every_pin_nothing_is_installed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    report = colab.install_on_colab(REPO_ROOT)  # this machine has every pin, so pip is never called
    assert report == colab.InstallReport(left_alone=list(colab.COLAB_LIBRARIES))
    out = capsys.readouterr().out
    assert "at the pinned versions: nothing installed" in out
    assert "safetensors: 0.8.0 (" in out and "torch: " in out


def test_the_setup_cell_on_colab_clones_once_then_installs_nothing_here(monkeypatch, tmp_path, capsys):
    clones, real_run = [], subprocess.run

    def fake_clone(command, *args, **kwargs):  # stands in for `git clone`: the clone is this repository
        if command[:2] != ["git", "clone"]:
            return real_run(command, *args, **kwargs)
        clones.append(command)
        clone = tmp_path / command[-1].rsplit("/", 1)[-1]
        clone.mkdir()
        for name in ("helpers", "requirements.txt"):
            (clone / name).symlink_to(REPO_ROOT / name)

    monkeypatch.chdir(tmp_path)  # Colab's /content
    monkeypatch.setattr(subprocess, "run", fake_clone)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    for _ in range(2):  # run twice, as after a restart: the clone is there, so it is not cloned again
        namespace: dict = {}
        exec(colab.setup_cell_source(), namespace)
    assert clones == [["git", "clone", "--depth", "1", "--branch", "main", colab.REPOSITORY_URL]]
    assert namespace["ROOT"] == tmp_path / colab.REPOSITORY_NAME and sys.path.count(str(namespace["ROOT"])) == 1
    out = capsys.readouterr().out
    assert out.count("at the pinned versions: nothing installed") == 2 and out.count("Profile tiny: ") == 2
    assert namespace["profile"].name == "tiny"


def test_the_lesson_setup_cell_clones_and_installs_nothing(monkeypatch, tmp_path, capsys):
    """A notebook that loads no model (00) only fetches the course code: Colab has torch, numpy and matplotlib."""
    name = colab.MODEL_FREE_NOTEBOOKS[0]
    source = colab.setup_cell_source(notebook_name=name)
    assert source != colab.setup_cell_source() and "course.start(" not in source and "PROFILE" not in source
    clones, real_run = [], subprocess.run

    def fake_clone(command, *args, **kwargs):
        if command[:2] != ["git", "clone"]:
            return real_run(command, *args, **kwargs)
        clones.append(command)
        clone = tmp_path / command[-1].rsplit("/", 1)[-1]
        clone.mkdir()
        (clone / "helpers").symlink_to(REPO_ROOT / "helpers")

    def no_pip(*args, **kwargs):
        raise AssertionError("the lesson's setup cell must not install anything")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "run", fake_clone)
    monkeypatch.setattr(colab, "pip_install", no_pip)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    namespace: dict = {}
    exec(source, namespace)
    assert clones == [["git", "clone", "--depth", "1", "--branch", "main", colab.REPOSITORY_URL]]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("Running on: python ") and "torch " in out and "matplotlib " in out
    assert not colab.needs_model(name) and colab.needs_model("01_full_precision.ipynb")


# --- a simulated Colab in a real virtual environment ------------------------------------------------------------

CHILD = """
import json, sys, types
sys.path.insert(0, {repo!r})
sys.modules["google"] = types.ModuleType("google")
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what Colab's kernel has imported
for name in sys.argv[2:]:
    __import__(name)  # what this session imported before the setup cell
from helpers import colab
try:
    report = colab.install_on_colab(sys.argv[1])
except colab.RestartRequired as error:
    print("RESTART", error)
    sys.exit(3)
print("REPORT", json.dumps(report.__dict__))
print("HEAVY", sorted(m for m in ("numpy", "torch", "transformers") if m in sys.modules))
"""


def pypi_reachable() -> bool:
    return support.pypi_reachable("safetensors")


COLAB_TORCH = "2.11.0+cu128"
"""Colab's torch in the simulation (the runtime list of August 2026)."""


@pytest.fixture(scope="module")
def colab_venv(tmp_path_factory):
    """A fresh virtual environment (no system site packages) with older safetensors and huggingface_hub."""
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the simulated Colab installs real packages from it")
    folder = tmp_path_factory.mktemp("colab")
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
    python = folder / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "safetensors==0.4.5", "huggingface_hub==0.26.0"], check=True)
    # Colab's torch, as the setup cell sees it (installed metadata only; the course never imports or installs it)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dist_info = Path(site) / f"torch-{COLAB_TORCH}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {COLAB_TORCH}\n")
    (folder / "child.py").write_text(CHILD.format(repo=str(REPO_ROOT)))
    return folder, python


def simulate_colab(colab_venv, name: str, pins: str, *imported: str) -> subprocess.CompletedProcess:
    folder, python = colab_venv
    (folder / name).mkdir()
    (folder / name / "requirements.txt").write_text(pins)
    return subprocess.run([str(python), str(folder / "child.py"), str(folder / name), *imported],
                          capture_output=True, text=True, timeout=180)


def report_of(result: subprocess.CompletedProcess) -> dict:
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])


def test_simulated_colab_installs_what_is_missing_and_asks_for_a_restart_only_when_needed(colab_venv):
    pins = ("torch==2.13.0\nnumpy==2.4.6\nipykernel==7.4.0\npytest==9.2.0\n"
            "safetensors==0.5.3\nhuggingface_hub==0.26.0\n")
    first = simulate_colab(colab_venv, "upgrade", pins, "huggingface_hub")
    assert first.returncode == 0, first.stdout + first.stderr
    assert report_of(first) == {"installed": ["safetensors==0.5.3"], "left_alone": ["huggingface-hub"],
                                "changed": {"safetensors": ["0.4.5", "0.5.3"]}, "restart_for": []}
    assert "$ pip install safetensors==0.5.3" in first.stdout  # pip's own output is shown, not hidden
    for line in ("safetensors: 0.5.3 (not imported yet)", "huggingface_hub: 0.26.0 (imported)",
                 f"torch: {COLAB_TORCH} (not imported yet)", "numpy: not installed (not imported yet)"):
        assert line in first.stdout, first.stdout  # torch, numpy, ipykernel, pytest: never installed
    assert "HEAVY []" in first.stdout and "Restart" not in first.stdout

    imported_then_changed = simulate_colab(colab_venv, "downgrade", "safetensors==0.4.5\n", "safetensors")
    assert imported_then_changed.returncode == 3, imported_then_changed.stdout + imported_then_changed.stderr
    assert ("RESTART Restart needed: this session had already imported safetensors, which the install just changed "
            "(safetensors 0.5.3 -> 0.4.5)") in imported_then_changed.stdout
    assert "safetensors: 0.5.3 (imported; disk has 0.4.5: restart the session to load it)" in \
        imported_then_changed.stdout
    assert colab.RESTART_HOW in imported_then_changed.stdout

    after_restart = simulate_colab(colab_venv, "again", "safetensors==0.4.5\nhuggingface_hub==0.26.0\n",
                                   "safetensors")
    assert after_restart.returncode == 0, after_restart.stdout + after_restart.stderr
    assert report_of(after_restart) == {"installed": [], "left_alone": ["safetensors", "huggingface-hub"],
                                        "changed": {}, "restart_for": []}
    assert "nothing installed" in after_restart.stdout and "$ pip" not in after_restart.stdout


def test_a_failing_install_shows_pips_error_and_says_so(colab_venv):
    result = simulate_colab(colab_venv, "impossible", "safetensors==0.0.0.404\n")
    assert result.returncode != 0
    assert "No matching distribution found for safetensors==0.0.0.404" in result.stdout  # pip's error, shown
    assert "RuntimeError: pip could not install safetensors==0.0.0.404 (exit code 1); its messages are above" \
        in result.stderr


def test_the_torch_minimum_is_the_pinned_transformers_own_requirement():
    import importlib.metadata
    import re

    requires = importlib.metadata.requires("transformers") or []
    torch_lines = [line for line in requires if re.match(r"torch\s*>=", line) and 'extra == "torch"' in line]
    assert len(torch_lines) == 1, requires
    minimum = re.search(r">=\s*([\d.]+)", torch_lines[0])[1]
    assert tuple(int(part) for part in minimum.split(".")[:2]) == colab.MIN_TORCH_FOR_TRANSFORMERS


@pytest.mark.parametrize("version", ["2.6.0", "2.11.0+cu128", "2.13.0+cpu", "3.0.1"])
def test_a_recent_enough_torch_passes(version):
    colab.check_torch_for_transformers(version)


@pytest.mark.parametrize("version", ["2.5.1+cu124", "1.13.1", None])
def test_an_old_or_missing_torch_is_refused_with_what_to_do(version):
    with pytest.raises(colab.TorchTooOld, match=r"torch 2\.6 or newer") as refused:
        colab.check_torch_for_transformers(version)
    assert ("Runtime > Change runtime type" in str(refused.value))


def test_install_on_colab_refuses_an_old_torch_before_installing_anything(monkeypatch, tmp_path):
    monkeypatch.setattr(colab, "in_colab", lambda: True)
    monkeypatch.setattr(colab, "installed_versions", lambda: {"torch": "2.4.0+cu121"})
    monkeypatch.setattr(colab, "pip_install", lambda *a, **k: pytest.fail("nothing may be installed"))
    (tmp_path / "requirements.txt").write_text("torch==2.13.0\ntransformers==5.23.0\n")
    with pytest.raises(colab.TorchTooOld, match="2.4.0"):
        colab.install_on_colab(tmp_path)


def test_a_version_that_is_not_one_is_a_clear_error():
    with pytest.raises(ValueError, match="not a torch version"):
        colab.check_torch_for_transformers("latest")


def test_every_pip_the_course_runs_builds_hqq_without_its_cuda_kernels(monkeypatch, capsys):
    seen = {}

    class FakePopen:
        def __init__(self, command, **kwargs):
            seen.update(command=command, env=kwargs["env"])
            self.stdout, self.returncode = iter(["Successfully installed hqq-0.2.8\n"]), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 0

    monkeypatch.setattr(colab.subprocess, "Popen", FakePopen)
    colab.pip_install(["hqq==0.2.8"], [])
    assert seen["env"]["DISABLE_CUDA"] == "1" and "hqq==0.2.8" in seen["command"]
    assert "Successfully installed hqq-0.2.8" in capsys.readouterr().out


COLAB_PYTHON = "3.13"
"""Colab's Python in its runtime list of August 2026."""


def test_every_pin_colab_installs_has_a_wheel_for_colabs_python():
    """pip's resolver, asked for Colab's Python and platform with wheels only: every library the notebooks install on
    Colab resolves, except hqq, which is published only as a source distribution (built with DISABLE_CUDA=1)."""
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the check asks PyPI's index")
    text = (REPO_ROOT / "requirements.txt").read_text()
    pins, no_deps = colab.read_pins(text), colab.read_no_deps_pins(text)
    wanted = [*colab.COLAB_LIBRARIES, "trl", "datasets", *colab.BEYOND_BITSANDBYTES_LIBRARIES]
    specs = {name: f"{name}=={(pins | no_deps)[colab.canonical_name(name)]}" for name in dict.fromkeys(wanted)}

    def resolves(spec: str) -> subprocess.CompletedProcess:
        platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
                     for arg in ("--platform", tag)]
        return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                               "--quiet", "--disable-pip-version-check", "--target", "unused",
                               "--python-version", COLAB_PYTHON, "--implementation", "cp",
                               "--abi", f"cp{COLAB_PYTHON.replace('.', '')}", *platforms, "--only-binary=:all:", spec],
                              capture_output=True, text=True, timeout=120)

    missing = [spec for spec in specs.values() if resolves(spec).returncode != 0]
    assert missing == [specs["hqq"]], missing
