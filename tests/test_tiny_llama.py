"""The shipped tiny Llama: loads offline, is a miniature Llama 3, uses context, and fails loudly when damaged."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import memory, models, profiles, quality

TINY = profiles.PROFILES["tiny"]
FOLDER = profiles.DATA_DIR / "tiny-llama"
PROMPT = "And the LORD spake unto Moses, saying,"
RECORDED_CONTINUATION = "\n2:2 Son of man, and the priests, and the Levites,"
PERPLEXITY_BOUND_ON_SLICE = 23.7  # measured 22.98 in float32 on the first 2048 held-out tokens; 3% margin
LISTING = "Brown leather mug\n"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.load_model(TINY, "fp32")
    return model, tokenizer


def test_loads_offline_with_auto_classes():
    model = AutoModelForCausalLM.from_pretrained(FOLDER)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16  # transformers 5 keeps the stored dtype by default
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert (FOLDER / "generation_config.json").is_file()


def test_stored_in_bfloat16_within_size_limits():
    with safe_open(str(FOLDER / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"BF16"}
    assert (FOLDER / "model.safetensors").stat().st_size <= 25 * 10**6
    config = json.loads((FOLDER / "config.json").read_text())
    assert sum(memory.parameter_counts_from_config(config).values()) <= 12_000_000


def test_architecture_is_a_miniature_llama_3(tiny):
    model, _ = tiny
    config = model.config
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert config.num_key_value_heads < config.num_attention_heads
    assert attention.k_proj.out_features < attention.q_proj.out_features
    assert attention.k_proj.out_features == attention.v_proj.out_features
    assert config.hidden_act == "silu" and 2.5 <= config.intermediate_size / config.hidden_size <= 3.5
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.model.rotary_emb.inv_freq.numel() == memory.head_dim_of(config) // 2
    assert model.lm_head.weight is not model.get_input_embeddings().weight and not config.tie_word_embeddings
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * config.num_hidden_layers + 1
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)


def test_heldout_text_is_at_most_200_kb():
    text = quality.heldout_text()
    assert 0 < len(text.encode("utf-8")) <= 200 * 1024


def test_uses_context_far_better_than_a_unigram_model(tiny):
    model, tokenizer = tiny
    text = quality.heldout_text()[:60_000]  # about a third of the held-out text: the same verdict, 5 s sooner
    windows = quality.token_windows(tokenizer, text, seq_len=256, max_tokens=len(text))
    perplexity = quality.evaluate(model, windows).perplexity
    assert perplexity <= 0.5 * quality.unigram_perplexity(tokenizer, text)


def test_perplexity_on_a_slice_stays_under_the_recorded_bound(tiny):
    model, tokenizer = tiny
    windows = quality.token_windows(tokenizer, quality.heldout_text(), seq_len=256, max_tokens=2048)
    assert quality.evaluate(model, windows).perplexity < PERPLEXITY_BOUND_ON_SLICE


def test_the_base_has_read_product_listings_but_never_a_price(tiny):
    """Stage 2 showed it shop pages without prices: it continues a listing like one, and has no price to give."""
    model, tokenizer = tiny
    continuation = quality.greedy_generate(model, tokenizer, [LISTING], max_new_tokens=12)[0]
    assert continuation.startswith("Size: ") and "Brand:" in continuation
    assert "$" not in continuation


def test_greedy_generation_is_the_recorded_string(tiny):
    model, tokenizer = tiny
    assert quality.greedy_generate(model, tokenizer, [PROMPT], max_new_tokens=16)[0] == RECORDED_CONTINUATION


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file_is_reported_with_the_fix(tmp_path, missing):
    copy = tmp_path / "tiny-llama"
    shutil.copytree(FOLDER, copy)
    (copy / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks {missing}.*make rebuild-tiny-llama"):
        models.check_local_model_files(copy)


def test_truncated_weights_are_reported_with_the_fix(tmp_path):
    copy = tmp_path / "tiny-llama"
    shutil.copytree(FOLDER, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="corrupted or truncated.*git checkout"):
        models.check_local_model_files(copy)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(RuntimeError, match="corrupted or truncated"):
        models.check_local_model_files(copy)
