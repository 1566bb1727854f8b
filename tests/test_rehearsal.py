"""The rehearsal's pieces: Llama 3's tokenizer, the local Hub cache, the rehearsed hardware and the lane's command."""

import json
from pathlib import Path

import nbformat
import pytest
import torch

from helpers import environment, models, profiles, rehearsal

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return rehearsal.build_llama3_tokenizer()


def test_the_converted_tokenizer_is_llama_3s(llama3_tokenizer):
    rehearsal.check_llama3_tokenizer(llama3_tokenizer)  # "Hello world" -> 128000, 9906, 1917 as on the Hub
    assert llama3_tokenizer.bos_token_id == 128000 and llama3_tokenizer.eos_token_id == 128001
    assert llama3_tokenizer.convert_ids_to_tokens([128009, 128255]) == ["<|eot_id|>", "<|reserved_special_token_247|>"]
    assert llama3_tokenizer.decode(llama3_tokenizer("Price is $137.00").input_ids, skip_special_tokens=True) == \
        "Price is $137.00"


def test_a_tokenizer_that_is_not_llama_3s_is_refused():
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(REPO_ROOT / "data" / "tiny-llama")
    with pytest.raises(ValueError, match="not Llama 3's tokenizer"):
        rehearsal.check_llama3_tokenizer(tiny)


def test_the_rehearsal_config_is_the_real_one_with_fewer_layers():
    config = rehearsal.rehearsal_config("llama-3.2-3b")
    real = json.loads((REPO_ROOT / "data" / "reference" / "llama-3.2-3b.config.json").read_text())
    assert config["num_hidden_layers"] == rehearsal.REHEARSAL_LAYERS < real["num_hidden_layers"]
    assert {k: v for k, v in config.items() if k not in ("num_hidden_layers", "torch_dtype")} == \
        {k: v for k, v in real.items() if not k.startswith("_") and k not in ("num_hidden_layers", "torch_dtype")}
    with pytest.raises(ValueError, match="at least 3 layers"):
        rehearsal.rehearsal_config("llama-3.2-3b", layers=2)
    with pytest.raises(ValueError, match="not 'tiny'"):
        rehearsal.rehearsal_config("tiny")


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32))


def test_hub_ids_resolve_offline_from_the_cache_the_rehearsal_writes(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    profile = profiles.get_profile("llama-3.2-3b")
    model = small_llama()
    model.save_pretrained(rehearsal.snapshot_folder(tmp_path, profile.model_id, "test"))
    rehearsal.build_adapter_snapshot(tmp_path, "llama-3.2-3b", small_llama(), rehearsal.HUB_ADAPTER_SHAPE)
    assert (tmp_path / "models--meta-llama--Llama-3.2-3B" / "refs" / "main").is_file()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = AutoModelForCausalLM.from_pretrained(profile.model_id)  # the very call a Colab notebook makes
    adapted = PeftModel.from_pretrained(loaded, profile.adapter_id)
    settings = adapted.peft_config["default"]
    assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (32, 64, 0.1)
    assert sorted(settings.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # a trained adapter's B is not zero


def test_a_rehearsal_decides_for_the_gpu_and_executes_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setenv(environment.REHEARSAL_ENV_VAR, "t4")
    hardware = environment.detect_hardware()
    assert hardware.device == "cuda" and hardware.compute_capability == (7, 5) and hardware.rehearsal
    assert hardware.execution_device == "cpu" and "rehearsed" in hardware.describe()
    kwargs = models.from_pretrained_kwargs(profiles.get_profile("llama-3.2-3b"), "nf4-dq", hardware)
    assert "device_map" not in kwargs  # on this CPU
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float16  # a T4's decision
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(profiles.PROFILE_ENV_VAR, "llama-3.2-3b")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert profiles.choose_profile().name == "llama-3.2-3b"  # offline, no token: the rehearsal's own cache
    assert "rehearsed" in capsys.readouterr().out
    monkeypatch.setenv(environment.REHEARSAL_ENV_VAR, "h100")
    with pytest.raises(ValueError, match="t4, a100-40gb"):
        environment.detect_hardware()


def test_the_rehearsal_command_runs_nbval_lax_with_the_profiles_decisions(tmp_path):
    notebook = REPO_ROOT / "notebooks" / "01_full_precision.ipynb"
    argv, env = rehearsal.rehearsal_command("llama-3.1-8b", [notebook], tmp_path / "cache", tmp_path / "out",
                                            {"PATH": "/bin"}, python="python")
    assert argv[:4] == ["python", "-m", "pytest", "--nbval-lax"] and "notebooks/01_full_precision.ipynb" in argv
    assert f"--nbval-keep={tmp_path / 'out'}" in argv and f"--junitxml={tmp_path / 'out' / 'junit.xml'}" in argv
    assert env == {"PATH": "/bin", "COURSE_WORKLOAD": "small", "COURSE_PROFILE": "llama-3.1-8b",
                   "COURSE_REHEARSAL": "a100-40gb", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    _, full = rehearsal.rehearsal_command("llama-3.2-3b", [notebook], tmp_path, tmp_path, {"COURSE_WORKLOAD": "full"})
    assert full["COURSE_WORKLOAD"] == "full"  # the caller's choice stands
    with pytest.raises(ValueError, match="not 'tiny'"):
        rehearsal.rehearsal_command("tiny", [notebook], tmp_path, tmp_path, {})


def test_claim_counts_tell_laws_from_observations(tmp_path):
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=(
        "✓ estimate == measured: True\n- not checked: top-1 agreement above 98% (random weights)\n"
        "✓ memory returned: True\nplain line\n"))]
    notebook.cells = [cell]
    nbformat.write(notebook, tmp_path / "n.ipynb")
    assert rehearsal.claim_counts(tmp_path / "n.ipynb") == (2, 1)


@pytest.mark.parametrize("bad", [dict(r=0), dict(lora_alpha=0), dict(lora_dropout=1.0), dict(target_modules=())])
def test_an_adapter_shape_that_is_not_lora_is_refused(bad):
    with pytest.raises(ValueError, match="not a LoRA adapter shape"):
        rehearsal.AdapterShape(**bad)


def test_float16_products_are_float32_accumulations_rounded_once_even_in_the_backward():
    import subprocess
    import sys

    # the emulation replaces two CPU kernels for the rest of a process: run it in its own
    script = """
import torch
from helpers import environment
a, b = environment.portable_randn(5, 64, seed=1).half(), environment.portable_randn(64, 3, seed=2).half()
native = a @ b
assert environment.emulate_gpu_float16_products() and not environment.emulate_gpu_float16_products()
expected = (a.float().double() @ b.float().double()).float().half()  # float32 accumulation, then one rounding
wide = (a.float() @ b.float()).half()
assert torch.equal(a @ b, wide) and torch.equal(torch.bmm(a[None], b[None])[0], wide)
assert (wide.float() - expected.float()).abs().max() <= 2 ** -10 * expected.float().abs().max()
weight = torch.nn.Parameter(b.t().contiguous())
x = a.clone().requires_grad_()
torch.nn.functional.linear(x, weight).sum().backward()
assert x.grad.dtype == torch.float16 and torch.equal(x.grad, (torch.ones(5, 3) @ weight.detach().float()).half())
class ProductInBackward(torch.autograd.Function):  # as bitsandbytes' 4-bit matmul: a product in Python code
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, grad):
        return torch.matmul(grad, b @ b.t())
seen = a.clone().requires_grad_()
ProductInBackward.apply(seen).sum().backward()
assert torch.equal(seen.grad, (torch.ones(5, 64) @ (b.float() @ b.float().t()).half().float()).half())
bf = a.to(torch.bfloat16)
assert torch.equal(bf @ bf.t(), (bf.float() @ bf.float().t()).to(torch.bfloat16))
f32 = environment.portable_randn(4, 6, seed=4)
assert torch.equal(f32 @ f32.t(), torch.addmm(torch.zeros(4, 4), f32, f32.t(), beta=0))  # other dtypes: same BLAS call
print("ok", torch.equal(native, wide))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-2000:]
