"""Stage 2 of the tiny Llama: continued pretraining on the Bible mixed with product listings (no prices).

Run it with ``make rebuild-tiny-llama`` after stage 1 (``train_tiny_llama.py``), or by hand::

    HF_HUB_OFFLINE=1 python data/build/continue_tiny_llama_on_catalogue.py

Why: a real Llama has read countless shop pages before anyone fine-tunes it to price products, so a pricing
adapter only has to learn the task. A base that has only read scripture must be rewritten by its adapter
instead, which teaches the opposite of LoRA's premise (small updates). This stage shows the tiny base the
domain: pages of synthetic product listings from ``helpers.pricer.catalogue_pages`` (every distinct
description except the test split's; never a price, the question or ``"Price is $"``), mixed with the
Bible's training chapters so it keeps its scripture. The tokenizer is stage 1's, unchanged.

It starts from the stage-1 checkpoint in ``data/tiny-llama/`` (bfloat16, as shipped), trains in float32 and
writes the result back there in bfloat16, with ``catalogue_training_log.csv`` and a ``continued_pretraining``
entry in ``training_summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BUILD_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BUILD_DIR.parents[1]))  # for `helpers`
sys.path.insert(0, str(BUILD_DIR))  # for stage 1's corpus functions

from helpers import pricer  # noqa: E402  (imported first: it applies the course's CPU pins before torch)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train_tiny_llama as stage1  # noqa: E402

SEED = 4321
CATALOGUE_SEED = 2024
CATALOGUE_COPIES = 3  # each listing appears in 3 differently shuffled pages: about a third of the mix's tokens
# stage 1's recipe, shorter and gentler: it continues a trained model instead of starting one
TRAINING = {**stage1.TRAINING, "steps": 300, "peak_learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 30}


def learning_rate(step: int) -> float:
    return stage1.warmup_cosine(step, TRAINING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=stage1.MODEL_DIR, help="stage-1 checkpoint (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=stage1.MODEL_DIR, help="where to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=TRAINING["steps"])
    args = parser.parse_args()
    TRAINING["steps"] = args.steps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(TRAINING["torch_threads"])
    started = time.time()
    train_chapters, heldout_chapters = stage1.split_chapters(stage1.read_kjv_chapters())
    test_prompts = [item.prompt for item in pricer.load_split("test")]
    catalogue = [page for copy in range(CATALOGUE_COPIES)
                 for page in pricer.catalogue_pages(test_prompts, seed=CATALOGUE_SEED + copy)]
    documents = train_chapters + catalogue
    random.Random(SEED).shuffle(documents)

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    stream = stage1.token_stream(tokenizer, documents)
    catalogue_tokens = len(stage1.token_stream(tokenizer, catalogue))
    heldout_slice = stage1.token_stream(tokenizer, heldout_chapters)[: 64 * TRAINING["sequence_length"] + 1]
    print(f"mix: {len(stream):,} tokens, {catalogue_tokens:,} of them in {len(catalogue)} catalogue pages "
          f"({catalogue_tokens / len(stream):.0%})")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAINING["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAINING["peak_learning_rate"], betas=TRAINING["betas"],
    )
    seq_len, batch_size = TRAINING["sequence_length"], TRAINING["batch_size"]
    generator = torch.Generator().manual_seed(SEED)
    before = stage1.evaluate_perplexity(model, heldout_slice, seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "catalogue_training_log.csv", "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "learning_rate", "train_loss", "elapsed_seconds"])
        model.train()
        for step in (progress := tqdm(range(TRAINING["steps"]), desc="continued pretraining", unit="step")):
            starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
            inputs = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            loss = model(input_ids=inputs, labels=inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), TRAINING["grad_clip"])
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            log.writerow([step + 1, f"{learning_rate(step):.6f}", f"{loss.item():.4f}", f"{time.time() - started:.0f}"])
    after = stage1.evaluate_perplexity(model, heldout_slice, seq_len)
    print(f"held-out Bible perplexity (slice): {before:.2f} before, {after:.2f} after")

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    generation_config = model.generation_config
    model.save_pretrained(args.out)
    generation_config.save_pretrained(args.out)
    if args.out.resolve() != args.base.resolve():  # the tokenizer is stage 1's, unchanged: copy its files as they are
        for name in ("tokenizer.json", "tokenizer_config.json", "training_log.csv"):
            shutil.copyfile(args.base / name, args.out / name)
    summary_path = args.out / "training_summary.json"
    summary = json.loads((args.base / "training_summary.json").read_text())
    summary["continued_pretraining"] = {
        "seed": SEED, "catalogue_seed": CATALOGUE_SEED, "catalogue_copies": CATALOGUE_COPIES,
        "training": {**TRAINING, "betas": list(TRAINING["betas"])}, "mix_tokens": len(stream),
        "catalogue_pages": len(catalogue), "catalogue_tokens": catalogue_tokens,
        "heldout_slice_perplexity_before": round(before, 2), "heldout_slice_perplexity_after": round(after, 2),
        "elapsed_seconds": round(time.time() - started), "torch": torch.__version__,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {args.out} in {(time.time() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
