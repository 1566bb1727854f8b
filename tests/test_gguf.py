"""helpers.gguf: GGUF block formats byte-identical to gguf-py, Q4_K dequantized like it, files sized to the byte."""

import numpy as np
import pytest
import torch

from helpers import gguf as hg

SHAPES = [(1, 32), (3, 64), (17, 96), (2, 5, 64), (40, 256)]  # one block, odd row counts, 3-D, many blocks


def awkward_tensor(shape, seed):
    """Random weights with the cases that trip quantizers: an all-zero block, a negative extreme, exact ties."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * 3
    blocks = x.view(-1, 32)
    blocks[0] = 0
    if blocks.shape[0] > 2:
        blocks[1, 5] = -2 * blocks[1].abs().max()  # Q4_0 keeps the sign of the extreme value
        blocks[2, :4] = torch.tensor([12.7, -12.7, 6.35, 0.05])  # Q8_0: x / d lands on .5 (round away from zero)
    return x


# --- exact bytes by hand ---------------------------------------------------------------------------------------


def test_q8_0_block_by_hand():
    x = torch.zeros(32)
    x[:4] = torch.tensor([127.0, -63.5, 0.5, -0.5])  # d = 127 / 127 = 1; codes round half away from zero
    raw = hg.quantize_q8_0(x)
    assert raw.shape == (34,) and raw.dtype == torch.uint8
    assert raw[:2].tolist() == [0x00, 0x3C]  # float16 1.0 = 0x3C00, little-endian
    assert raw[2:6].view(torch.int8).tolist() == [127, -64, 1, -1]
    assert hg.dequantize_q8_0(raw)[:4].tolist() == [127.0, -64.0, 1.0, -1.0]


def test_q4_0_block_by_hand():
    x = torch.zeros(32)
    x[0], x[1], x[16] = -8.0, 4.0, 7.0  # the extreme is -8: d = -8 / -8 = 1; code = trunc(x + 8.5), at most 15
    raw = hg.quantize_q4_0(x)
    assert raw.shape == (18,)
    assert raw[:2].tolist() == [0x00, 0x3C]
    # byte 0: code of x[0] (0) in the low nibble, of x[16] (15) in the high nibble; byte 1: x[1] -> 12, x[17] -> 8
    assert raw[2:4].tolist() == [0 | 15 << 4, 12 | 8 << 4]
    assert hg.dequantize_q4_0(raw)[[0, 1, 16]].tolist() == [-8.0, 4.0, 7.0]


# --- gguf-py's own quantizer and dequantizer: the same bytes --------------------------------------------------


@pytest.mark.parametrize("name", hg.QUANTIZABLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_block_quantizers_are_byte_identical_to_gguf_py(name, shape):
    from gguf import GGMLQuantizationType, quants

    x = awkward_tensor(shape, seed=len(shape) * 100 + shape[-1])
    expected = quants.quantize(x.numpy(), GGMLQuantizationType[name])
    raw = hg.QUANTIZERS[name](x)
    assert raw.shape == expected.shape and np.array_equal(raw.numpy(), expected)
    dequantized = quants.dequantize(expected, GGMLQuantizationType[name])
    assert np.array_equal(hg.DEQUANTIZERS[name](raw).numpy(), dequantized)


def random_q4_k_bytes(blocks_per_row, rows, seed):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, blocks_per_row * 144), generator=generator, dtype=torch.uint8)
    blocks = raw.view(-1, 144)  # any bytes are a valid block, except d and dmin must be finite float16 numbers
    blocks[:, 0:2] = (torch.rand(blocks.shape[0], 1, generator=generator) / 8).half().view(torch.uint8)
    blocks[:, 2:4] = (torch.rand(blocks.shape[0], 1, generator=generator) / 8).half().view(torch.uint8)
    return raw


def test_q4_k_dequantization_equals_gguf_py():
    from gguf import GGMLQuantizationType, quants

    for blocks_per_row, rows in ((1, 1), (2, 3), (3, 7)):
        raw = random_q4_k_bytes(blocks_per_row, rows, seed=rows)
        expected = quants.dequantize(raw.numpy(), GGMLQuantizationType.Q4_K)
        assert np.array_equal(hg.dequantize_q4_k(raw).numpy(), expected)


def test_q4_k_scale_and_min_unpacking_by_hand():
    packed = torch.zeros(1, 12, dtype=torch.uint8)
    packed[0, 0] = 0b11_000101  # scale 0 = 5; its top bits are scale 4's bits 4-5 (3)
    packed[0, 4] = 0b01_000111  # min 0 = 7; top bits: min 4's bits 4-5 (1)
    packed[0, 8] = 0b1001_0010  # scale 4's low nibble 2, min 4's low nibble 9
    scales, mins = hg.q4_k_scales_and_mins(packed)
    assert scales[0].tolist() == [5, 0, 0, 0, 3 << 4 | 2, 0, 0, 0]
    assert mins[0].tolist() == [7, 0, 0, 0, 1 << 4 | 9, 0, 0, 0]


# --- sizes ------------------------------------------------------------------------------------------------------


def test_block_sizes_agree_with_gguf_py_and_bits_per_weight_equal_the_formula():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, fmt in hg.BLOCK_FORMATS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (fmt.block_size, fmt.type_size)
    assert {n: hg.bits_per_weight_formula(n) for n in hg.BLOCK_FORMATS} == {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5}
    x = awkward_tensor((6, 128), seed=1)
    for name in hg.QUANTIZABLE:
        assert hg.stored_bits_per_weight(hg.QUANTIZERS[name](x), x.numel()) == hg.bits_per_weight_formula(name)
    raw = random_q4_k_bytes(2, 3, seed=0)
    assert hg.stored_bits_per_weight(raw, hg.dequantize_q4_k(raw).numel()) == hg.bits_per_weight_formula("Q4_K")


def tiny_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("weight_type, tied", [("F32", True), ("Q8_0", True), ("Q4_0", False)])
def test_a_gguf_file_is_exactly_the_size_the_format_says(tmp_path, weight_type, tied):
    import gguf

    model = tiny_llama(tied)
    path = tmp_path / f"tiny-{weight_type}.gguf"
    plan = hg.write_gguf(path, model, weight_type)
    size = hg.gguf_size(hg.llama_metadata(model.config), plan)
    assert hg.file_size(path) == size.total
    assert size.header == 24 and (size.header + size.metadata + size.tensor_infos + size.padding_before_data) % 32 == 0
    header = hg.read_gguf_header(path)
    assert header == {"version": 3, "tensors": len(plan), "metadata": len(hg.llama_metadata(model.config))}
    assert len(plan) == 2 * 9 + 2 + (0 if tied else 1)  # 9 per layer, embeddings, final norm, untied lm_head
    # gguf-py reads back our bytes: names, types and the quantized data itself
    reader = gguf.GGUFReader(path)
    read = {t.name: t for t in reader.tensors}
    assert set(read) == set(plan)
    q = read["blk.1.attn_q.weight"]
    assert q.tensor_type.name == weight_type
    expected = model.model.layers[1].self_attn.q_proj.weight.detach()
    if weight_type in hg.QUANTIZERS:
        assert np.array_equal(np.asarray(q.data).reshape(-1), hg.QUANTIZERS[weight_type](expected).numpy().reshape(-1))
    assert read["blk.0.attn_norm.weight"].tensor_type.name == "F32"


class OnAccelerator(torch.Tensor):
    """Stands for a tensor on a CUDA device: every result of it stays "on the device", and ``.numpy()`` refuses it
    until ``.cpu()`` has brought it to the host, as PyTorch does for a CUDA tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def cpu(self, *args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.cpu(self, *args, **kwargs).as_subclass(torch.Tensor)


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q4_0"])
def test_write_gguf_brings_the_weights_of_a_gpu_model_to_the_host(tmp_path, weight_type, monkeypatch):
    model = tiny_llama(tied=False)
    on_cpu = hg.write_gguf(tmp_path / "cpu.gguf", model, weight_type)
    named_parameters = model.named_parameters
    monkeypatch.setattr(model, "named_parameters", lambda *args, **kwargs: (
        (name, p.as_subclass(OnAccelerator)) for name, p in named_parameters(*args, **kwargs)))
    assert hg.write_gguf(tmp_path / "gpu.gguf", model, weight_type) == on_cpu
    assert (tmp_path / "gpu.gguf").read_bytes() == (tmp_path / "cpu.gguf").read_bytes()


def test_apply_block_format_replaces_the_decoder_linears_by_their_round_trip():
    model = tiny_llama(tied=True)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    assert hg.apply_block_format_(model, "Q4_0") == 4.5
    after = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(after, hg.dequantize_q4_0(hg.quantize_q4_0(before)))
    assert torch.equal(model.model.embed_tokens.weight, embeddings)


def test_tensor_names_follow_llama_cpp():
    assert hg.gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert hg.gguf_tensor_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert hg.gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert hg.gguf_tensor_name("lm_head.weight") == "output.weight"


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_says_what_was_wrong():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        hg.quantize_q8_0(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        hg.quantize_q4_0(torch.zeros(()))
    with pytest.raises(TypeError, match="floating-point"):
        hg.quantize_q4_0(torch.zeros(2, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        hg.quantize_q8_0(np.zeros((2, 32), dtype=np.float32))
    with pytest.raises(TypeError, match="uint8 tensor of raw bytes"):
        hg.dequantize_q4_k(torch.zeros(144))
    with pytest.raises(ValueError, match="multiple of 144 bytes"):
        hg.dequantize_q4_k(torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown GGUF block format 'Q3_K'"):
        hg.bits_per_weight_formula("Q3_K")
    with pytest.raises(ValueError, match="can quantize Q8_0, Q4_0 only"):
        hg.apply_block_format_(tiny_llama(True), "Q4_K")
    with pytest.raises(ValueError, match="weight_type must be"):
        hg.gguf_plan(tiny_llama(True), "Q2")
    with pytest.raises(ValueError, match="positive int"):
        hg.stored_bits_per_weight(torch.zeros(34, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="no llama.cpp name"):
        hg.gguf_tensor_name("model.rotary_emb.inv_freq")
    with pytest.raises(ValueError, match="not a GGUF file"):
        hg.read_gguf_header(__file__)


def test_gguf_metadata_names_the_model_not_the_folder_it_was_loaded_from():
    # CI checks out the course in another folder than the one the notebooks were recorded in: a path in the
    # metadata would change the file's size there.
    config = tiny_llama(True).config
    names = []
    for where in ("/work/main/data/tiny-llama", "/tmp/a/much/longer/checkout/data/tiny-llama", "data/tiny-llama/"):
        config.name_or_path = where
        names.append(hg.llama_metadata(config)["general.name"])
    assert names == ["tiny-llama"] * 3
    config.name_or_path = "meta-llama/Llama-3.1-8B"
    assert hg.llama_metadata(config)["general.name"] == "Llama-3.1-8B"
    config.name_or_path = ""
    assert hg.llama_metadata(config)["general.name"] == "llama"
