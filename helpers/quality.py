"""Output quality: held-out perplexity, KL divergence and next-token agreement with a reference, greedy text.

A quantized model is compared with its float32 reference on the same tokens. The reference's results are
kept as tensors (top-1 ids, a slice of logits, and the log-probabilities the KL divergence needs), so the
reference model itself can be released before the next model is loaded: two models never need to be in
memory together.

Perplexity is exp of the mean negative log-likelihood of the true next token: the number of equally likely
tokens the model is, on average, choosing between. The KL divergence from the reference,
KL(P_ref || P_q) = sum over the vocabulary of p_ref * (log p_ref - log p_q), averaged over predicted positions,
compares the whole next-token distribution rather than only the true token's probability, so it sees damage
that perplexity averages away (a quantized model can be more confident on some tokens and less on others and
keep the same perplexity). It is 0 exactly when the two distributions agree, and it is in nats per token.
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


KL_LOG_PROBS_MAX_BYTES = 256 * 10**6
"""At most this many bytes of reference log-probabilities are kept on the CPU for the KL divergence: all of them
for the tiny model (4,096-token vocabulary), the first windows only for a 128k-vocabulary Llama."""


@dataclass
class EvalResult:
    """What a model predicted on the evaluation windows."""

    perplexity: float
    top1: torch.Tensor  # (windows, seq_len) argmax token ids
    logits_sample: torch.Tensor  # float32 logits of the first window, kept for logit-error comparisons
    tokens: int
    log_probs: torch.Tensor | None = None  # (kl_windows, seq_len, vocab) float32, kept by a reference run
    kl_divergence: float | None = None  # mean KL(reference || this model) in nats per token, when compared


def kl_windows_to_keep(windows: torch.Tensor, vocab_size: int, max_bytes: int = KL_LOG_PROBS_MAX_BYTES) -> int:
    """How many leading windows' log-probabilities fit in ``max_bytes`` (at least one)."""
    per_window = (windows.shape[1] - 1) * vocab_size * 4
    return max(1, min(windows.shape[0], max_bytes // per_window))


def kl_divergence(reference_log_probs: torch.Tensor, candidate_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_q) per position, in nats: the sum over the last (vocabulary) dimension.

    Both arguments are log-probabilities (``log_softmax`` of the logits) of the same shape.
    """
    if reference_log_probs.shape != candidate_log_probs.shape:
        raise ValueError(f"log-probabilities differ in shape: {tuple(reference_log_probs.shape)} vs "
                         f"{tuple(candidate_log_probs.shape)}; evaluate both models on the same windows")
    return (reference_log_probs.exp() * (reference_log_probs - candidate_log_probs)).sum(-1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = EVAL_BATCH_WINDOWS, keep_log_probs: bool = False,
             reference: EvalResult | None = None) -> EvalResult:
    """Perplexity and top-1 predictions of ``model`` on ``windows`` (from ``token_windows``).

    ``keep_log_probs=True`` (for the reference model) keeps the log-probabilities of the first windows, as many as
    ``KL_LOG_PROBS_MAX_BYTES`` allows; pass that result as ``reference`` when evaluating a quantized model to get
    its mean KL divergence from the reference over those windows.
    """
    if reference is not None and reference.log_probs is None:
        raise ValueError("the reference result holds no log-probabilities: evaluate it with keep_log_probs=True")
    device = model_device(model)
    nll, count, top1, sample, kept, kl_sum, kl_count = 0.0, 0, [], None, [], 0.0, 0
    n_keep = None
    seen = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        top1.append(logits.argmax(-1).cpu())
        if sample is None:
            sample = logits[0].cpu()
        if n_keep is None:
            n_keep = (kl_windows_to_keep(windows, logits.shape[-1]) if reference is None
                      else reference.log_probs.shape[0])
        take = max(0, min(len(batch), n_keep - seen))
        if take:
            log_probs = torch.log_softmax(logits[:take], dim=-1).cpu()
            if keep_log_probs:
                kept.append(log_probs)
            if reference is not None:
                per_position = kl_divergence(reference.log_probs[seen : seen + take], log_probs)
                kl_sum += per_position.sum().item()
                kl_count += per_position.numel()
        seen += len(batch)
    return EvalResult(perplexity=math.exp(nll / count), top1=torch.cat(top1), logits_sample=sample, tokens=count,
                      log_probs=torch.cat(kept) if kept else None,
                      kl_divergence=kl_sum / kl_count if reference is not None else None)


def compare_with_reference(reference: EvalResult, candidate: EvalResult) -> dict[str, float]:
    """Top-1 agreement (share of positions where both pick the same next token), relative logit error, and the
    KL divergence when ``candidate`` was evaluated with ``reference=``."""
    if reference.top1.shape != candidate.top1.shape:
        raise ValueError("reference and candidate were evaluated on different windows; use the same `windows`")
    agreement = (reference.top1 == candidate.top1).float().mean().item()
    error = (candidate.logits_sample - reference.logits_sample).norm() / reference.logits_sample.norm()
    result = {"perplexity": candidate.perplexity, "top1_agreement": agreement, "relative_logit_error": error.item()}
    if candidate.kl_divergence is not None:
        result["kl_divergence"] = candidate.kl_divergence
    return result


def unigram_perplexity(tokenizer, text: str) -> float:
    """Perplexity of a unigram model fitted to the text's own tokens: the bar a model must clear to use context."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    counts = torch.bincount(ids).double()
    probabilities = counts[ids] / len(ids)
    return math.exp(-probabilities.log().mean().item())


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy continuations (no sampling, so they repeat exactly), in the order of ``prompts``.

    Prompts of the same token length are decoded together, in one batch without padding: no pad token or
    attention mask can change an answer, and a test split of short prompts decodes many times faster than one
    prompt at a time.
    """
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    device = model_device(model)
    encoded = [tokenizer(prompt, return_tensors="pt")["input_ids"][0] for prompt in prompts]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    outputs: list[str] = [""] * len(prompts)
    for length, indices in sorted(by_length.items()):
        input_ids = torch.stack([encoded[i] for i in indices]).to(device)
        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row, index in enumerate(indices):
            outputs[index] = tokenizer.decode(generated[row, length:], skip_special_tokens=True)
    return outputs


@dataclass(frozen=True)
class GenerationSpeed:
    """Greedy generation of a fixed number of new tokens, timed (wall clock: not compared by CI)."""

    new_tokens: int
    prompt_tokens: int
    seconds: tuple[float, ...]  # each timed run, after one untimed warm-up
    token_ids: tuple[int, ...]  # what the runs generated (identical in every run, checked)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / min(self.seconds)


@torch.no_grad()
def generation_speed(model, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = 3) -> GenerationSpeed:
    """Tokens per second of greedy decoding: ``new_tokens`` exactly (end-of-text cannot stop it early), one prompt,
    after a warm-up run; the fastest of ``repeats`` runs counts (the others were slowed by something else).

    Decoding one token at a time is the case 4-bit kernels were built for: each step reads every weight once
    to produce one token, so its speed is set by how fast the weights are read and unpacked.
    """
    import time

    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string.")
    device = model_device(model)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    settings = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reference = model.generate(input_ids=input_ids, **settings)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generated = model.generate(input_ids=input_ids, **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        if not torch.equal(generated, reference):
            raise RuntimeError("Greedy decoding gave different tokens from one run to the next: something in the "
                               "model is not deterministic, so its speed cannot be compared.")
    new = reference[0, input_ids.shape[1]:]
    if len(new) != new_tokens:
        raise RuntimeError(f"generate produced {len(new)} new tokens instead of {new_tokens}.")
    return GenerationSpeed(new_tokens, input_ids.shape[1], tuple(seconds), tuple(new.tolist()))
