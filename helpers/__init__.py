"""Shared code of the course notebooks: one module per concept.

- ``colab``: the setup cell's Colab install (standard library only) and the repository's address
- ``repository``: ``make set-repository``, which points badges and setup cells at a fork
- ``course``: the notebooks' one setup call (Colab installs, known noise, the profile), three lines of output
- ``environment``: hardware, offline mode, seeding, quieting known noise, portable random numbers, versions
- ``basics``: notebook 00's float formats bit by bit and linear quantization from scratch (absmax, zero point,
  per tensor, channel or group)
- ``exercises``: the notebooks' exercise checkers (right, or not yet with a hint); ``solutions``: worked solutions
- ``profiles``: which model, adapter and dtypes a notebook uses, chosen from the hardware
- ``models``: loading a profile's model in a given precision scheme
- ``memory``: footprints (reported, true, estimated), meta-device models, snapshots, release
- ``quantization``: LLM.int8 and NF4 from scratch, checked against bitsandbytes
- ``packing``: several low-bit values per byte
- ``lora``: LoRA parameter counts and adapter inspection
- ``quality``: perplexity, next-token agreement, greedy generations
- ``plots``: the figures the notebooks share
- ``claims``: a notebook's claims about its own numbers, printed with a ✓ and enforced
- ``pricer``: the offline pricer task of notebooks 04 and 06
- ``runner``: executing the notebooks (make run, refresh, portability, the GPU lanes)
- ``nbval_keep``: the GPU lanes' pytest plugin, which keeps the notebooks nbval executed
- ``wheelhouse``: the wheels for a CUDA machine without network (make wheelhouse; standard library only)
- ``rehearsal``: the real-model profiles rehearsed on the CPU (make rehearse)

Importing this package pins the CPU numeric libraries (below) before torch is imported, so that a notebook gives
the same numbers on every x86-64 CPU, whether it runs under nbval, the runner or JupyterLab.
"""

import os
import sys

PINNED_CPU_NUMERICS = {
    # PyTorch's own CPU kernels (softmax, SiLU, random numbers, ...) are compiled once per instruction set and
    # chosen by the CPU; AVX2 exists on every x86-64 CPU of the last decade, so every CPU runs the same code.
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneMKL (float32 matrix multiplication) picks kernels by CPU too; conditional numerical reproducibility
    # asks every AVX2-or-better CPU for the AVX2 ones, and STRICT makes them independent of the thread count.
    "MKL_CBWR": "AVX2,STRICT",
    # oneDNN (16-bit matmuls and some fused ops) would use AVX-512/AMX where present. Only with PyTorch's kernels at
    # AVX2 or below (see ``coherent_pins``): bitsandbytes' int8 matmul on an AVX512 capability is torch._int_mm,
    # which oneDNN capped at AVX2 computes with saturating 16-bit pair sums, giving wrong integer products.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # A fixed thread count: reductions split across threads add in a thread-dependent order.
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}
"""Environment variables that make CPU results independent of the CPU model and core count. A value already
in the environment wins (the portability check sets other threads and levels on purpose); ``coherent_pins`` adds the
rest."""

TORCH_WAS_IMPORTED_FIRST = "torch" in sys.modules
"""True when torch was imported before this package, too late for the pins to reach it (they are read once)."""

def coherent_pins(environ: dict[str, str]) -> dict[str, str]:
    """The pins to add to ``environ``: every ``PINNED_CPU_NUMERICS`` value it does not set already (pure).

    Two rules keep a partial override coherent. ``MKL_NUM_THREADS`` follows ``OMP_NUM_THREADS``, so both thread
    pools have one count. oneDNN is capped at AVX2 only while PyTorch's kernels are at AVX2 or below: a user who
    asks for ``ATEN_CPU_CAPABILITY=avx512`` makes bitsandbytes multiply int8 with ``torch._int_mm``, which is exact
    on oneDNN's AVX-512 VNNI/AMX kernels and wrong on its AVX2 one (``quantization.int8_matmul_check`` shows it).
    """
    added: dict[str, str] = {}
    threads = environ.get("OMP_NUM_THREADS", PINNED_CPU_NUMERICS["OMP_NUM_THREADS"])
    for name, value in PINNED_CPU_NUMERICS.items():
        if name in environ:
            continue
        if name == "MKL_NUM_THREADS":
            value = threads
        if name == "ONEDNN_MAX_CPU_ISA" and environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx512":
            continue  # oneDNN at its best level, as PyTorch's kernels are (see the docstring)
        added[name] = value
    return added


os.environ.update(coherent_pins(dict(os.environ)))
