"""Held-out perplexity of the shipped tiny Llama in every precision scheme, and the shipped pricer adapter's score
as the notebooks load it, as Markdown tables.

Run: ``.venv/bin/python data/build/evaluate_tiny_llama.py`` (after ``make rebuild-tiny-llama``); the tables
go into data/README.md. One model is loaded at a time and released before the next. Importing ``helpers`` first
pins the CPU numeric libraries, so the figures are those the notebooks would print on any CPU.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import environment  # noqa: E402

environment.quiet_known_noise(verbose=False)

from helpers import lora, models, pricer, profiles, quality  # noqa: E402

SCHEMES = ("fp32", "bf16", "int8", "fp4", "nf4", "nf4-dq")


def main() -> None:
    profile = profiles.PROFILES["tiny"]
    text = quality.heldout_text()
    rows = []
    for scheme in SCHEMES:
        model, tokenizer = models.load_model(profile, scheme)
        windows = quality.token_windows(tokenizer, text, seq_len=256, max_tokens=len(text))
        if scheme == "fp32":
            reference = quality.evaluate(model, windows, keep_log_probs=True)
            unigram = quality.unigram_perplexity(tokenizer, text)
            result = reference
            kl = 0.0
        else:
            result = quality.evaluate(model, windows, reference=reference)
            kl = result.kl_divergence
        agreement = quality.compare_with_reference(reference, result)["top1_agreement"]
        rows.append((scheme, result.perplexity, agreement, kl, result.tokens))
        del model
        gc.collect()
    print(f"Unigram perplexity of the held-out tokens (fitted to themselves): {unigram:.1f}\n")
    kl_tokens = reference.log_probs.shape[0] * reference.log_probs.shape[1]
    print(f"| scheme | held-out perplexity | top-1 agreement with float32 | KL from float32 (nats/token, first "
          f"{kl_tokens:,} tokens) | tokens |")
    print("|---|---|---|---|---|")
    for scheme, perplexity, agreement, kl, tokens in rows:
        print(f"| {scheme} | {perplexity:.2f} | {agreement:.1%} | {kl:.4f} | {tokens:,} |")
    print(f"\nCPU: {environment.describe_cpu()}\n")
    evaluate_adapter(profile)


def evaluate_adapter(profile: profiles.Profile) -> None:
    """The 200 test items on the NF4 + double quantization base, without and with the adapter, as notebook 04."""
    from peft import PeftModel

    items = pricer.load_split("test")
    model, tokenizer = models.load_model(profile, "nf4-dq")
    base_scores, _ = pricer.answer_prices(model, tokenizer, items)
    model = PeftModel.from_pretrained(model, profile.adapter_id)
    adapted_scores, answers = pricer.answer_prices(model, tokenizer, items)
    yardsticks = pricer.yardstick_scores(pricer.load_split("train"), items)
    print("| model | answers in the right format | mean absolute error |")
    print("|---|---|---|")
    rows = {"4-bit base": base_scores, **{f"guess the {k}": v for k, v in yardsticks.items()},
            "4-bit base + adapter": adapted_scores}
    for name, scores in rows.items():
        print(f"| {name} | {scores.format_share:.1%} | ${scores.mean_absolute_error:.2f} |")
    ratios = lora.update_ratios(model)
    print(f"\n||ΔW|| / ||W|| over {len(ratios)} modules: median {statistics.median(ratios.values()):.3f}, "
          f"max {max(ratios.values()):.3f}; {len(set(answers))} distinct answers")


if __name__ == "__main__":
    main()
