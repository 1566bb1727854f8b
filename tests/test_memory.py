"""Footprints: the estimator must equal what loaded models report and truly hold, to the byte."""

import logging
import warnings

import pytest
import torch

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"MatMul8bitLt")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers import memory  # noqa: E402


def random_tiny_config(seed: int, tied: bool) -> LlamaConfig:
    """Small random Llama configs that bitsandbytes' CPU kernels accept (dims multiples of 64)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    heads = pick([2, 4])
    kv_heads = pick([h for h in (1, 2, 4) if heads % h == 0 and h <= heads])
    head_dim = pick([32, 64])
    return LlamaConfig(
        vocab_size=pick([250, 320, 1000]),  # not always a multiple of 64: embeddings are never quantized
        hidden_size=pick([128, 192]),
        intermediate_size=pick([256, 384, 448]),
        num_hidden_layers=pick([1, 2, 3]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tied,
    )


CONFIGS = [random_tiny_config(seed, tied) for seed, tied in [(0, False), (1, True), (2, False), (3, True)]]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=lambda i: f"config{i}")
def saved_model(request, tmp_path_factory):
    config = CONFIGS[request.param]
    torch.manual_seed(request.param)
    folder = tmp_path_factory.mktemp(f"model{request.param}")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return config, folder


def quantization_config(scheme: str) -> BitsAndBytesConfig:
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if scheme == "fp4" else "nf4",
                              bnb_4bit_use_double_quant=scheme == "nf4-dq", bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("scheme", ["fp32", "bf16", "fp16"])
def test_float_estimate_equals_loaded_model(saved_model, scheme):
    config, folder = saved_model
    dtype = memory.FLOAT_SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    estimate = memory.estimate_footprint(config, scheme)
    assert estimate.reported == model.get_memory_footprint()
    assert estimate.true == memory.true_footprint(model) == estimate.reported


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float16), ("int8", torch.float32), ("nf4", torch.bfloat16),
                                          ("nf4-dq", torch.bfloat16), ("nf4-dq", torch.float32), ("fp4", torch.float16)])
def test_quantized_estimate_equals_loaded_model(saved_model, scheme, dtype):
    config, folder = saved_model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization_config(scheme))
    estimate = memory.estimate_footprint(config, scheme, dtype=dtype)
    assert estimate.reported == model.get_memory_footprint()
    assert estimate.true == memory.true_footprint(model)
    assert estimate.true > estimate.reported  # the constants get_memory_footprint() leaves out


def test_double_quantization_is_invisible_to_the_reported_footprint():
    config = CONFIGS[0]
    plain, double = memory.estimate_footprint(config, "nf4"), memory.estimate_footprint(config, "nf4-dq")
    assert plain.reported == double.reported
    assert double.true < plain.true


def test_meta_model_matches_config_counts_and_ties():
    for config in CONFIGS:
        model = memory.meta_model(config)
        counts = memory.parameter_counts_from_config(config)
        assert sum(p.numel() for p in model.parameters()) == sum(counts.values())
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == config.tie_word_embeddings
        assert memory.estimate_footprint(config, "fp32").reported == model.get_memory_footprint()


def test_reference_config_llama_3_1_8b_bfloat16_footprint():
    config = memory.load_reference_config(memory.Path(__file__).parents[1] / "data/reference/llama-3.1-8b.config.json")
    counts = memory.parameter_counts_from_config(config)
    assert sum(counts.values()) == 8_030_261_248  # Meta's published parameter count for Llama-3.1-8B
    rotary_buffers = 2 * (128 // 2) * 4  # inv_freq and original_inv_freq, float32, head_dim 128
    assert memory.estimate_footprint(config, "bf16").reported == 2 * 8_030_261_248 + rotary_buffers


def test_release_frees_a_model():
    namespace = {}
    baseline = memory.live_tensor_bytes()
    namespace["model"] = LlamaForCausalLM(CONFIGS[0])
    size = memory.true_footprint(namespace["model"])
    assert memory.live_tensor_bytes() - baseline >= size
    before, after = memory.release("model", namespace=namespace)
    assert "model" not in namespace
    assert before.tensors - after.tensors >= size
    assert after.tensors - baseline < 0.01 * size


@pytest.mark.parametrize("bad_call,message", [
    (lambda: memory.estimate_footprint(CONFIGS[0], "int3"), "Unknown scheme"),
    (lambda: memory.estimate_footprint(CONFIGS[0], "bf16", dtype=torch.float32), "stores everything in"),
    (lambda: memory.estimate_footprint(CONFIGS[0], "nf4", dtype=torch.int8), "floating dtype"),
    (lambda: memory.release("nope", namespace={}), "not defined"),
    (lambda: memory.release("x", namespace=None), "namespace must be"),
    (lambda: memory.load_reference_config("no/such/config.json"), "No config file"),
    (lambda: memory.linear_shapes({"hidden_size": 0, "intermediate_size": 8, "num_attention_heads": 1,
                                   "num_key_value_heads": 1, "head_dim": 8}), "positive integer"),
])
def test_bad_input_is_rejected_clearly(bad_call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        bad_call()


class _StoragelessWrapper(torch.Tensor):
    """A wrapper subclass with no bytes of its own, like nested jagged or functional tensors."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} is not needed here")


def test_live_tensor_bytes_skips_tensors_without_real_storage():
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = memory.live_tensor_bytes()
    held = torch.zeros(1000, dtype=torch.float32)  # 4,000 bytes that count
    wrapper = _StoragelessWrapper(torch.ones(3))  # its storage raises on data_ptr(): the crash of issue 18
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    fake = FakeTensorMode().from_tensor(torch.ones(5))
    on_meta = torch.empty(10, device="meta")
    for tensor in (wrapper, nested, fake, on_meta):
        assert memory.real_storage(tensor) is None
    assert memory.real_storage(held) is not None and memory.real_storage("not a tensor") is None
    grown = memory.live_tensor_bytes() - before
    # the wrapper's inner tensor and the nested tensor's values are real tensors and count; nothing crashes
    assert grown >= held.nbytes
    del held, wrapper, nested, fake, on_meta
