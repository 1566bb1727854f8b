"""Held-out perplexity of the shipped tiny Llama in every precision scheme, as a Markdown table.

Run: ``.venv/bin/python data/build/evaluate_tiny_llama.py`` (after ``make rebuild-tiny-llama``); the table
goes into data/README.md. One model is loaded at a time and released before the next.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import environment  # noqa: E402

environment.quiet_known_noise(verbose=False)

from helpers import models, profiles, quality  # noqa: E402

SCHEMES = ("fp32", "bf16", "int8", "fp4", "nf4", "nf4-dq")


def main() -> None:
    profile = profiles.PROFILES["tiny"]
    text = quality.heldout_text()
    rows = []
    for scheme in SCHEMES:
        model, tokenizer = models.load_model(profile, scheme)
        windows = quality.token_windows(tokenizer, text, seq_len=256, max_tokens=len(text))
        if scheme == "fp32":
            reference = quality.evaluate(model, windows)
            unigram = quality.unigram_perplexity(tokenizer, text)
            result = reference
        else:
            result = quality.evaluate(model, windows)
        agreement = quality.compare_with_reference(reference, result)["top1_agreement"]
        rows.append((scheme, result.perplexity, agreement, result.tokens))
        del model
        gc.collect()
    print(f"Unigram perplexity of the held-out tokens (fitted to themselves): {unigram:.1f}\n")
    print("| scheme | held-out perplexity | top-1 agreement with float32 | tokens |")
    print("|---|---|---|---|")
    for scheme, perplexity, agreement, tokens in rows:
        print(f"| {scheme} | {perplexity:.2f} | {agreement:.1%} | {tokens:,} |")


if __name__ == "__main__":
    main()
