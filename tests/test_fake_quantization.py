"""bitsandbytes round trips at any block size, and what a Linear4bit materializes while it computes (0.50.2, CPU)."""

import logging

import pytest
import torch

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

from helpers import quantization as Q  # noqa: E402


def random_weight(rows, columns, seed=0, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * scale


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def four_bit_layer(weight, compute_dtype=torch.float32, double_quant=True):
    """A standalone Linear4bit holding ``weight`` in NF4, on bitsandbytes' portable CPU path."""
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", module=layer).to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_is_what_a_linear4bit_dequantizes_to(blocksize, double_quant):
    weight = random_weight(128, 64)
    rebuilt, stored = Q.bnb_4bit_round_trip(weight, blocksize=blocksize, double_quant=double_quant)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    # bitsandbytes' own pure-PyTorch dequantizer (its portable "default" backend, flat like its quantizer and its
    # CUDA kernel) on the 2-D codes: what every kernel computes when it indexes the scales correctly
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    portable = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, state.code, blocksize,
                                                    weight.shape, torch.float32)
    assert torch.equal(rebuilt, portable)
    if blocksize <= weight.shape[1]:  # rows of whole blocks, as in every Linear4bit: any CPU kernel agrees
        assert torch.equal(rebuilt, F.dequantize_4bit(packed, state))
    assert rebuilt.shape == weight.shape and rebuilt.dtype == weight.dtype
    blocks = weight.numel() // blocksize
    if double_quant:  # codes + 8-bit absmax + one float32 scale per 256 blocks + offset + the two tables
        expected = weight.numel() // 2 + blocks + 4 * -(-blocks // 256) + 4 + 16 * 4 + 256 * 4
    else:  # codes + float32 absmax per block + the 16-value table
        expected = weight.numel() // 2 + 4 * blocks + 16 * 4
    assert stored == expected


def test_round_trip_with_the_from_scratch_quantizer():
    # blocks of 1024 span four rows of 256: bitsandbytes' native AVX-512 CPU kernel would misread the scales of a
    # 2-D round trip (test_quantization documents it); the flat round trip is right on every CPU
    weight = random_weight(64, 256, seed=3)
    packed, absmax = Q.quantize_nf4(weight, blocksize=1024)
    rebuilt, _ = Q.bnb_4bit_round_trip(weight, blocksize=1024)
    assert torch.equal(rebuilt, Q.dequantize_nf4(packed, absmax, weight.shape, blocksize=1024))


def test_bigger_blocks_cost_fewer_bits_and_more_error():
    weight = random_weight(256, 256, seed=1)
    weight[0, 0] = 0.5  # one outlier: its block's other weights get a coarser grid
    errors, bits = [], []
    for blocksize in (64, 4096):
        rebuilt, stored = Q.bnb_4bit_round_trip(weight, blocksize=blocksize)
        errors.append(((rebuilt - weight).norm() / weight.norm()).item())
        bits.append(8 * stored / weight.numel())
    assert bits[1] < bits[0] and errors[1] > errors[0]


def test_model_round_trip_replaces_exactly_the_decoder_linears():
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bits = Q.bnb_4bit_round_trip_(model, blocksize=64, double_quant=False)
    decoder_weights = 0
    for name, parameter in model.named_parameters():
        is_decoder_linear = ".layers." in name and name.endswith("proj.weight")
        if is_decoder_linear:
            decoder_weights += parameter.numel()
            expected, _ = Q.bnb_4bit_round_trip(before[name], blocksize=64)
            assert torch.equal(parameter, expected), name
        else:
            assert torch.equal(parameter, before[name]), name
    # codes, a float32 absmax per 64 weights, and one 16-value table per Linear (7 per layer, 2 layers)
    assert bits == pytest.approx(4 + 32 / 64 + 14 * 16 * 32 / decoder_weights)


def test_error_by_layer_matches_a_direct_computation_and_leaves_the_model_alone():
    model = tiny_llama(seed=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    errors = Q.round_trip_error_by_layer(model, quant_type="fp4")
    assert len(errors) == model.config.num_hidden_layers
    weights = [m.weight.data for m in model.model.layers[1].modules() if isinstance(m, torch.nn.Linear)]
    rebuilt = [Q.bnb_4bit_round_trip(w, quant_type="fp4")[0] for w in weights]
    squared_error = sum((r.double() - w.double()).pow(2).sum() for r, w in zip(rebuilt, weights))
    squared_norm = sum(w.double().pow(2).sum() for w in weights)
    assert errors[1] == pytest.approx((squared_error / squared_norm).sqrt().item(), rel=1e-12)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert Q.round_trip_error_by_layer(model, quant_type="nf4")[0] < errors[0]  # NF4 fits normal weights better


def test_round_trip_bad_input_says_what_was_wrong():
    weight = random_weight(4, 64)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        Q.bnb_4bit_round_trip(weight, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        Q.bnb_4bit_round_trip(weight, blocksize=100)
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        Q.bnb_4bit_round_trip(weight, double_quant=1)
    with pytest.raises(ValueError):
        Q.bnb_4bit_round_trip(weight.to(torch.int32))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Q.bnb_4bit_round_trip_("not a model")


def test_the_portable_cpu_path_dequantizes_the_whole_weight_on_every_call():
    layer = four_bit_layer(random_weight(96, 64))
    full = [Q.DenseWeightUse("torch.nn.functional.linear", torch.float32, 96 * 64 * 4)]
    assert Q.dense_weight_uses(layer, tokens=1) == full
    assert Q.dense_weight_uses(layer, tokens=2000) == full
    backward = Q.dense_weight_uses(layer, tokens=2000, backward=True)
    assert backward == full + [Q.DenseWeightUse("torch.matmul", torch.float32, 96 * 64 * 4)]
    assert not any(p.grad is not None for p in layer.parameters())  # only the input needed a gradient


def test_dense_copies_come_in_the_compute_dtype():
    layer = four_bit_layer(random_weight(64, 128), compute_dtype=torch.bfloat16, double_quant=False)
    uses = Q.dense_weight_uses(layer, tokens=3, backward=True)
    assert [(u.dtype, u.nbytes) for u in uses] == [(torch.bfloat16, 64 * 128 * 2)] * 2


def test_the_fused_cpu_kernel_would_not_materialize_the_weight(monkeypatch):
    """With a repacked layer (bitsandbytes' AVX512-BF16 kernel), matmul_4bit calls gemv_4bit and no F.linear:
    simulated here by stubbing the kernel, since whether it exists depends on the CPU."""
    layer = four_bit_layer(random_weight(64, 64))
    monkeypatch.setattr(layer.weight.quant_state, "packing_format_for_cpu", True, raising=False)
    monkeypatch.setattr(F, "gemv_4bit", lambda A, B, out=None, state=None: A.new_zeros(*A.shape[:-1], 64))
    assert Q.dense_weight_uses(layer, tokens=5) == []


def test_dense_weight_uses_bad_input_says_what_was_wrong():
    with pytest.raises(TypeError, match="Linear4bit"):
        Q.dense_weight_uses(torch.nn.Linear(4, 4), tokens=2)
    layer = four_bit_layer(random_weight(96, 64))
    for tokens in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="tokens must be a positive int"):
            Q.dense_weight_uses(layer, tokens=tokens)
    with pytest.raises(ValueError, match="equals a dimension"):
        Q.dense_weight_uses(layer, tokens=96)
