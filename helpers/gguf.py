"""llama.cpp's GGUF block formats from scratch in torch, and what a .gguf file is made of, to the byte.

A GGUF weight is cut, along each row, into blocks of 32 (Q8_0, Q4_0) or super-blocks of 256 (K-quants). Each block
stores its own float16 scale next to its codes, so a block is a fixed number of bytes:

* Q8_0: ``d = max|x| / 127`` (float16), 32 int8 codes ``round(x / d)`` (half away from zero): 34 bytes per 32 weights.
* Q4_0: ``d = x_at_max|x| / -8`` (float16, signed), 32 4-bit codes ``min(15, trunc(x / d + 8.5))``, two per byte
  (the block's first 16 codes in the low nibbles, the last 16 in the high nibbles): 18 bytes per 32 weights.
* Q4_K: a super-block of 256 = 8 sub-blocks of 32, ``x = d * scale_j * q - dmin * min_j`` with 6-bit ``scale_j``
  and ``min_j`` per sub-block packed into 12 bytes, two float16 super-scales and 4-bit codes: 144 bytes per 256.

The quantizers here produce the same bytes as gguf-py's ``gguf.quants`` (which in turn equals llama.cpp's C code);
tests/test_gguf.py checks it. A .gguf file is a 24-byte header, key/value metadata, one info record per tensor,
then each tensor's bytes, every tensor starting at a multiple of the alignment (32 bytes by default).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from helpers.groupwise import decoder_linears


class BlockFormat(NamedTuple):
    """A GGUF block format: weights per block, bytes per block, and what the bytes are."""

    name: str
    block_size: int
    type_size: int
    layout: str


BLOCK_FORMATS = {
    "Q8_0": BlockFormat("Q8_0", 32, 2 + 32, "float16 d + 32 int8 codes"),
    "Q4_0": BlockFormat("Q4_0", 32, 2 + 16, "float16 d + 32 4-bit codes (offset 8), two per byte"),
    "Q4_K": BlockFormat("Q4_K", 256, 2 + 2 + 12 + 128,
                        "float16 d, float16 dmin, 8 x (6-bit scale, 6-bit min) in 12 bytes, 256 4-bit codes"),
}
"""Sizes worked out from each layout (tests check them against gguf-py's GGML_QUANT_SIZES)."""

QUANTIZABLE = ("Q8_0", "Q4_0")
GGUF_HEADER_BYTES = 4 + 4 + 8 + 8  # magic "GGUF", version, tensor count, metadata count
GGUF_ALIGNMENT = 32


def _format(name: str) -> BlockFormat:
    if name not in BLOCK_FORMATS:
        raise ValueError(f"unknown GGUF block format {name!r}; this module knows {', '.join(BLOCK_FORMATS)}")
    return BLOCK_FORMATS[name]


def _check_float_rows(x: object, block_size: int, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} needs a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} needs floating-point weights, got {x.dtype} (dequantize integer data first)")
    if x.ndim == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"{name}: the last dimension ({tuple(x.shape)[-1:] or 'none'}) must be a multiple of the "
                         f"block size {block_size}; llama.cpp keeps such tensors in F16/F32 instead")
    return x.to(torch.float32).reshape(-1, block_size)


def _round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``, written so that 0.49999997 is not pushed to 1 by adding 0.5 (gguf-py's ``np_roundf``)."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def _half_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 ``(blocks, 1)`` -> its float16 (round to nearest even) as 2 little-endian bytes ``(blocks, 2)``."""
    return d.to(torch.float16).view(torch.uint8)


def _inverse_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes of ``x`` (last dimension a multiple of 32): shape ``(*x.shape[:-1], blocks * 34)``, uint8."""
    blocks = _check_float_rows(x, 32, "Q8_0")
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = _round_half_away_from_zero(blocks * _inverse_or_zero(d)).to(torch.int8)
    raw = torch.cat([_half_bytes(d), codes.view(torch.uint8)], dim=1)
    return raw.reshape(*x.shape[:-1], -1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0 bytes of ``x`` (last dimension a multiple of 32): shape ``(*x.shape[:-1], blocks * 18)``, uint8."""
    blocks = _check_float_rows(x, 32, "Q4_0")
    at_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed: the extreme value gets code 0
    d = at_max / -8
    codes = torch.trunc(blocks * _inverse_or_zero(d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = codes[:, :16] | (codes[:, 16:] << 4)
    raw = torch.cat([_half_bytes(d), packed], dim=1)
    return raw.reshape(*x.shape[:-1], -1)


def _check_raw(raw: object, fmt: BlockFormat) -> torch.Tensor:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"{fmt.name} data must be a uint8 tensor of raw bytes, got "
                        f"{getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.ndim == 0 or raw.shape[-1] % fmt.type_size != 0:
        raise ValueError(f"{fmt.name}: the last dimension must be a multiple of {fmt.type_size} bytes (one block), "
                         f"got shape {tuple(raw.shape)}")
    return raw.reshape(-1, fmt.type_size)


def _half_from_bytes(two_bytes: torch.Tensor) -> torch.Tensor:
    return two_bytes.contiguous().view(torch.float16).to(torch.float32)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """float32 weights of Q8_0 bytes: ``d * code``, shape ``(*raw.shape[:-1], blocks * 32)``."""
    blocks = _check_raw(raw, BLOCK_FORMATS["Q8_0"])
    d = _half_from_bytes(blocks[:, :2])
    codes = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (codes * d).reshape(*raw.shape[:-1], -1)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    """float32 weights of Q4_0 bytes: ``d * (code - 8)``, shape ``(*raw.shape[:-1], blocks * 32)``."""
    blocks = _check_raw(raw, BLOCK_FORMATS["Q4_0"])
    d = _half_from_bytes(blocks[:, :2])
    packed = blocks[:, 2:]
    codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).to(torch.int8) - 8
    return (d * codes.to(torch.float32)).reshape(*raw.shape[:-1], -1)


def q4_k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of each Q4_K super-block from its 12 packed bytes ``(blocks, 12)``.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; sub-blocks 4-7 take their low 4 bits from
    the nibbles of bytes 8-11 (scale low, min high) and their top 2 bits from the spare top bits of bytes 0-7.
    """
    b = packed.to(torch.int32)
    scales_low, mins_low, extra = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    scales = torch.cat([scales_low & 63, (extra & 0x0F) | ((scales_low >> 6) << 4)], dim=1)
    mins = torch.cat([mins_low & 63, (extra >> 4) | ((mins_low >> 6) << 4)], dim=1)
    return scales, mins


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    """float32 weights of Q4_K bytes: ``d * scale_j * q - dmin * min_j`` per sub-block j of 32.

    The 128 code bytes are 4 runs of 32: run r holds sub-block 2r in its low nibbles and 2r+1 in its high ones.
    """
    blocks = _check_raw(raw, BLOCK_FORMATS["Q4_K"])
    n = blocks.shape[0]
    d = _half_from_bytes(blocks[:, 0:2])
    dmin = _half_from_bytes(blocks[:, 2:4])
    scales, mins = q4_k_scales_and_mins(blocks[:, 4:16])
    runs = blocks[:, 16:].reshape(n, 4, 1, 32)
    codes = torch.cat([runs & 0x0F, runs >> 4], dim=2).reshape(n, 8, 32).to(torch.float32)
    step = (d * scales.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * mins.to(torch.float32)).reshape(n, 8, 1)
    return (step * codes - offset).reshape(*raw.shape[:-1], -1)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_K": dequantize_q4_k}


def stored_bits_per_weight(raw: torch.Tensor, weights: int) -> float:
    """Bits per weight of stored bytes: every byte of the blocks (scales included) over the weights they hold."""
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError("raw must be a uint8 tensor of block bytes")
    if isinstance(weights, bool) or not isinstance(weights, int) or weights < 1:
        raise ValueError(f"weights must be a positive int, got {weights!r}")
    return raw.numel() * 8 / weights


def bits_per_weight_formula(name: str) -> float:
    """``8 * bytes per block / weights per block``: 8.5 for Q8_0, 4.5 for Q4_0 and Q4_K."""
    fmt = _format(name)
    return fmt.type_size * 8 / fmt.block_size


@torch.no_grad()
def apply_block_format_(model: nn.Module, name: str) -> float:
    """Replace every decoder-layer Linear weight by its value after a round trip through GGUF format ``name``
    (Q8_0 or Q4_0), in place; returns the true bits per weight over those weights."""
    if name not in QUANTIZERS:
        raise ValueError(f"can quantize {', '.join(QUANTIZERS)} only (gguf-py cannot quantize K-quants either), "
                         f"got {name!r}")
    stored_bits, count = 0, 0
    for _, module in decoder_linears(model):
        raw = QUANTIZERS[name](module.weight.data)
        module.weight.data.copy_(DEQUANTIZERS[name](raw).to(module.weight.dtype))
        stored_bits += raw.numel() * 8
        count += module.weight.numel()
    return stored_bits / count


# --- a .gguf file, to the byte ------------------------------------------------------------------------------

GGUF_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8, "Q4_K": 12}
_SCALAR_BYTES = {"uint32": 4, "int32": 4, "float32": 4, "uint64": 8, "bool": 1}


def _string_bytes(text: str) -> int:
    return 8 + len(text.encode("utf-8"))  # uint64 length, then UTF-8 bytes, no terminator


def metadata_bytes(key: str, value: object) -> int:
    """Bytes of one metadata entry: key string, a uint32 type, the value (strings/arrays with a uint64 length)."""
    size = _string_bytes(key) + 4
    if isinstance(value, str):
        return size + _string_bytes(value)
    if isinstance(value, bool):
        return size + 1
    if isinstance(value, int):
        return size + 4  # written as uint32 here
    if isinstance(value, float):
        return size + 4  # float32
    if isinstance(value, (list, tuple)) and value:
        items = sum(_string_bytes(v) if isinstance(v, str) else 4 for v in value)
        return size + 4 + 8 + items  # item type, count, items
    raise TypeError(f"metadata {key!r}: unsupported value {value!r}")


def tensor_info_bytes(name: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor's info record: name, uint32 dimension count, uint64 per dimension, uint32 type, uint64
    offset into the data section."""
    return _string_bytes(name) + 4 + 8 * len(shape) + 4 + 8


def tensor_data_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes of a tensor's data in the file, before alignment padding."""
    count = 1
    for dim in shape:
        count *= dim
    if type_name == "F32":
        return 4 * count
    if type_name == "F16":
        return 2 * count
    fmt = _format(type_name)
    if shape[-1] % fmt.block_size:
        raise ValueError(f"{type_name} needs rows that are a multiple of {fmt.block_size}, got shape {shape}")
    return count // fmt.block_size * fmt.type_size


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


@dataclass(frozen=True)
class GGUFSize:
    """Where every byte of a .gguf file goes."""

    header: int
    metadata: int
    tensor_infos: int
    padding_before_data: int
    tensor_data: int
    tensor_padding: int

    @property
    def total(self) -> int:
        return (self.header + self.metadata + self.tensor_infos + self.padding_before_data + self.tensor_data
                + self.tensor_padding)


def gguf_size(metadata: Mapping[str, object], tensors: Mapping[str, tuple[tuple[int, ...], str]],
              alignment: int = GGUF_ALIGNMENT) -> GGUFSize:
    """The size of a .gguf file with this metadata (``general.architecture`` included) and these tensors
    (name -> (shape as torch gives it, type name)), computed from the format alone."""
    head = GGUF_HEADER_BYTES
    meta = sum(metadata_bytes(k, v) for k, v in metadata.items())
    infos = sum(tensor_info_bytes(n, shape) for n, (shape, _) in tensors.items())
    data = [tensor_data_bytes(shape, t) for shape, t in tensors.values()]
    return GGUFSize(head, meta, infos, _pad(head + meta + infos, alignment), sum(data),
                    sum(_pad(n, alignment) for n in data))


LLAMA_TENSOR_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
                      "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                      "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
                      "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama parameter (``model.layers.3.self_attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``)."""
    parts = hf_name.split(".")
    module = parts[-2]
    if module not in LLAMA_TENSOR_NAMES:
        raise ValueError(f"no llama.cpp name for {hf_name!r}")
    if "layers" in parts:
        return f"blk.{parts[parts.index('layers') + 1]}.{LLAMA_TENSOR_NAMES[module]}.weight"
    return f"{LLAMA_TENSOR_NAMES[module]}.weight"


def llama_metadata(config) -> dict[str, object]:
    """The architecture keys llama.cpp reads for a Llama, from a transformers config (no tokenizer)."""
    return {
        "general.architecture": "llama",
        # The model's own name, never the folder it was loaded from: a path would make the file's size depend on
        # where the course is checked out.
        "general.name": Path(str(getattr(config, "name_or_path", "") or "llama")).name or "llama",
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.block_count": int(config.num_hidden_layers),
        "llama.attention.head_count": int(config.num_attention_heads),
        "llama.attention.head_count_kv": int(config.num_key_value_heads),
        "llama.rope.freq_base": float(getattr(config, "rope_theta", None)
                                      or config.rope_parameters["rope_theta"]),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.vocab_size": int(config.vocab_size),
    }


def gguf_plan(model: nn.Module, weight_type: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Which tensors a .gguf of ``model`` holds, as what: 2-D weights whose rows fit whole blocks in
    ``weight_type``, everything else (norms, and a tied lm_head, which is not stored twice) in F32."""
    if weight_type not in ("F32", "F16", *QUANTIZERS):
        raise ValueError(f"weight_type must be F32, F16, {' or '.join(QUANTIZERS)}, got {weight_type!r}")
    plan = {}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        shape = tuple(parameter.shape)
        fits = len(shape) == 2 and (weight_type in ("F32", "F16")
                                    or shape[-1] % BLOCK_FORMATS[weight_type].block_size == 0)
        plan[gguf_tensor_name(name)] = (shape, weight_type if fits else "F32")
    return plan


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array, from whatever device it is on (``.numpy()`` refuses a CUDA tensor)."""
    return tensor.detach().cpu().numpy()


def write_gguf(path: str | os.PathLike, model: nn.Module, weight_type: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Write ``model`` (a transformers Llama) to ``path`` with gguf-py's GGUFWriter: the architecture metadata and
    every tensor, 2-D weights in ``weight_type`` quantized by this module's from-scratch quantizers.

    It has no tokenizer and does not permute q/k rows as llama.cpp's converter does, so it shows the file format,
    not a file llama.cpp would run. Returns the plan (name -> (shape, type)).
    """
    import gguf  # gguf-py

    plan = gguf_plan(model, weight_type)
    metadata = llama_metadata(model.config)
    writer = gguf.GGUFWriter(str(path), arch=metadata["general.architecture"])
    for key, value in metadata.items():
        if key == "general.architecture":
            continue  # GGUFWriter adds it itself
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    parameters = dict(model.named_parameters(remove_duplicate=True))
    for (hf_name, parameter), (name, (shape, type_name)) in zip(parameters.items(), plan.items()):
        values = parameter.detach().cpu().to(torch.float32)  # quantized on the CPU, the same bytes on every machine
        if type_name in QUANTIZERS:
            raw = _host_array(QUANTIZERS[type_name](values))
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[type_name])
        elif type_name == "F16":
            writer.add_tensor(name, _host_array(values.to(torch.float16)))
        else:
            writer.add_tensor(name, _host_array(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan


def read_gguf_header(path: str | os.PathLike) -> dict[str, int]:
    """The 24-byte header of a .gguf file: magic (must be b"GGUF"), version, tensor count, metadata count."""
    with open(path, "rb") as f:
        head = f.read(GGUF_HEADER_BYTES)
    if len(head) < GGUF_HEADER_BYTES or head[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (its first 4 bytes are {head[:4]!r}, expected b'GGUF')")
    version, tensors, entries = struct.unpack("<IQQ", head[4:])
    return {"version": version, "tensors": tensors, "metadata": entries}


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size
