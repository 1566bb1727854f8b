"""Output quality: held-out perplexity, next-token agreement with a reference, logit error, greedy text.

A quantized model is compared with its float32 reference on the same tokens. The reference's results are
kept as small tensors (top-1 ids and a slice of logits), so the reference model itself can be released
before the next model is loaded: two models never need to be in memory together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from helpers.memory import EVAL_BATCH_WINDOWS
from helpers.models import model_device

HELDOUT_PATH = Path(__file__).resolve().parents[1] / "data" / "eval" / "heldout.txt"


def heldout_text(path: str | Path = HELDOUT_PATH) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No held-out text at {path}; it ships in data/eval/ (or `make rebuild-tiny-llama`).")
    return path.read_text(encoding="utf-8")


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (the +1 is the last target), at most ``max_tokens`` targets."""
    if seq_len < 2 or max_tokens < seq_len:
        raise ValueError(f"need seq_len >= 2 and max_tokens >= seq_len, got seq_len={seq_len}, max_tokens={max_tokens}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_windows = min((len(ids) - 1) // seq_len, max_tokens // seq_len)
    if n_windows == 0:
        raise ValueError(f"text has {len(ids)} tokens, too few for one window of {seq_len + 1}")
    starts = torch.arange(n_windows) * seq_len
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


@dataclass
class EvalResult:
    """What a model predicted on the evaluation windows."""

    perplexity: float
    top1: torch.Tensor  # (windows, seq_len) argmax token ids
    logits_sample: torch.Tensor  # float32 logits of the first window, kept for logit-error comparisons
    tokens: int


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = EVAL_BATCH_WINDOWS) -> EvalResult:
    """Perplexity and top-1 predictions of ``model`` on ``windows`` (from ``token_windows``)."""
    device = model_device(model)
    nll, count, top1, sample = 0.0, 0, [], None
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        top1.append(logits.argmax(-1).cpu())
        if sample is None:
            sample = logits[0].cpu()
    return EvalResult(perplexity=math.exp(nll / count), top1=torch.cat(top1), logits_sample=sample, tokens=count)


def compare_with_reference(reference: EvalResult, candidate: EvalResult) -> dict[str, float]:
    """Top-1 agreement (share of positions where both pick the same next token) and relative logit error."""
    if reference.top1.shape != candidate.top1.shape:
        raise ValueError("reference and candidate were evaluated on different windows; use the same `windows`")
    agreement = (reference.top1 == candidate.top1).float().mean().item()
    error = (candidate.logits_sample - reference.logits_sample).norm() / reference.logits_sample.norm()
    return {"perplexity": candidate.perplexity, "top1_agreement": agreement, "relative_logit_error": error.item()}


def unigram_perplexity(tokenizer, text: str) -> float:
    """Perplexity of a unigram model fitted to the text's own tokens: the bar a model must clear to use context."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    counts = torch.bincount(ids).double()
    probabilities = counts[ids] / len(ids)
    return math.exp(-probabilities.log().mean().item())


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy continuations (no sampling, so they repeat exactly), one prompt at a time (no padding effects)."""
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    device = model_device(model)
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return outputs
