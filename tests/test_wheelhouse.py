"""wheelhouse/ for an offline CUDA machine: which pins go in, bitsandbytes' wheel trimmed to one CUDA version, the
checks gpu-setup makes before installing from it, and (with PyPI) a small wheelhouse built and installed with no index.
"""

import email
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import support

from helpers import colab, runner, wheelhouse

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = (REPO_ROOT / "requirements.txt").read_text()
BNB_DIST_INFO = "bitsandbytes-0.50.2.dist-info"
BNB_LIBRARIES = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2026"]


def check_record(path: Path) -> list[str]:
    """The names a wheel's RECORD lists, after checking it lists every file once, with the right hash and size."""
    with zipfile.ZipFile(path) as wheel:
        record_name = next(name for name in wheel.namelist() if name.endswith(".dist-info/RECORD"))
        rows = [line.rsplit(",", 2) for line in wheel.read(record_name).decode().splitlines()]
        assert sorted(row[0] for row in rows) == sorted(wheel.namelist())
        for name, digest, size in rows:
            if name == record_name:
                assert digest == "" and size == ""
            else:
                data = wheel.read(name)
                assert digest == wheelhouse.record_hash(data) and int(size) == len(data), name
        return [row[0] for row in rows]


def fake_bitsandbytes(folder: Path) -> Path:
    """A wheel laid out as bitsandbytes 0.50.2's: Python files, one native library per backend version, metadata."""
    path = folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    entries = [("bitsandbytes/__init__.py", b"__version__ = '0.50.2'\n")]
    for library in BNB_LIBRARIES:
        info = zipfile.ZipInfo(f"bitsandbytes/libbitsandbytes_{library}.so", date_time=(2026, 8, 27, 0, 9, 0))
        info.external_attr = 0o100755 << 16
        entries.append((info, library.encode() * 1000))
    entries += [(f"{BNB_DIST_INFO}/METADATA", b"Metadata-Version: 2.4\nName: bitsandbytes\nVersion: 0.50.2\n"),
                (f"{BNB_DIST_INFO}/WHEEL", b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n")]
    wheelhouse.write_wheel(path, entries, BNB_DIST_INFO)
    return path


def test_the_wheelhouse_serves_exactly_the_pins_gpu_setup_installs():
    pins, no_deps_pins = wheelhouse.wheelhouse_pins(REQUIREMENTS)
    assert pins == runner.gpu_setup_pins(colab.read_pins(REQUIREMENTS)) and "torch" not in pins
    assert pins["bitsandbytes"] == "0.50.2" and pins["hqq"] == "0.2.8" and "nbval" in pins
    assert no_deps_pins == {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0", "llama-models": "0.3.0"}
    assert set(wheelhouse.BUILT_HERE) <= set(pins) | set(no_deps_pins)  # hqq: built here, without its CUDA kernels
    assert wheelhouse.BUILT_HERE["hqq"] == {"DISABLE_CUDA": "1"}


def test_manylinux_platforms_name_every_older_tag_with_the_legacy_aliases():
    platforms = wheelhouse.manylinux_platforms("2.28")
    assert platforms[0] == "manylinux_2_28_x86_64" and platforms[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64"} <= set(
        platforms)
    assert platforms.index("manylinux2014_x86_64") == platforms.index("manylinux_2_17_x86_64") + 1
    assert not any("2_29" in platform for platform in platforms) and len(platforms) == len(set(platforms))
    for wrong in ("3.1", "2.4", "2_28"):
        with pytest.raises(ValueError, match="glibc"):
            wheelhouse.manylinux_platforms(wrong)


@pytest.mark.parametrize("cuda,kept", [("13.0", ["cpu", "cuda130"]), ("13", ["cpu", "cuda130", "cuda132"]),
                                       ("11.8", ["cpu", "cuda118"])])
def test_trimmed_bitsandbytes_keeps_exactly_the_chosen_libraries_and_a_valid_record(tmp_path, cuda, kept):
    path = fake_bitsandbytes(tmp_path)
    with zipfile.ZipFile(path) as wheel:
        before = {info.filename: info for info in wheel.infolist()}
    libraries = wheelhouse.trim_bitsandbytes(path, cuda)
    assert libraries == [f"bitsandbytes/libbitsandbytes_{name}.so" for name in kept]
    assert path.name == "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"  # pip checks it against METADATA
    assert sorted(tmp_path.iterdir()) == [path]  # rewritten in place, nothing left beside it
    names = check_record(path)
    assert sorted(names) == sorted(["bitsandbytes/__init__.py", *libraries, f"{BNB_DIST_INFO}/METADATA",
                                    f"{BNB_DIST_INFO}/WHEEL", f"{BNB_DIST_INFO}/RECORD"])
    with zipfile.ZipFile(path) as wheel:
        for name in libraries:
            info = wheel.getinfo(name)
            assert wheel.read(name) == name.split("_")[-1].removesuffix(".so").encode() * 1000
            assert (info.external_attr, info.date_time) == (before[name].external_attr, before[name].date_time)
        assert wheel.namelist()[-1] == f"{BNB_DIST_INFO}/RECORD"


def test_a_cuda_version_bitsandbytes_does_not_ship_is_refused_with_the_ones_it_does(tmp_path):
    path = fake_bitsandbytes(tmp_path)
    with pytest.raises(ValueError, match=r"no library for CUDA 12\.4; it has 11\.8, 12\.8, 13\.0, 13\.2"):
        wheelhouse.trim_bitsandbytes(path, "12.4")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        wheelhouse.trim_bitsandbytes(path, "cu130")
    check_record(path)  # left as it was


@pytest.mark.parametrize("python_version,cuda,message", [("3", None, "Python version"), ("3.12", "cu130", "CUDA"),
                                                          ("3.12", None, "pins no torch")])
def test_build_refuses_bad_arguments_before_downloading_anything(tmp_path, monkeypatch, python_version, cuda, message):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("termcolor==3.3.0\n" if message == "pins no torch" else REQUIREMENTS)
    monkeypatch.setattr(wheelhouse, "_pip", lambda *args, **kwargs: pytest.fail("pip ran"))
    with pytest.raises(ValueError, match=message):
        wheelhouse.build(requirements, tmp_path / "wheelhouse", python_version, cuda)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["requirements.txt"]


def test_the_stand_in_torch_declares_nothing_and_is_a_valid_wheel(tmp_path):
    path = wheelhouse.stand_in_wheel(tmp_path, "torch", "2.13.0")
    assert path.name == "torch-2.13.0+standin-py3-none-any.whl"
    assert check_record(path) == ["torch-2.13.0+standin.dist-info/METADATA", "torch-2.13.0+standin.dist-info/WHEEL",
                                  "torch-2.13.0+standin.dist-info/RECORD"]
    with zipfile.ZipFile(path) as wheel:
        metadata = email.message_from_bytes(wheel.read("torch-2.13.0+standin.dist-info/METADATA"))
    assert (metadata["Name"], metadata["Version"], metadata.get_all("Requires-Dist")) == ("torch", "2.13.0+standin",
                                                                                          None)


def manifest(**changes) -> dict:
    pins, no_deps_pins = wheelhouse.wheelhouse_pins(REQUIREMENTS)
    return {"python_version": "3.12", "cuda": "13.0", "pins": pins, "no_deps_pins": no_deps_pins, **changes}


@pytest.mark.parametrize("built,python,torch_cuda,expected", [
    (manifest(), "3.12", "13.0", None),
    (manifest(), "3.12", "13.2", None),  # bitsandbytes falls back to a library of the same CUDA major
    (manifest(), "3.12", None, None),  # a CPU build of torch: libbitsandbytes_cpu.so is kept
    (manifest(cuda=None), "3.12", "12.8", None),  # every CUDA library kept
    (manifest(), "3.12", "12.8", "keeps only its CUDA 13.0 library, and this torch is built for CUDA 12.8"),
    (manifest(), "3.13", "13.0", "wheels for Python 3.12, this is 3.13: rebuild it with `make wheelhouse "
                                 "PYTHON_VERSION=3.13`"),
    (manifest(pins={"bitsandbytes": "0.49.0"}), "3.12", "13.0", "other pins than requirements.txt's"),
    (manifest(no_deps_pins={}), "3.12", "13.0", "other pins than requirements.txt's"),
    (None, "3.12", "13.0", "no wheelhouse.json"),
])
def test_gpu_setup_refuses_a_wheelhouse_that_does_not_fit(built, python, torch_cuda, expected):
    refusal = wheelhouse.setup_refusal(built, REQUIREMENTS, python, torch_cuda)
    assert refusal is None if expected is None else expected in refusal


def test_gpu_setup_installs_from_the_wheelhouse_alone_when_it_exists(monkeypatch, tmp_path, capsys):
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / wheelhouse.MANIFEST_NAME).write_text(json.dumps(manifest(python_version=python_version, cuda=None)))
    present = {"torch": "2.9.0+cu128", **wheelhouse.wheelhouse_pins(REQUIREMENTS)[0]}
    del present["bitsandbytes"]
    monkeypatch.setattr(colab, "installed_versions", lambda: dict(present))
    calls = []
    monkeypatch.setattr(colab, "pip_install", lambda specs, constraints, python=None, no_deps=False, index_options=():
                        calls.append((list(specs), list(constraints), no_deps, list(index_options))))
    assert runner.run_gpu_setup(REPO_ROOT / "requirements.txt", tmp_path) == 0
    offline = ["--no-index", "--find-links", str(tmp_path)]
    assert calls == [(["bitsandbytes==0.50.2"], ["torch==2.9.0+cu128"], False, offline),
                     (["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "llama-models==0.3.0"],
                      ["torch==2.9.0+cu128"], True, offline)]
    assert f"installing from {tmp_path} only, no package index" in capsys.readouterr().out
    calls.clear()
    assert runner.run_gpu_setup(REPO_ROOT / "requirements.txt", tmp_path / "absent") == 0  # no folder: the index
    assert [call[3] for call in calls] == [[], []]
    (tmp_path / wheelhouse.MANIFEST_NAME).write_text(json.dumps(manifest(python_version="3.0")))
    calls.clear()
    assert runner.run_gpu_setup(REPO_ROOT / "requirements.txt", tmp_path) == runner.GPU_LANE_EXIT_REFUSED
    assert calls == [] and "gpu-setup refused: wheelhouse/ holds wheels for Python 3.0" in capsys.readouterr().err


def test_make_wheelhouse_is_wired_and_its_output_ignored():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "wheelhouse:\n\t$(PYTHON) -m helpers.wheelhouse" in makefile
    assert "/wheelhouse/" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "make wheelhouse" in (REPO_ROOT / "README.md").read_text()


# --- with PyPI: a small wheelhouse built here, installed into a fresh virtual environment with no index ----------

def pypi_reachable() -> bool:
    return support.pypi_reachable("bitsandbytes")


SMALL_REQUIREMENTS = "torch==2.13.0\nbitsandbytes==0.50.2\ntermcolor==3.3.0\n#no-deps hqq==0.2.8\n"
"""A pin that needs torch and more (bitsandbytes, trimmed), a pure one, and hqq, which only a build here provides."""


def test_a_wheelhouse_built_here_installs_with_no_index_on_a_machine_with_torch(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: building a wheelhouse downloads from it")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(SMALL_REQUIREMENTS)
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = wheelhouse.build(requirements, tmp_path / "wheelhouse", python_version, cuda="13.0")
    names = {name.split("-", 1)[0].lower() for name in built["wheels"]}
    assert {"bitsandbytes", "termcolor", "hqq", "numpy"} <= names and not names & {"torch", "triton", "sympy"}
    assert not any(name.startswith("nvidia") for name in names)  # what only torch needs stays out
    assert built["bitsandbytes_libraries"] == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert "hqq-0.2.8-py3-none-any.whl" in built["wheels"]
    # A machine that already has torch: a fresh environment holding only the stand-in torch, no pip configuration
    # (no extra index or find-links of this machine's), gpu-setup installing from the wheelhouse alone.
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}
    stand_in = wheelhouse.stand_in_wheel(tmp_path, "torch", "2.13.0")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", str(stand_in)], check=True,
                   env=environment)
    setup = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from helpers import runner; "
             "sys.exit(runner.run_gpu_setup(Path(sys.argv[2]), Path(sys.argv[3])))")
    result = subprocess.run([python, "-c", setup, str(REPO_ROOT), str(requirements), str(tmp_path / "wheelhouse")],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installing from" in result.stdout and "--no-index" in result.stdout
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], env=environment, capture_output=True,
                            text=True, check=True)
    versions = {colab.canonical_name(item["name"]): item["version"] for item in json.loads(listed.stdout)}
    assert {name: versions.get(name) for name in ("torch", "bitsandbytes", "termcolor", "hqq")} == {
        "torch": "2.13.0+standin", "bitsandbytes": "0.50.2", "termcolor": "3.3.0", "hqq": "0.2.8"}
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert sorted(path.name for path in (site / "bitsandbytes").glob("libbitsandbytes_*")) == [
        "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
