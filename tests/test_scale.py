"""The scale smoke (helpers.scale), run end to end on the CPU with a small Llama config written into tmp_path.

The config is as small as bitsandbytes allows (every Linear dimension a multiple of 64, for its CPU 4-bit kernel) and
has the tiny tokenizer's 4,096-token vocabulary. Its exact sizes, derived by hand:

- per decoder layer: q 128x128, k 64x128, v 64x128, o 128x128, gate/up 256x128, down 128x256 = 147,456 weights;
  two layers = 294,912; embeddings 4,096 x 128 = 524,288 (lm_head the same again when untied); norms 5 x 128 = 640;
- parameters: 1,344,128 untied, 819,840 tied; float32 bytes = 4 x parameters + 256 (rotary buffers, 2 x 32 float32);
- int8: 294,912 weight bytes; row scales SCB = 4 bytes x (128 + 64 + 64 + 128 + 256 + 256 + 128) x 2 layers = 8,192;
- LoRA r = 8 on q/k/v/o: 8 x ((128+128) + (128+64) + (128+64) + (128+128)) x 2 layers = 14,336.
"""

import json
from pathlib import Path

import nbformat
import pytest
import torch

from helpers import lora, memory, scale
from helpers.environment import T4
from helpers.models import from_pretrained_kwargs

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_3B = REPO_ROOT / "data" / "reference" / "llama-3.2-3b.config.json"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")

SMALL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 4096,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1,
}
SCHEME_STEPS = ("load", "footprint == estimate", "from-scratch == stored", "forward pass", "LoRA count == formula",
                "LoRA forward == base + x ΔWᵀ", "release")
EXPECTED_NAMES = [
    "warm up the kernels", "build the random checkpoint",
    *(f"int8: {step}" for step in SCHEME_STEPS),
    *(f"nf4-dq: {step}" for step in SCHEME_STEPS[:3]), "nf4-dq: dequantize by hand == dequantize_4bit",
    *(f"nf4-dq: {step}" for step in SCHEME_STEPS[3:]),
    *(f"fp32: {step}" for step in SCHEME_STEPS if step != "from-scratch == stored"),
    "delete the checkpoint",
]
EXACT = {  # tied: (parameters, fp32 bytes, int8 reported, int8 true, nf4-dq reported, nf4-dq true)
    False: (1_344_128, 5_376_768, 4_492_032, 4_500_224, 4_344_576, 4_364_552),
    True: (819_840, 3_279_616, 2_394_880, 2_403_072, 2_247_424, 2_267_400),
}


def write_config(folder: Path, tied: bool, **changes) -> Path:
    path = folder / f"small-llama-{'tied' if tied else 'untied'}.config.json"
    path.write_text(json.dumps({**SMALL_CONFIG, "tie_word_embeddings": tied, **changes}))
    return path


@pytest.fixture(scope="module", params=[True], ids=["tied"])
def smoke(request, tmp_path_factory):
    """One full run with tied embeddings, as Llama-3.2-3B has them: (tied, results, work folder). Untied checkpoints
    are covered by test_random_checkpoint_contents and test_one_failure_does_not_hide_the_rest (which runs fp32
    untied); a second full run would add about 11 s to make test."""
    folder = tmp_path_factory.mktemp("scale")
    config = write_config(folder, request.param)
    return request.param, scale.run_scale_smoke(config, folder / "work", "cpu"), folder / "work"


def by_name(results) -> dict[str, scale.SmokeResult]:
    return {result.name: result for result in results}


# --------------------------------------------------------------------------------------------- the whole run on a CPU

def test_every_check_passes_in_order(smoke):
    _, results, _ = smoke
    assert [r.name for r in results] == EXPECTED_NAMES
    failed = [f"{r.name}: {r.detail}" for r in results if not r.passed]
    assert failed == []
    assert not any(r.skipped for r in results)
    assert all(r.seconds >= 0 for r in results)


def test_exact_sizes(smoke):
    tied, results, _ = smoke
    parameters, fp32, int8_reported, int8_true, dq_reported, dq_true = EXACT[tied]
    found = by_name(results)
    assert found["build the random checkpoint"].detail.startswith(
        f"{parameters:,} parameters in bfloat16, tied {tied}: ")
    for scheme, reported, true in (("fp32", fp32, fp32), ("int8", int8_reported, int8_true),
                                   ("nf4-dq", dq_reported, dq_true)):
        assert found[f"{scheme}: footprint == estimate"].detail == \
            f"reported {reported:,} bytes, true {true:,} bytes, both as estimated"
    for scheme in ("int8", "nf4-dq", "fp32"):
        assert found[f"{scheme}: LoRA count == formula"].detail == \
            "r = 8 on q_proj, k_proj, v_proj, o_proj: 14,336 trainable = formula"
        assert found[f"{scheme}: release"].detail.startswith("live tensor bytes back to +0 bytes of before loading")
        assert found[f"{scheme}: forward pass"].detail.startswith("8 tokens -> logits (1, 8, 4096) torch.float32")


def test_from_scratch_details_are_exact_on_cpu(smoke):
    _, results, _ = smoke
    found = by_name(results)
    assert found["int8: from-scratch == stored"].detail == (
        "model.layers.0.mlp.down_proj: 0 of 32,768 codes differ (cpu: exactly); 128 row scales identical")
    assert found["nf4-dq: from-scratch == stored"].detail == (
        "model.layers.0.mlp.down_proj from torch.float32: 0 of 32,768 codes differ (cpu: exactly); "
        "double quantization: 0 of 512 codes differ (cpu: exactly)")
    assert found["nf4-dq: dequantize by hand == dequantize_4bit"].detail == (
        "model.layers.0.mlp.down_proj: 32,768 weights in torch.float32, identical")


def test_checkpoint_deleted_at_the_end(smoke):
    _, results, work = smoke
    assert not (work / "checkpoint").exists()
    assert by_name(results)["delete the checkpoint"].passed


def test_lora_formula_matches_the_docstring():
    assert lora.lora_param_count(SMALL_CONFIG | {"tie_word_embeddings": False}, 8, scale.LORA_TARGETS) == 14_336


# --------------------------------------------------------------------------------------------- the checkpoint itself

@pytest.mark.parametrize("tied", [False, True])
def test_random_checkpoint_contents(tmp_path, tied):
    from safetensors import safe_open

    folder = scale.build_random_checkpoint(write_config(tmp_path, tied), tmp_path / "ckpt", seed=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", scale.MARKER_FILE, *scale.TOKENIZER_FILES])
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        assert {handle.get_tensor(name).dtype for name in names} == {torch.bfloat16}
        assert torch.equal(handle.get_tensor("model.norm.weight"), torch.ones(128, dtype=torch.bfloat16))
    assert ("lm_head.weight" in names) == (not tied)  # a tied checkpoint stores the embedding matrix once
    assert len(names) == 2 * 9 + 2 + (not tied)  # 7 Linear + 2 norms per layer, embeddings, final norm
    made = json.loads((folder / scale.MARKER_FILE).read_text())
    assert (made["seed"], made["dtype"], made["tied"], made["parameters"]) == (3, "bfloat16", tied, EXACT[tied][0])
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is tied
    embeddings = scale.checkpoint_tensor(folder, "model.embed_tokens.weight").float()
    assert abs(embeddings.std().item() - scale.INIT_STD) < 0.001 and abs(embeddings.mean().item()) < 0.001


def test_random_checkpoint_loads_tied(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = scale.build_random_checkpoint(write_config(tmp_path, True), tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(folder)) == 4096


def test_same_seed_same_weights(tmp_path):
    config = write_config(tmp_path, False)
    first = scale.build_random_checkpoint(config, tmp_path / "a", seed=7)
    second = scale.build_random_checkpoint(config, tmp_path / "b", seed=7)
    other = scale.build_random_checkpoint(config, tmp_path / "c", seed=8)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(scale.checkpoint_tensor(first, name), scale.checkpoint_tensor(second, name))
    assert not torch.equal(scale.checkpoint_tensor(first, name), scale.checkpoint_tensor(other, name))


def test_sharded_checkpoint_reads_one_tensor(tmp_path):
    config = write_config(tmp_path, False)
    whole = scale.build_random_checkpoint(config, tmp_path / "whole")
    sharded = scale.build_random_checkpoint(config, tmp_path / "sharded", max_shard_size="1MB")
    assert len(scale.checkpoint_files(sharded)) == 3 and (sharded / "model.safetensors.index.json").is_file()
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(scale.checkpoint_tensor(whole, name), scale.checkpoint_tensor(sharded, name))
    with pytest.raises(KeyError, match="model.layers.9.mlp.down_proj.weight"):
        scale.checkpoint_tensor(sharded, "model.layers.9.mlp.down_proj.weight")


def test_overwrite_replaces_only_our_checkpoints(tmp_path):
    config = write_config(tmp_path, False)
    folder = scale.build_random_checkpoint(config, tmp_path / "ckpt", seed=1)
    with pytest.raises(ValueError, match="is not empty"):
        scale.build_random_checkpoint(config, folder)
    assert scale.build_random_checkpoint(config, folder, seed=2, overwrite=True) == folder
    assert json.loads((folder / scale.MARKER_FILE).read_text())["seed"] == 2
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="only folders holding its random_checkpoint.json"):
        scale.build_random_checkpoint(config, foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "not a checkpoint"


# --------------------------------------------------------------------------------------------- argument errors

@pytest.mark.parametrize("changes,kwargs,error,message", [
    ({}, {"dtype": torch.int8}, ValueError, "dtype must be one of torch.float32, torch.bfloat16, torch.float16"),
    ({}, {"seed": -1}, ValueError, "seed must be a non-negative int, got -1"),
    ({}, {"seed": True}, ValueError, "seed must be a non-negative int, got True"),
    ({}, {"device": "tpu"}, ValueError, "device must be one of cpu, cuda, got 'tpu'"),
    ({"model_type": "gpt2"}, {}, ValueError, "builds Llama models only"),
])
def test_build_argument_errors(tmp_path, changes, kwargs, error, message):
    with pytest.raises(error, match=message):
        scale.build_random_checkpoint(write_config(tmp_path, False, **changes), tmp_path / "ckpt", **kwargs)
    assert not (tmp_path / "ckpt").exists()  # nothing is created before the arguments are checked


def test_missing_config_and_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No config file at .*data/reference/"):
        scale.build_random_checkpoint(tmp_path / "missing.json", tmp_path / "ckpt")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        scale.build_random_checkpoint(write_config(tmp_path, False), a_file)
    with pytest.raises(TypeError, match="config_path must be a path"):
        scale.build_random_checkpoint(42, tmp_path / "ckpt")


@NO_CUDA
def test_cuda_refused_without_cuda(tmp_path):
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
        scale.build_random_checkpoint(write_config(tmp_path, False), tmp_path / "ckpt", device="cuda")
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
        scale.run_scale_smoke(write_config(tmp_path, False), tmp_path / "work", "cuda")


@pytest.mark.parametrize("schemes,message", [
    ("int8", "non-empty list of scheme names"),
    ([], "non-empty list of scheme names"),
    (["int9"], "Unknown scheme 'int9'"),
    (["int8", "int8"], "more than once"),
])
def test_scheme_errors(tmp_path, schemes, message):
    with pytest.raises(ValueError, match=message):
        scale.run_scale_smoke(write_config(tmp_path, False), tmp_path / "work", "cpu", schemes)
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------------------------- the command line

@NO_CUDA
def test_main_refuses_cuda_with_exit_2(tmp_path, capsys):
    code = scale.main(["--device", "cuda", "--config", str(write_config(tmp_path, False)), "--work",
                       str(tmp_path / "work")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("scale smoke refused: --device cuda, but no CUDA device is available here")
    assert "--device cpu" in error
    assert not (tmp_path / "work").exists()


def test_main_refuses_a_missing_config_with_exit_2(tmp_path, capsys):
    assert scale.main(["--device", "cpu", "--config", str(tmp_path / "nope.json"), "--work", str(tmp_path)]) == 2
    assert "scale smoke refused: No config file at" in capsys.readouterr().err


def test_main_keep_and_summary(tmp_path, capsys):
    work = tmp_path / "work"
    code = scale.main(["--device", "cpu", "--config", str(write_config(tmp_path, True)), "--work", str(work),
                       "--schemes", "nf4-dq", "--keep"])
    out = capsys.readouterr().out
    assert code == 0
    assert (work / "checkpoint" / scale.MARKER_FILE).is_file()  # kept
    summary = out[out.index("scale smoke of "):].splitlines()
    assert len(summary) == 1 + 10 + 1  # header, 2 setup steps + 8 nf4-dq steps (no deletion), totals
    assert summary[-1].startswith("scale smoke: 10 ok, 0 FAILED, 0 skipped in ")
    assert all(line.lstrip().startswith("ok ") for line in summary[1:-1])


def test_one_failure_does_not_hide_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scale.lora, "lora_param_count", lambda config, r, targets: 1)
    code = scale.main(["--device", "cpu", "--config", str(write_config(tmp_path, False)), "--work",
                       str(tmp_path / "work"), "--schemes", "fp32"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in out and "fp32: LoRA count == formula: ClaimFailed: This notebook's claim does not hold" in out
    assert "scale smoke: 8 ok, 1 FAILED, 0 skipped in " in out  # forward, LoRA forward, release, deletion still ran


def test_schemes_that_do_not_fit_are_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scale, "_available_bytes", lambda device: 0)
    code = scale.main(["--device", "cpu", "--config", str(write_config(tmp_path, False)), "--work",
                       str(tmp_path / "work"), "--schemes", "int8,fp32"])
    captured = capsys.readouterr()
    assert code == 1  # nothing was loaded, so nothing was checked
    assert "no scheme fits this device" in captured.err
    assert "SKIP     0.0s  int8: load: skipped: needs 1.00 GB (0.00 GB of model + 1 GB headroom)" in captured.out


def test_list_cells(capsys):
    assert scale.main(["--list-cells"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("01_full_precision:\n  [any weights, not re-run] 3. One decoder layer, part by part: ")
    assert "06_qlora_finetune:" in out and "[needs trained weights] 6. A short training run" in out


# --------------------------------------------------------------------------------------------- small pieces

def test_profile_of_the_random_checkpoint(tmp_path):
    profile = scale.random_checkpoint_profile(REFERENCE_3B, tmp_path, "cuda")
    assert (profile.name, profile.on_hub, profile.gated, profile.needs_gpu) == \
        ("llama-3.2-3b-random", False, False, True)
    kwargs = from_pretrained_kwargs(profile, "nf4-dq", T4)  # what a T4 would load: float16 compute, all on the GPU
    assert kwargs["dtype"] == torch.float16 and kwargs["device_map"] == "auto"
    assert scale.random_checkpoint_profile(REFERENCE_3B, tmp_path, "cpu").needs_gpu is False


def test_time_budget_figures_of_the_3b():
    config = memory.load_reference_config(REFERENCE_3B)
    assert scale._checkpoint_bytes(config, torch.bfloat16) == 6_425_499_648  # "6.43 GB" in the module docstring
    assert memory.estimate_footprint(config, "fp32").true == 12_850_999_808  # float32 fits a T4 only just


def test_forward_tolerances():
    assert [scale.forward_tolerance(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == \
        [1e-5, 0.03125, 0.00390625]


def test_scheme_fits():
    estimate = memory.FootprintEstimate("fp32", torch.float32, 10**18, 10**18)
    fits, why = scale.scheme_fits(estimate, "cpu")
    assert fits is False and why.startswith("needs 1000000001.00 GB")


def test_result_line():
    assert scale.SmokeResult("x", False, "ClaimFailed: a\nb", 1.5).line() == "FAILED     1.5s  x: ClaimFailed: a"
    assert scale.SmokeResult("y", True, "z" * 200, 0.0).line() == "    ok     0.0s  y: " + "z" * 93 + "..."
    assert scale.SmokeResult("w", True, "skipped: no room", 0.0, skipped=True).line().startswith("  SKIP")


# --------------------------------------------------------------------------------------------- which cells are covered

def notebook_sections(name: str) -> set[str]:
    notebook = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    return {line[3:].strip() for cell in notebook.cells if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if line.startswith("## ")}


def test_coverage_names_real_sections():
    notebooks = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("0[1-6]*_*.ipynb"))
    assert sorted({row.notebook for row in scale.SCALE_SMOKE_CELLS}) == notebooks
    for row in scale.SCALE_SMOKE_CELLS:
        assert row.section in notebook_sections(row.notebook), f"{row.notebook}: no section {row.section!r}"
        assert row.status in scale.COVERAGE_STATUSES


def test_covered_rows_name_checks_the_smoke_runs(smoke):
    _, results, _ = smoke
    names = [r.name for r in results]
    for row in scale.SCALE_SMOKE_CELLS:
        if row.status == scale.COVERED:
            how = row.how.replace("<scheme>", "nf4-dq")
            assert any(name in how for name in names), f"{row.notebook} {row.section}: {row.how}"


def test_trained_weight_cells_are_not_claimed():
    trained = {(row.notebook, row.section.split(".")[0]) for row in scale.SCALE_SMOKE_CELLS
               if row.status == scale.TRAINED}
    # quality and perplexity, greedy generations, the pricer answers, the loss going down
    assert {("02_int8", "7"), ("03_nf4", "9"), ("01_full_precision", "4"), ("02_int8", "1"),
            ("04_lora_adapters", "11"), ("06_qlora_finetune", "6")} <= trained
