"""Profile choice and from_pretrained arguments, for every profile x scheme x hardware, with faked hardware."""

from pathlib import Path

import pytest
import torch

from helpers import environment, memory, models, profiles
from helpers.environment import A100_40GB, CPU, T4, Hardware

REPO_ROOT = Path(__file__).resolve().parents[1]

HARDWARE = {"cpu": CPU, "t4": T4, "a100": A100_40GB}


@pytest.mark.parametrize("hardware,expected", [(CPU, "tiny"), (T4, "llama-3.2-3b"), (A100_40GB, "llama-3.1-8b"),
                                               (Hardware("cuda", "L4", (8, 9), 23_000_000_000), "llama-3.2-3b")])
def test_automatic_choice(hardware, expected):
    name, reason = profiles.automatic_profile_name(hardware)
    assert name == expected and reason


def test_override_order_notebook_then_environment_then_automatic():
    env = {profiles.PROFILE_ENV_VAR: "llama-3.1-8b"}
    assert profiles.resolve_profile_name("tiny", T4, env)[0] == "tiny"
    assert profiles.resolve_profile_name(None, T4, env)[0] == "llama-3.1-8b"
    assert profiles.resolve_profile_name(None, T4, {})[0] == "llama-3.2-3b"
    assert profiles.resolve_profile_name(" TINY ", T4, {})[0] == "tiny"


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown profile 'llama-4'.*tiny, llama-3.2-3b, llama-3.1-8b"):
        profiles.resolve_profile_name("llama-4", CPU, {})
    with pytest.raises(ValueError, match="Unknown profile"):
        profiles.resolve_profile_name(None, CPU, {profiles.PROFILE_ENV_VAR: "gpt2"})


def test_hub_profile_on_cpu_offline_or_without_token_is_refused_with_the_fix():
    big = profiles.PROFILES["llama-3.2-3b"]
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*PROFILE = 'tiny'"):
        profiles.check_profile_usable(big, CPU, offline=False, has_token=True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE.*Unset"):
        profiles.check_profile_usable(big, T4, offline=True, has_token=True)
    with pytest.raises(RuntimeError, match="gated: accept Meta's license on https://huggingface.co/meta-llama/"
                                           "Llama-3.2-3B.*HF_TOKEN"):
        profiles.check_profile_usable(big, T4, offline=False, has_token=False)
    profiles.check_profile_usable(big, T4, offline=False, has_token=True)
    profiles.check_profile_usable(profiles.PROFILES["tiny"], CPU, offline=True, has_token=False)


def test_choose_profile_on_this_machine_prints_choice_and_reason(capsys, monkeypatch):
    monkeypatch.delenv(profiles.PROFILE_ENV_VAR, raising=False)
    profile = profiles.choose_profile(None, hardware=CPU)
    out = capsys.readouterr().out
    assert profile.name == "tiny"
    assert out.startswith("Profile tiny: the course's own tiny Llama") and "; no CUDA GPU found. " in out
    assert 'To choose: PROFILE = "llama-3.2-3b" or "llama-3.1-8b" above, or COURSE_PROFILE.' in out
    assert out.count("\n") == 1


def test_bf16_native_only_from_ampere():
    assert not T4.bf16_native and A100_40GB.bf16_native and not CPU.bf16_native
    assert models.compute_dtype_for(T4)[0] == torch.float16
    assert models.compute_dtype_for(A100_40GB)[0] == torch.bfloat16
    assert models.compute_dtype_for(CPU)[0] == torch.float32


@pytest.mark.parametrize("cpu_bf16", [False, True, None])
def test_cpu_compute_dtype_is_float32_with_the_same_reason_on_every_cpu(cpu_bf16):
    # native and fast everywhere; 16-bit CPU results would depend on the instruction set
    dtype, why = models.compute_dtype_for(environment.Hardware("cpu", cpu_bf16_native=cpu_bf16))
    assert dtype == torch.float32 and why == models.CPU_COMPUTE_REASON
    assert "AVX512-BF16/AMX" in why and "same answers on every CPU" in why


@pytest.mark.parametrize("hardware_name", list(HARDWARE))
@pytest.mark.parametrize("profile_name", list(profiles.PROFILES))
@pytest.mark.parametrize("scheme", memory.SCHEMES)
def test_from_pretrained_kwargs_for_every_combination(profile_name, scheme, hardware_name):
    profile, hardware = profiles.PROFILES[profile_name], HARDWARE[hardware_name]
    if profile.needs_gpu and hardware.device == "cpu":
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            models.from_pretrained_kwargs(profile, scheme, hardware)
        return
    kwargs = models.from_pretrained_kwargs(profile, scheme, hardware)
    assert kwargs.get("device_map") == ("auto" if hardware.device == "cuda" else None)
    quant = kwargs.get("quantization_config")
    if scheme in memory.FLOAT_SCHEMES:
        assert quant is None and kwargs["dtype"] == memory.FLOAT_SCHEMES[scheme]
    elif scheme == "int8":
        assert quant.load_in_8bit and not quant.load_in_4bit
        assert quant.llm_int8_threshold == 6.0 and not quant.llm_int8_has_fp16_weight
        assert kwargs["dtype"] == (torch.float16 if hardware.device == "cuda" else torch.float32)
    else:
        compute = {"cpu": torch.float32}.get(hardware.device, torch.float16 if hardware is T4 else torch.bfloat16)
        assert quant.load_in_4bit and not quant.load_in_8bit
        assert quant.bnb_4bit_quant_type == ("fp4" if scheme == "fp4" else "nf4")
        assert quant.bnb_4bit_use_double_quant == (scheme == "nf4-dq")
        assert quant.bnb_4bit_compute_dtype == compute and kwargs["dtype"] == compute
        assert quant.bnb_4bit_quant_storage == torch.uint8


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="Unknown scheme 'int4'.*nf4-dq"):
        models.from_pretrained_kwargs(profiles.PROFILES["tiny"], "int4", CPU)


def test_component_of_rejects_foreign_parameters():
    assert models.component_of("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert models.component_of("model.layers.0.self_attn.k_proj.weight") == "attention"
    assert models.component_of("model.layers.0.post_attention_layernorm.weight") == "norms"
    with pytest.raises(ValueError, match="not part of a Llama"):
        models.component_of("transformer.h.0.attn.c_attn.weight")


def test_seed_and_versions():
    environment.seed_everything(3)
    a = torch.rand(3)
    environment.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError, match="non-negative int"):
        environment.seed_everything(-1)
    assert environment.package_versions()["torch"].startswith("2.13.0")


def test_install_on_colab_is_a_no_op_elsewhere(tmp_path):
    from helpers import colab

    assert colab.install_on_colab(tmp_path) is None  # no requirements.txt there: would fail if it tried to install


@pytest.mark.parametrize("name, rescaled", [("llama-3.1-8b", 35), ("llama-3.2-3b", 35), ("llama-3.2-1b", 17)])
def test_rope_frequencies_follow_each_real_configs_rope_type_as_transformers_does(name, rescaled):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = memory.load_reference_config(REPO_ROOT / "data" / "reference" / f"{name}.config.json")
    ours, rule = models.rope_frequencies(config)
    assert torch.allclose(LlamaRotaryEmbedding(config).inv_freq.double(), ours)
    theta = config.rope_parameters["rope_theta"]
    unscaled = theta ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    assert int((~torch.isclose(ours, unscaled)).sum()) == rescaled  # 01's old claim raised on these
    assert "rescaled as Llama 3 does" in rule and ours[0] == unscaled[0]  # the fastest frequency is kept


def test_rope_frequencies_of_the_tiny_model_and_bad_rope_types():
    from transformers import AutoConfig, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(REPO_ROOT / "data" / "tiny-llama")
    ours, rule = models.rope_frequencies(config)
    assert rule == "theta^(-2i / head_dim)"
    assert torch.allclose(LlamaRotaryEmbedding(config).inv_freq.double(), ours)
    linear = LlamaConfig(hidden_size=64, num_attention_heads=2,
                       rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="'default' and 'llama3', got 'linear'"):
        models.rope_frequencies(linear)
