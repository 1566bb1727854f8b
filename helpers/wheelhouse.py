"""The course's wheels for a CUDA Linux x86-64 machine without network: ``make wheelhouse`` fills wheelhouse/ here,
``make gpu-setup`` there installs from it with ``pip install --no-index --find-links wheelhouse``.

The wheelhouse holds what such a machine needs on top of its own torch: every pin of requirements.txt except the torch
family, the ``#no-deps`` pins, and every dependency of the pins that torch does not bring itself. What only torch
needs (its CUDA libraries, triton, sympy...) stays out: the pins are resolved against a stand-in torch wheel that
declares no dependencies. hqq 0.2.8 is published only as a source distribution whose setup.py compiles CUDA kernels
unless ``DISABLE_CUDA=1``: its wheel is built here with that setting (pure Python). bitsandbytes' wheel carries a
library for every CUDA, ROCm and XPU version; ``--cuda 13.0`` keeps only that CUDA version's (and the CPU one).

``python -m helpers.wheelhouse [--python-version 3.12] [--cuda 13.0] [--glibc 2.28]`` (``make wheelhouse``). Standard
library only: any Python with pip builds it. pip evaluates dependency markers (``python_version < "3.12"``) with the
interpreter that runs it, whatever ``--python-version`` says, so a Python of the target version is the exact choice
(``make wheelhouse PYTHON=python3.12``); from another version a dependency may come in that the target does not need.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from helpers.colab import read_no_deps_pins, read_pins
from helpers.runner import GPU_SETUP_KEEPS, gpu_setup_pins

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE_DIR = REPO_ROOT / "wheelhouse"
MANIFEST_NAME = "wheelhouse.json"
"""What a wheelhouse was built for (Python, platforms, CUDA, pins) and holds; gpu-setup checks it before installing."""

BUILT_HERE = {"hqq": {"DISABLE_CUDA": "1"}}
"""Pins published only as source distributions: their wheels are built here, with these environment variables."""

STAND_IN_LABEL = "standin"
"""The local version label of the stand-in torch wheel (``torch==2.13.0+standin``), which PyPI never publishes."""

DEFAULT_GLIBC = "2.28"
"""The oldest glibc the wheels may need by default: PyTorch's own Linux x86-64 wheels need 2.28 (manylinux_2_28)."""

_BITSANDBYTES_LIBRARY = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda\d+|rocm\d+|xpu\d*)\.so")
_CUDA_LIBRARY = re.compile(r"bitsandbytes/libbitsandbytes_cuda(\d\d)(\d+)\.so")  # '130': 13.0 (major: two digits)


def wheelhouse_pins(requirements_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """The pins a wheelhouse serves, as gpu-setup installs them: (pins resolved with their dependencies, ``#no-deps``
    pins), the torch family excepted, by canonical name (pure)."""
    return gpu_setup_pins(read_pins(requirements_text)), gpu_setup_pins(read_no_deps_pins(requirements_text))


def manylinux_platforms(glibc: str = DEFAULT_GLIBC, arch: str = "x86_64") -> list[str]:
    """pip's ``--platform`` values for a Linux machine with this glibc, most specific first (pure).

    pip does not widen ``manylinux_2_28`` to the older tags a wheel may carry, so each is named, with the legacy
    aliases manylinux2014 (glibc 2.17), manylinux2010 (2.12) and manylinux1 (2.5). Raises ValueError for a glibc
    that is not ``2.N`` with N >= 5.
    """
    match = re.fullmatch(r"2\.(\d+)", glibc)
    if match is None or int(match.group(1)) < 5:
        raise ValueError(f"glibc must read 2.N with N >= 5, got {glibc!r}")
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms: list[str] = []
    for minor in range(int(match.group(1)), 4, -1):
        platforms.append(f"manylinux_2_{minor}_{arch}")
        if minor in aliases:
            platforms.append(f"{aliases[minor]}_{arch}")
    return platforms


def record_hash(data: bytes) -> str:
    """A file's hash as a wheel's RECORD writes it: ``sha256=`` and the urlsafe base64 digest, unpadded (pure)."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(path: Path, entries: Sequence[tuple[zipfile.ZipInfo | str, bytes]], dist_info: str) -> None:
    """Write a wheel holding ``entries`` (name or ZipInfo, content) in order, then ``{dist_info}/RECORD``, which lists
    each entry with its hash and size (and itself without either), as the wheel format requires."""
    lines = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for info, data in entries:
            name = info.filename if isinstance(info, zipfile.ZipInfo) else info
            if name == f"{dist_info}/RECORD":
                raise ValueError("write_wheel writes RECORD itself")
            if isinstance(info, zipfile.ZipInfo):
                info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
            lines.append(f"{name},{record_hash(data)},{len(data)}")
        lines.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "".join(f"{line}\n" for line in lines))


def stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel ``name==version+standin`` that declares no dependencies and installs no module: what the machine's own
    torch is to the resolver, so that what only torch needs stays out of the wheelhouse. Returns its path."""
    full_version = f"{version}+{STAND_IN_LABEL}"
    dist_info = f"{name}-{full_version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {full_version}\n"
    wheel = "Wheel-Version: 1.0\nGenerator: helpers.wheelhouse\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    path = Path(folder) / f"{name}-{full_version}-py3-none-any.whl"
    write_wheel(path, [(f"{dist_info}/METADATA", metadata.encode()), (f"{dist_info}/WHEEL", wheel.encode())],
                dist_info)
    return path


def cuda_versions(names: Iterable[str]) -> dict[str, str]:
    """The CUDA libraries among bitsandbytes' wheel file names, by version: {"13.0": ".../libbitsandbytes_cuda130.so"}
    (pure; bitsandbytes writes a CUDA major with two digits)."""
    found = {}
    for name in names:
        match = _CUDA_LIBRARY.fullmatch(name)
        if match:
            found[f"{int(match.group(1))}.{int(match.group(2))}"] = name
    return dict(sorted(found.items(), key=lambda item: tuple(map(int, item[0].split(".")))))


def kept_bitsandbytes_files(names: Sequence[str], cuda: str) -> list[str]:
    """The files of bitsandbytes' wheel to keep for one CUDA version, in wheel order (pure): all but its native
    libraries, plus ``libbitsandbytes_cpu.so`` and the CUDA library of that version (``"13.0"``) or of each version
    of that major (``"13"``). bitsandbytes loads the library of torch's CUDA version, else one of the same major.

    Raises ValueError, naming the versions the wheel has, when none matches ``cuda``.
    """
    if re.fullmatch(r"\d+(\.\d+)?", cuda) is None:
        raise ValueError(f"a CUDA version reads MAJOR.MINOR or MAJOR (13.0, 13), got {cuda!r}")
    available = cuda_versions(names)
    chosen = {name for version, name in available.items()
              if version == cuda or ("." not in cuda and version.split(".")[0] == cuda)}
    if not chosen:
        raise ValueError(f"bitsandbytes' wheel has no library for CUDA {cuda}; it has {', '.join(available)}")
    chosen.add("bitsandbytes/libbitsandbytes_cpu.so")
    return [name for name in names if not _BITSANDBYTES_LIBRARY.fullmatch(name) or name in chosen]


def trim_bitsandbytes(wheel_path: Path, cuda: str) -> list[str]:
    """Rewrite bitsandbytes' wheel in place, under the same file name (pip checks the name against the metadata), with
    only the native libraries ``kept_bitsandbytes_files`` chooses and a RECORD that lists exactly what the wheel holds
    (hashes, sizes). Every kept entry keeps its date and permissions. Returns the libraries kept."""
    with zipfile.ZipFile(wheel_path) as wheel:
        records = [name for name in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", name)]
        if len(records) != 1:
            raise ValueError(f"{wheel_path.name}: expected one .dist-info/RECORD, found {records}")
        dist_info = records[0].rsplit("/", 1)[0]
        kept = kept_bitsandbytes_files([name for name in wheel.namelist() if name != records[0]], cuda)
        entries = [(wheel.getinfo(name), wheel.read(name)) for name in kept]
    partial = wheel_path.with_name(wheel_path.name + ".partial")
    write_wheel(partial, entries, dist_info)
    partial.replace(wheel_path)
    return [info.filename for info, _ in entries if _BITSANDBYTES_LIBRARY.fullmatch(info.filename)]


def _pip(python: str, arguments: Sequence[str], environment: Mapping[str, str] | None = None) -> None:
    command = [python, "-m", "pip", *arguments[:1], "--progress-bar", "off", *arguments[1:]]
    print("$ " + " ".join(["pip", *arguments]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, **(environment or {})})


def build(requirements: Path, target: Path, python_version: str, cuda: str | None = None,
          glibc: str = DEFAULT_GLIBC, python: str = sys.executable) -> dict:
    """Fill ``target`` (replaced when it exists) with the wheels of ``requirements`` for CPython ``python_version``
    on Linux x86-64 with at least ``glibc``, the torch family and what only it needs excepted; ``cuda``: keep only
    that CUDA version's library in bitsandbytes' wheel. Needs PyPI. ``python`` runs pip. Returns the manifest,
    also written as ``target/wheelhouse.json``. Built in ``target.partial`` first: a failure leaves no wheelhouse
    that looks complete, and an existing one stays as it was.
    """
    if re.fullmatch(r"3\.\d+", python_version) is None:
        raise ValueError(f"a Python version reads 3.N, got {python_version!r}")
    if cuda is not None and re.fullmatch(r"\d+(\.\d+)?", cuda) is None:
        raise ValueError(f"a CUDA version reads MAJOR.MINOR or MAJOR (13.0, 13), got {cuda!r}")
    platforms = manylinux_platforms(glibc)
    text = requirements.read_text()
    torch_version = read_pins(text).get("torch")
    if torch_version is None:
        raise ValueError(f"{requirements} pins no torch: the stand-in for the machine's torch needs its version")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _fill(partial, text, torch_version, python_version, platforms, cuda, python)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return manifest


def _fill(folder: Path, requirements_text: str, torch_version: str, python_version: str, platforms: list[str],
          cuda: str | None, python: str) -> dict:
    """``build``'s work, into an empty ``folder``."""
    pins, no_deps_pins = wheelhouse_pins(requirements_text)
    platform_options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                        *[option for platform in platforms for option in ("--platform", platform)]]
    with tempfile.TemporaryDirectory() as local:
        stand_in = stand_in_wheel(Path(local), "torch", torch_version)
        for name, environment in BUILT_HERE.items():
            version = pins.get(name) or no_deps_pins.get(name)
            if version is not None:
                _pip(python, ["wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", local, f"{name}=={version}"],
                     environment)  # built from its source each time, never a wheel cached from another build
        built = sorted(path.name for path in Path(local).glob("*.whl") if path != stand_in)
        impure = [name for name in built if not name.endswith("-none-any.whl")]
        if impure:
            raise RuntimeError(f"built wheels tied to this machine, not pure Python: {', '.join(impure)}")
        sources = ["--find-links", local, "--dest", str(folder)]
        _pip(python, ["download", *platform_options, *sources, f"torch=={torch_version}+{STAND_IN_LABEL}",
                      *[f"{name}=={version}" for name, version in pins.items()]])
        if no_deps_pins:
            _pip(python, ["download", "--no-deps", *platform_options, *sources,
                          *[f"{name}=={version}" for name, version in no_deps_pins.items()]])
    (folder / stand_in.name).unlink(missing_ok=True)
    wheels = sorted(path.name for path in folder.glob("*.whl"))
    family = [name for name in wheels if name.split("-", 1)[0].lower() in GPU_SETUP_KEEPS]
    if family:
        raise RuntimeError(f"the torch family must stay out of the wheelhouse, found {', '.join(family)}")
    libraries = None
    if cuda is not None:
        bitsandbytes = list(folder.glob("bitsandbytes-*.whl"))
        if len(bitsandbytes) != 1:
            raise RuntimeError(f"--cuda trims bitsandbytes' wheel; the wheelhouse has {len(bitsandbytes)}")
        libraries = [name.rsplit("/", 1)[-1] for name in trim_bitsandbytes(bitsandbytes[0], cuda)]
    manifest = {"python_version": python_version, "platforms": platforms, "cuda": cuda,
                "bitsandbytes_libraries": libraries, "pins": pins, "no_deps_pins": no_deps_pins, "wheels": wheels}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(wheelhouse: Path) -> dict | None:
    """A wheelhouse's manifest, or None when it has none."""
    path = Path(wheelhouse) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def setup_refusal(manifest: Mapping | None, requirements_text: str, python_version: str,
                  torch_cuda: str | None) -> str | None:
    """Why gpu-setup cannot install from a wheelhouse with this manifest, for these requirements, on this Python
    with a torch built for ``torch_cuda`` (None: no CUDA), or None when it can (pure)."""
    if manifest is None:
        return (f"wheelhouse/ has no {MANIFEST_NAME}: build it with `make wheelhouse`, or remove the folder to "
                "install from the package index")
    rebuild = f"rebuild it with `make wheelhouse PYTHON_VERSION={python_version}`"
    if manifest.get("python_version") != python_version:
        built_for = manifest.get("python_version")
        return f"wheelhouse/ holds wheels for Python {built_for}, this is {python_version}: {rebuild}"
    pins, no_deps_pins = wheelhouse_pins(requirements_text)
    if manifest.get("pins") != pins or manifest.get("no_deps_pins") != no_deps_pins:
        return f"wheelhouse/ was built for other pins than requirements.txt's: {rebuild}"
    cuda = manifest.get("cuda")
    if cuda and torch_cuda and torch_cuda.split(".")[0] != cuda.split(".")[0]:
        return (f"bitsandbytes in wheelhouse/ keeps only its CUDA {cuda} library, and this torch is built for CUDA "
                f"{torch_cuda}: {rebuild} CUDA={torch_cuda} (or without CUDA= for every version)")
    return None


def install_options(wheelhouse: Path) -> list[str]:
    """pip's options that install from the wheelhouse only, with no index (pure)."""
    return ["--no-index", "--find-links", str(wheelhouse)]


def torch_cuda_version() -> str | None:
    """The CUDA version this Python's torch was built for (``torch.version.cuda``); None for a CPU or ROCm build, or
    where no torch module imports."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def folder_bytes(folder: Path) -> int:
    """The total size of the files in a folder, in bytes."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    this_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser = argparse.ArgumentParser(description="Build wheelhouse/: the course's wheels for an offline CUDA machine.")
    parser.add_argument("--python-version", default=this_python, help="the target's Python, 3.N (default: %(default)s)")
    parser.add_argument("--cuda", default=None,
                        help="keep only this CUDA version's bitsandbytes library, MAJOR.MINOR or MAJOR (default: all)")
    parser.add_argument("--glibc", default=DEFAULT_GLIBC, help="the target's glibc, at least (default: %(default)s)")
    parser.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    parser.add_argument("--output", type=Path, default=WHEELHOUSE_DIR)
    args = parser.parse_args(argv)
    if args.python_version != this_python:
        print(f"note: pip runs on Python {this_python} and evaluates dependency markers for it, not for "
              f"{args.python_version}; `make wheelhouse PYTHON=python{args.python_version}` is exact", flush=True)
    try:
        manifest = build(args.requirements, args.output, args.python_version, args.cuda, args.glibc)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"wheelhouse not built: {error}", file=sys.stderr)
        return 1
    kept = f"; bitsandbytes keeps {', '.join(manifest['bitsandbytes_libraries'])}" if args.cuda else ""
    print(f"{args.output}: {len(manifest['wheels'])} wheels for Python {args.python_version}, "
          f"{folder_bytes(args.output) / 2**20:.1f} MiB{kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
