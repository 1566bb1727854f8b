"""The extra libraries of notebook 07 (llmcompressor, compressed-tensors, hqq, gguf) import at their pins and work,
llmcompressor's AWQ included on a CPU through the pin_memory workaround."""

import re
from pathlib import Path

import pytest
import torch

from helpers import groupwise

REQUIREMENTS = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()


def tiny_llama(layers=1, seed=0, hidden=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("distribution, module", [("llmcompressor", "llmcompressor"),
                                                  ("compressed-tensors", "compressed_tensors"),
                                                  ("hqq", "hqq"), ("gguf", "gguf"), ("datasets", "datasets")])
def test_each_library_imports_at_its_pin(distribution, module):
    import importlib
    import importlib.metadata

    importlib.import_module(module)
    pin = re.search(rf"^(?:#no-deps )?{re.escape(distribution)}==(\S+)$", REQUIREMENTS, re.MULTILINE)
    assert pin is not None, f"{distribution} is not pinned in requirements.txt"
    assert importlib.metadata.version(distribution) == pin.group(1)


def test_no_deps_libraries_are_listed_for_the_makefile():
    assert re.findall(r"^#no-deps (\S+)$", REQUIREMENTS, re.MULTILINE) == [
        "llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "llama-models==0.3.0"]  # the last: make rehearse
    # the course's own pins did not move for them
    import transformers

    assert transformers.__version__ == re.search(r"^transformers==(\S+)$", REQUIREMENTS, re.MULTILINE).group(1)


def test_pin_memory_fails_without_an_accelerator_and_the_workaround_makes_it_a_no_op():
    from llmcompressor.pipelines.cache import IntermediatesCache, IntermediateValue

    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning works and the workaround leaves pin_memory alone")
    original = IntermediatesCache.pin_memory
    cache = IntermediatesCache([{"x": IntermediateValue(value=torch.ones(3), device=None)}], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)
    with groupwise.cpu_pin_memory_workaround():
        assert cache.pin_memory(0) is None
        assert not cache.batch_intermediates[0]["x"].value.is_pinned()
    assert IntermediatesCache.pin_memory is original


def test_llmcompressor_awq_quantizes_a_small_llama_on_the_cpu_with_the_workaround(tmp_path):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    model = tiny_llama(hidden=128)  # W4A16_ASYM quantizes groups of 128 input features
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = [AWQModifier(n_grid=3), QuantizationModifier(targets=["Linear"], ignore=["lm_head"], scheme="W4A16_ASYM")]
    from transformers import AutoTokenizer

    from helpers import profiles

    # oneshot reads the config (and a tokenizer) from the model's folder: save it, with the tiny Llama's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(profiles.get_profile("tiny").model_id)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.config._name_or_path = str(tmp_path)
    with groupwise.cpu_pin_memory_workaround():
        oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=2,
                max_seq_length=16, pipeline="sequential")
    from compressed_tensors.quantization import fake_quantize

    down = model.model.layers[0].mlp.down_proj
    assert down.weight_zero_point.dtype == torch.int8 and down.weight_scale.shape == (128, 2)  # groups of 128
    # AWQ folded its scales into the norm before gate/up (it starts as all ones) ...
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight.detach(), torch.ones(128))
    # ... and the weights the model now multiplies by take at most 16 values per group
    used = fake_quantize(down.weight.detach(), down.weight_scale, down.weight_zero_point,
                         down.quantization_scheme.weights)
    assert len(torch.unique(used[0, :128])) <= 16 and not torch.equal(used, before)


def test_hqq_round_trip_counts_its_stored_bits():
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    bits_per_weight = groupwise.hqq_model_(model, bits=4, group_size=64)
    assert bits_per_weight == 4 + 2 * 32 / 64  # packed 4-bit codes, float32 scale and zero per 64 weights
    error = (model.model.layers[0].self_attn.q_proj.weight.detach() - original).norm() / original.norm()
    assert 0 < float(error) < 0.2
    # 3-bit codes go ten to a 32-bit word (3.2 bits each, plus padding of the last word of a group's column)
    assert 3.2 + 1.0 <= groupwise.hqq_model_(tiny_llama(), bits=3, group_size=64) < 3.5 + 1.0
    # scale and zero point in float16, as HQQ ships them: 4 + 2 * 16 / 64
    assert groupwise.hqq_model_(tiny_llama(), bits=4, group_size=64, meta_dtype=torch.float16) == 4.5


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hqq_with_float16_meta_stores_what_hqqlinear_stores(bits):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = tiny_llama().model.layers[0].mlp.up_proj
    weight = linear.weight.detach().clone()
    packed, meta = groupwise.hqq_quantize(weight, bits, 64, meta_dtype=torch.float16)
    shipped = HQQLinear(linear, quant_config=BaseQuantizeConfig(nbits=bits, group_size=64),
                        compute_dtype=torch.float16, device="cpu")  # HQQ's own layer, in its usual 16-bit dtype
    assert torch.equal(packed, shipped.W_q)
    assert meta["scale"].dtype == meta["zero"].dtype == shipped.meta["scale"].dtype == torch.float16
    assert torch.equal(meta["scale"], shipped.meta["scale"]) and torch.equal(meta["zero"], shipped.meta["zero"])
    with pytest.raises(TypeError, match="scale_dtype must be None"):
        groupwise.hqq_quantize(weight, bits, 64, meta_dtype=torch.int8)


def test_gguf_py_reads_its_own_quantization_sizes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    assert GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0] == (32, 18)


def test_colab_installs_notebook_07s_extras_from_the_pins_and_nothing_elsewhere(monkeypatch, capsys):
    import sys

    from helpers import colab

    root = Path(__file__).resolve().parents[1]
    assert colab.read_no_deps_pins(REQUIREMENTS) == {"llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0",
                                                      "llama-models": "0.3.0"}
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert colab.install_extras_on_colab(root, colab.BEYOND_BITSANDBYTES_LIBRARIES) is None
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    calls = []
    monkeypatch.setattr(colab, "pip_install", lambda *args, **kwargs: calls.append(args))
    report = colab.install_extras_on_colab(root, colab.BEYOND_BITSANDBYTES_LIBRARIES)  # all present here
    assert calls == [] and report.installed == [] and "at its pinned version" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not pinned in requirements.txt: vllm"):
        colab.install_extras_on_colab(root, ("hqq", "vllm"))
