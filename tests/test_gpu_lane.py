"""The GPU lane, checked on a machine without a GPU: clean refusal, workflow file, T4 memory plans."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import memory, models, profiles, runner
from helpers.environment import T4

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "gpu-lane.yml"


def test_gpu_test_command_refuses_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "helpers.runner", "gpu-test"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == runner.GPU_LANE_EXIT_REFUSED
    assert "needs a CUDA GPU" in result.stderr and "make test" in result.stderr


@pytest.mark.parametrize("cuda,profile,token,expected", [
    (False, None, True, "needs a CUDA GPU"),
    (True, "llama-9", True, "Unknown profile"),
    (True, "tiny", True, "offline one"),
    (True, "llama-3.2-3b", False, "gated: accept its license.*HF_TOKEN"),
    (True, "llama-3.1-8b", True, None),
])
def test_gpu_lane_refusals(cuda, profile, token, expected):
    refusal = runner.gpu_lane_refusal(cuda, profile, token)
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None
        import re
        assert re.search(expected, refusal), refusal


def test_workflow_is_valid_yaml_naming_the_gpu_test_command():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = next(iter(workflow["jobs"].values()))
    assert "self-hosted" in job["runs-on"] and "t4" in job["runs-on"]
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "make gpu-test" in commands and "make gpu-setup" in commands
    assert any(step.get("uses", "").startswith("actions/upload-artifact") for step in job["steps"])
    assert "gpu-test:" in (REPO_ROOT / "Makefile").read_text()
    assert "make gpu-test" in (REPO_ROOT / "README.md").read_text()


def test_gpu_setup_keeps_the_runners_torch():
    from helpers.environment import requirements_without_torch

    packages = requirements_without_torch(REPO_ROOT / "requirements.txt")
    assert not any(p.lower().startswith("torch") for p in packages)
    assert any(p.startswith("bitsandbytes==") for p in packages)


@pytest.mark.parametrize("notebook", list(memory.NOTEBOOK_SCHEMES))
def test_t4_memory_plan_matches_the_estimator_and_the_automatic_profile_fits(notebook):
    name, _ = profiles.automatic_profile_name(T4)
    profile = profiles.PROFILES[name]
    plan = models.memory_plan(notebook, profile, T4, memory.T4_LIMITS)
    config = memory.load_reference_config(profile.reference_config)
    kwargs = {s: models.from_pretrained_kwargs(profile, s, T4)["dtype"] for s in memory.NOTEBOOK_SCHEMES[notebook]}
    training = notebook == "06_qlora_finetune"
    expected = max(
        memory.estimate_footprint(config, s, None if s in memory.FLOAT_SCHEMES else kwargs[s]).true
        + memory.activation_bytes(config, kwargs[s], training)
        for s in memory.NOTEBOOK_SCHEMES[notebook])
    assert plan.gpu_peak == expected + memory.CUDA_CONTEXT_BYTES
    assert plan.fits, f"{notebook} does not fit a T4 with {name}"


def test_llama_8b_in_float32_is_refused_on_a_t4_with_advice():
    plan = models.memory_plan("01_full_precision", profiles.PROFILES["llama-3.1-8b"], T4, memory.T4_LIMITS)
    assert not plan.fits
    with pytest.raises(RuntimeError, match="Choose a smaller profile.*llama-3.2-3b"):
        memory.check_memory_plan(plan, "llama-3.1-8b")
    assert models.memory_plan("05_weight_packing", profiles.PROFILES["llama-3.1-8b"], T4, memory.T4_LIMITS).fits


def test_unknown_notebook_in_a_plan_is_refused():
    with pytest.raises(ValueError, match="Unknown notebook"):
        memory.plan_notebook("07_nope", memory.load_reference_config(profiles.PROFILES["tiny"].reference_config),
                             False, memory.T4_LIMITS)


def test_cpu_plan_for_the_tiny_profile_fits_and_prints(capsys):
    plan = models.check_memory_before_loading("03_nf4", profiles.PROFILES["tiny"])
    assert plan.gpu_peak is None and plan.fits and torch.cuda.is_available() is False
    assert "fits this machine: True" in capsys.readouterr().out
