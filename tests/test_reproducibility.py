"""The CPU numerics pins, portable random numbers, bitsandbytes' portable path and the portability check's settings."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import helpers
from helpers import environment, models, profiles, runner

PROBE = """
import hashlib, helpers, torch
from helpers import environment
values = environment.portable_randn(64, 64, seed=7)
drawn = torch.randn(64, 64, generator=torch.Generator().manual_seed(7))
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(),
      hashlib.md5(values.numpy().tobytes()).hexdigest(), hashlib.md5(drawn.numpy().tobytes()).hexdigest())
"""


def probe(**environ: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in helpers.PINNED_CPU_NUMERICS}
    result = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **environ}, cwd=helpers.__path__[0] + "/..",
                            capture_output=True, text=True, check=True)
    return result.stdout.split()


@pytest.fixture(scope="module")
def pinned_and_default() -> tuple[list[str], list[str]]:
    """One fresh interpreter with the pins as helpers sets them, one with other values already in the environment."""
    return probe(), probe(ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")


def test_importing_helpers_pins_the_cpu_numerics_before_torch(pinned_and_default):
    capability, threads, _, _ = pinned_and_default[0]
    assert capability == "AVX2" and threads == "2"


def test_a_value_already_in_the_environment_wins(pinned_and_default):
    capability, threads, _, _ = pinned_and_default[1]
    assert capability == "DEFAULT" and threads == "1"  # and MKL follows OMP_NUM_THREADS


def test_portable_randn_is_the_same_under_every_capability_and_torch_randn_is_not(pinned_and_default):
    (_, _, portable_pinned, drawn_pinned), (_, _, portable_default, drawn_default) = pinned_and_default
    assert portable_pinned == portable_default
    assert drawn_pinned != drawn_default  # why the notebooks do not use torch.randn for data they print about


def test_portable_randn_values_and_validation():
    values = environment.portable_randn(3, 4, seed=5)
    assert values.dtype == torch.float32 and values.shape == (3, 4)
    assert np.array_equal(values.numpy(), np.random.default_rng(5).standard_normal((3, 4), dtype=np.float32))
    assert torch.equal(values, environment.portable_randn(3, 4, seed=5))
    with pytest.raises(ValueError, match="positive int sizes"):
        environment.portable_randn(3, 0, seed=1)
    with pytest.raises(ValueError, match="positive int sizes"):
        environment.portable_randn(seed=1)
    with pytest.raises(ValueError, match="non-negative int"):
        environment.portable_randn(2, seed=-1)


def test_describe_cpu_names_instruction_sets_and_pins():
    line = environment.describe_cpu()
    assert "PyTorch kernels" in line and "MKL_CBWR=" in line and "ATEN_CPU_CAPABILITY=" in line


def test_every_4bit_load_is_on_the_portable_cpu_path():
    import bitsandbytes as bnb

    model, _ = models.load_model(profiles.PROFILES["tiny"], "nf4-dq", environment.CPU)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 6 * 7 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert all(layer.compute_dtype == torch.float32 for layer in layers)
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n or "embed" in n} == {torch.float32}


def test_int8_on_cpu_is_float32_outside_the_int8_weights_and_its_cast_note_is_filtered(capsys):
    import bitsandbytes as bnb

    environment.quiet_known_noise(verbose=False)
    model, tokenizer = models.load_model(profiles.PROFILES["tiny"], "int8", environment.CPU)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    finally:
        logger.removeHandler(handler)
    assert logits.dtype == torch.float32
    assert not any("inputs will be cast" in str(r.msg) for r in records)
    assert "inputs will be cast" not in capsys.readouterr().err


def test_portability_settings_are_the_same_on_every_cpu_and_vary_level_and_threads():
    settings = runner.portability_settings()
    assert settings == runner.portability_settings()  # no argument, nothing read from the CPU
    assert [s.get("ATEN_CPU_CAPABILITY") for s in settings] == ["default", None]  # None: the pinned level
    threads = {s["OMP_NUM_THREADS"] for s in settings} | {helpers.PINNED_CPU_NUMERICS["OMP_NUM_THREADS"]}
    assert len(threads) == 3 and not any("avx512" in str(s).lower() for s in settings)


def test_a_portability_run_starts_from_the_pins_not_from_this_process():
    environ = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env = runner.portability_environment(environ, {"OMP_NUM_THREADS": "3"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "3"}
    # what the notebook's kernel then pins: MKL follows the thread count, the rest are the course's pins
    assert helpers.coherent_pins(env)["MKL_NUM_THREADS"] == "3"
    assert helpers.coherent_pins(env)["ATEN_CPU_CAPABILITY"] == "avx2"
    with pytest.raises(ValueError, match="only set pinned variables"):
        runner.portability_environment(environ, {"HF_HUB_OFFLINE": "0"})


def test_the_noise_banner_is_one_line_and_the_details_are_one_call_away(capsys, monkeypatch):
    monkeypatch.setattr(environment, "_quieted", False)
    names = environment.quiet_known_noise(verbose=True)
    banner = capsys.readouterr().out
    assert banner.count("\n") == 1 and all(name in banner for name in names)
    environment.describe_known_noise()
    details = capsys.readouterr().out.splitlines()
    assert len(details) == len(names) and "MatMul8bitLt" in "\n".join(details)


def test_coherent_pins_fill_in_what_the_environment_leaves_out():
    assert helpers.coherent_pins({}) == helpers.PINNED_CPU_NUMERICS
    assert helpers.coherent_pins({"OMP_NUM_THREADS": "1"})["MKL_NUM_THREADS"] == "1"
    assert "ATEN_CPU_CAPABILITY" not in helpers.coherent_pins({"ATEN_CPU_CAPABILITY": "default"})
    assert helpers.coherent_pins({"ATEN_CPU_CAPABILITY": "default"})["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    # PyTorch's AVX512 kernels send bitsandbytes' int8 matmul to torch._int_mm: oneDNN must not be held at AVX2
    assert "ONEDNN_MAX_CPU_ISA" not in helpers.coherent_pins({"ATEN_CPU_CAPABILITY": "AVX512"})
    # a value the user set is never replaced, even an incoherent one (load_model's int8 check refuses that case)
    assert "ONEDNN_MAX_CPU_ISA" not in helpers.coherent_pins({"ATEN_CPU_CAPABILITY": "avx512",
                                                             "ONEDNN_MAX_CPU_ISA": "AVX2"})
