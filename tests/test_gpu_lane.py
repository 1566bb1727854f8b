"""The GPU lanes, checked without a GPU: clean refusals, the workflows and their gates, T4 memory plans."""

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
SMOKE_WORKFLOW = REPO_ROOT / ".github" / "workflows" / "gpu-smoke.yml"
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.y*ml"))
PULL_REQUEST_EVENTS = {"pull_request", "pull_request_target", "pull_request_review", "pull_request_review_comment"}
DEFAULT_BRANCH_ONLY = "github.ref == format('refs/heads/{0}', github.event.repository.default_branch)"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def events(workflow: dict) -> dict | str | list:
    return workflow["on"] if "on" in workflow else workflow[True]  # YAML 1.1 reads a bare `on` key as True


def triggers(workflow: dict) -> set[str]:
    on = events(workflow)
    return {on} if isinstance(on, str) else set(on)


def pull_request_workflows() -> list[Path]:
    return [path for path in WORKFLOWS if triggers(load(path)) & PULL_REQUEST_EVENTS]


@pytest.mark.parametrize("lane,message", [("gpu-test", "needs a CUDA GPU"), ("gpu-smoke", "needs a CUDA GPU")])
def test_gpu_lanes_refuse_without_cuda(lane, message):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "helpers.runner", lane], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == runner.GPU_LANE_EXIT_REFUSED
    assert result.stderr.startswith(f"{lane} refused: ") and message in result.stderr and "make test" in result.stderr


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


KEPT_GPU_VENV = "$RUNNER_TOOL_CACHE/llm-quantization-course/venv-gpu"
"""Where the workflows keep the GPU venv: outside the checkout, which actions/checkout cleans on every run."""


def test_every_gpu_workflow_keeps_its_venv_outside_the_checkout_so_later_runs_need_no_network(tmp_path):
    import subprocess

    for path in (WORKFLOW, SMOKE_WORKFLOW):
        runs = [step["run"] for step in next(iter(load(path)["jobs"].values()))["steps"] if "run" in step]
        assert runs and all(run.startswith("make gpu-") and f'GPU_VENV="{KEPT_GPU_VENV}"' in run for run in runs), path
    # make honours it: gpu-setup creates and fills that venv, the lanes run its python
    venv = tmp_path / "kept" / "venv-gpu"
    for target, expected in (("gpu-setup", f"{venv}/bin/python -m helpers.runner gpu-setup"),
                             ("gpu-smoke", f"{venv}/bin/python -m helpers.runner gpu-smoke")):
        dry = subprocess.run(["make", "-n", target, f"GPU_VENV={venv}"], cwd=REPO_ROOT, capture_output=True, text=True)
        assert dry.returncode == 0 and expected in dry.stdout, dry.stdout + dry.stderr
    assert f"-m venv --system-site-packages {venv}" in subprocess.run(
        ["make", "-n", "gpu-setup", f"GPU_VENV={venv}"], cwd=REPO_ROOT, capture_output=True, text=True).stdout


def test_workflow_is_valid_yaml_naming_the_gpu_test_command():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = next(iter(workflow["jobs"].values()))
    assert "self-hosted" in job["runs-on"] and "t4" in job["runs-on"]
    commands = "\n".join(step.get("run", "") for step in job["steps"])
    assert "make gpu-test" in commands and "make gpu-setup" in commands
    upload = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert upload["with"]["path"].split() == ["build/gpu/*.ipynb", "build/gpu/junit.xml"]
    assert "gpu-test:" in (REPO_ROOT / "Makefile").read_text()
    assert "make gpu-test" in (REPO_ROOT / "README.md").read_text()


def test_gpu_setup_keeps_the_runners_torch():
    from helpers import colab

    packages = runner.gpu_setup_pins(colab.read_pins((REPO_ROOT / "requirements.txt").read_text()))
    assert not any(name.lower().startswith("torch") for name in packages)
    assert packages["bitsandbytes"] == "0.50.2"


def test_gpu_setup_installs_the_no_deps_pins_with_no_deps_when_missing_or_at_another_version(monkeypatch, capsys):
    from helpers import colab

    text = (REPO_ROOT / "requirements.txt").read_text()
    present = {**colab.read_pins(text), "torch": "2.9.0+cu128", "compressed-tensors": "0.18.0"}  # no llmcompressor
    monkeypatch.setattr(colab, "installed_versions", lambda: dict(present))
    calls = []
    monkeypatch.setattr(colab, "pip_install", lambda specs, constraints, python=None, no_deps=False, index_options=():
                        calls.append((list(specs), no_deps)))
    assert runner.run_gpu_setup(REPO_ROOT / "requirements.txt") == 0
    assert calls == [(["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "llama-models==0.3.0"], True)]
    assert "installed llmcompressor==0.14.0.1, compressed-tensors==0.19.0, llama-models==0.3.0;" in \
        capsys.readouterr().out  # the rest were right
    present.update(colab.read_no_deps_pins(text))
    calls.clear()
    assert runner.run_gpu_setup(REPO_ROOT / "requirements.txt") == 0
    assert calls == [] and "installed nothing" in capsys.readouterr().out  # all present: offline, pip never runs


@pytest.mark.parametrize("notebook", list(memory.NOTEBOOK_SCHEMES))
def test_t4_memory_plan_matches_the_estimator_and_the_automatic_profile_fits(notebook):
    name, _ = profiles.automatic_profile_name(T4)
    profile = profiles.PROFILES[name]
    plan = models.memory_plan(notebook, profile, T4, memory.T4_LIMITS)
    config = memory.load_reference_config(profile.reference_config)
    compute = {s: models.from_pretrained_kwargs(profile, s, T4)["dtype"] for s in memory.NOTEBOOK_SCHEMES[notebook]}
    training = notebook in memory.TRAINING_NOTEBOOKS
    # prepare_model_for_kbit_training upcasts every module that is not 4-bit to float32
    kwargs = {s: torch.float32 for s in compute} if training else compute
    expected = max(
        memory.estimate_footprint(config, s, None if s in memory.FLOAT_SCHEMES else kwargs[s]).true
        + memory.activation_bytes(config, kwargs[s], training)
        + (memory.dense_copy_bytes(config, compute[s]) if s in memory.FOUR_BIT_SCHEMES else 0)
        for s in memory.NOTEBOOK_SCHEMES[notebook])
    assert plan.gpu_peak == expected + memory.CUDA_CONTEXT_BYTES
    assert plan.fits, f"{notebook} does not fit a T4 with {name}"


def test_the_training_plan_counts_the_float32_upcast_of_prepare_model_for_kbit_training():
    config = memory.load_reference_config(profiles.PROFILES["llama-3.1-8b"].reference_config)
    plan = memory.plan_notebook("06_qlora_finetune", config, True, memory.T4_LIMITS)
    upcast = memory.estimate_footprint(config, "nf4-dq", torch.float32).true
    in_bfloat16 = memory.estimate_footprint(config, "nf4-dq", torch.bfloat16).true
    counts = memory.parameter_counts_from_config(config)
    not_4bit = counts["embeddings"] + counts["norms"] + counts["lm_head"]
    assert upcast - in_bfloat16 == 2 * not_4bit  # 2 more bytes for every value that is not 4-bit
    assert plan.gpu_peak == (upcast + memory.activation_bytes(config, torch.float32, training=True)
                             + memory.dense_copy_bytes(config, torch.bfloat16) + memory.CUDA_CONTEXT_BYTES)


def test_07s_plan_counts_its_cpu_backup_of_the_decoder_layers_which_equals_the_real_backup():
    from helpers import groupwise

    config = memory.load_reference_config(profiles.PROFILES["llama-3.2-3b"].reference_config)
    plan = memory.plan_notebook("07_beyond_bitsandbytes", config, True, memory.T4_LIMITS)
    backup = memory.notebook_cpu_extra_bytes("07_beyond_bitsandbytes", config)
    counts = memory.parameter_counts_from_config(config)
    decoder = sum(counts.values()) - counts["embeddings"] - counts["lm_head"] - config.hidden_size  # final norm
    assert backup == 2 * decoder and round(backup / 1e9, 2) == 5.64  # more than the 5 GB shard the plan held before
    assert plan.cpu_peak == memory.MAX_SHARD_BYTES + backup and plan.fits  # 10.64 GB of a Colab session's 12 GB
    assert memory.notebook_cpu_extra_bytes("03_nf4", config) == 0
    # the estimate is the real backup's size, to the byte, on a model with a bfloat16 checkpoint
    model, _ = models.load_model(profiles.PROFILES["tiny"], "fp32")
    real = sum(t.nelement() * t.element_size() for t in groupwise.backup_decoder_weights(model).values())
    assert real == memory.notebook_cpu_extra_bytes("07_beyond_bitsandbytes", model.config)


def test_a_4bit_plan_holds_the_largest_layer_rebuilt_in_its_compute_dtype():
    config = memory.load_reference_config(profiles.PROFILES["llama-3.1-8b"].reference_config)
    assert memory.dense_copy_bytes(config, torch.bfloat16) == 14336 * 4096 * 2  # gate_proj, notebook 03a section 5
    assert memory.dense_copy_bytes(config, torch.float32) == 14336 * 4096 * 4
    limits = memory.MemoryLimits(gpu_bytes=80 * 10**9, cpu_bytes=64 * 10**9)
    four_bit = memory.plan_notebook("05_weight_packing", config, True, limits)  # one nf4-dq load, bfloat16 compute
    estimate = memory.estimate_footprint(config, "nf4-dq", torch.bfloat16).true
    assert four_bit.gpu_peak == (estimate + memory.activation_bytes(config, torch.bfloat16)
                                 + memory.dense_copy_bytes(config, torch.bfloat16) + memory.CUDA_CONTEXT_BYTES)


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


def test_no_workflow_uses_pull_request_target():
    assert WORKFLOWS and not any("pull_request_target" in triggers(load(path)) for path in WORKFLOWS)


def test_hub_lane_runs_weekly_and_by_hand_on_the_default_branch_only():
    workflow = load(WORKFLOW)
    assert triggers(workflow) == {"workflow_dispatch", "schedule"}
    assert all(job["if"] == DEFAULT_BRANCH_ONLY for job in workflow["jobs"].values())
    assert "${{ secrets.HF_TOKEN }}" in WORKFLOW.read_text()  # the one lane that needs it


def test_smoke_lane_runs_on_pull_requests_only_after_a_maintainer_approves():
    workflow = load(SMOKE_WORKFLOW)
    assert triggers(workflow) == {"pull_request", "workflow_dispatch"}
    assert set(events(workflow)["pull_request"]["types"]) == {
        "opened", "synchronize", "reopened", "labeled"}
    job = workflow["jobs"]["smoke"]
    assert job["if"] == ("github.event_name == 'workflow_dispatch' || "
                         "contains(github.event.pull_request.labels.*.name, 'run-gpu')")
    assert job["environment"] == "gpu-smoke"  # required reviewers approve every run (see the workflow's comment)
    assert "self-hosted" in job["runs-on"]
    assert [step.get("run") for step in job["steps"] if "run" in step] == [
        f'make gpu-setup GPU_VENV="{KEPT_GPU_VENV}"', f'make gpu-smoke GPU_VENV="{KEPT_GPU_VENV}"']
    upload = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert upload["with"]["path"].split() == ["build/gpu-smoke/*.ipynb", "build/gpu-smoke/junit.xml"]
    assert workflow["permissions"] == {"contents": "read"}


def test_every_self_hosted_job_a_pull_request_can_start_waits_for_an_approved_environment():
    for path in pull_request_workflows():
        for name, job in load(path)["jobs"].items():
            if "self-hosted" in job.get("runs-on", []):
                assert job.get("environment"), f"{path.name}: job {name} runs a pull request's code unreviewed"


def test_no_secret_is_reachable_from_a_pull_request():
    assert pull_request_workflows() == [SMOKE_WORKFLOW]
    for path in pull_request_workflows():
        workflow = load(path)
        texts = [yaml.safe_dump({key: value for key, value in workflow.items() if key not in ("on", True)})]
        for job in workflow["jobs"].values():
            assert "secrets" not in job, "a pull-request job passes secrets to a reusable workflow"
            called = job.get("uses", "")
            if called.startswith("./"):
                texts.append((REPO_ROOT / called).read_text())
        assert not any("secrets." in text or "github.token" in text for text in texts), path.name


def test_makefile_and_readme_name_every_gpu_command():
    makefile, readme = (REPO_ROOT / "Makefile").read_text(), (REPO_ROOT / "README.md").read_text()
    for target in ("gpu-setup", "gpu-smoke", "gpu-test", "set-repository"):
        assert f"\n{target}:" in makefile and f"make {target}" in readme
