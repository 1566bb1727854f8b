"""Rebuild the shipped tiny Llama from scratch: corpus, tokenizer, weights, held-out text.

Run it with ``make rebuild-tiny-llama`` (or ``python data/build/train_tiny_llama.py``).
It needs Debian's ``bible-kjv`` package (``apt-get install bible-kjv``), which prints the
King James Bible (public domain), and nothing from the Hugging Face Hub.

Everything that decides the result is a constant in this file: the split, the tokenizer's
vocabulary size, the architecture, the optimiser and the seeds. The loss log goes to
``data/tiny-llama/training_log.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

DATA_DIR = Path(__file__).resolve().parents[1]
MODEL_DIR = DATA_DIR / "tiny-llama"
HELDOUT_PATH = DATA_DIR / "eval" / "heldout.txt"

SEED = 1234
HELDOUT_EVERY_NTH_CHAPTER = 25  # chapters 0, 25, 50, ... of the 1,189 never reach training
VOCAB_SIZE = 4096
SPECIAL_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|pad|>"}

ARCHITECTURE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
)

TRAINING = dict(
    sequence_length=256,
    batch_size=16,
    steps=1000,
    peak_learning_rate=3e-3,
    min_learning_rate=3e-4,
    warmup_steps=100,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    torch_threads=2,
)

VERSE_LINE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_kjv_chapters() -> list[str]:
    """Return the King James Bible as a list of chapters, one verse per line as ``chapter:verse text``.

    The references stay (without the book name) so that the model sees digits: the pricer adapter of
    notebooks 04 and 06 answers with numbers, and a base that never saw a digit cannot tell them apart.
    """
    if shutil.which("bible") is None:
        sys.exit("The `bible` command is missing: install Debian's package with `apt-get install bible-kjv`.")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: list[list[str]] = []
    current_key = None
    for line in text.splitlines():
        match = VERSE_LINE.match(line.strip())
        if not match:
            continue
        book, chapter, verse, words = match.groups()
        if (book, chapter) != current_key:
            chapters.append([])
            current_key = (book, chapter)
        chapters[-1].append(f"{chapter}:{verse} {words.strip()}")
    if len(chapters) != 1189:
        sys.exit(f"Expected 1,189 chapters from `bible`, got {len(chapters)}: is bible-kjv complete?")
    return ["\n".join(verses) for verses in chapters]


def split_chapters(chapters: list[str]) -> tuple[list[str], list[str]]:
    heldout = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY_NTH_CHAPTER == 0]
    train = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY_NTH_CHAPTER != 0]
    return train, heldout


def train_tokenizer(train_chapters: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_chapters, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=ARCHITECTURE["max_position_embeddings"],
    )


def token_stream(tokenizer, chapters: list[str]) -> torch.Tensor:
    """One long stream: BOS chapter EOS BOS chapter EOS ..."""
    ids: list[int] = []
    for chapter in chapters:
        ids.extend(tokenizer(chapter)["input_ids"])  # BOS is added by the post-processor
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def learning_rate(step: int) -> float:
    return warmup_cosine(step, TRAINING)


def warmup_cosine(step: int, t: dict) -> float:
    """Linear warm-up to ``peak_learning_rate`` over ``warmup_steps``, then a cosine decay to ``min_learning_rate``
    at ``steps`` (the keys of a TRAINING dict; stage 2 and the adapter's training use it too)."""
    if step < t["warmup_steps"]:
        return t["peak_learning_rate"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return t["min_learning_rate"] + (t["peak_learning_rate"] - t["min_learning_rate"]) * cosine


@torch.no_grad()
def evaluate_perplexity(model, stream: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n_blocks = (len(stream) - 1) // seq_len
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_blocks * seq_len, seq_len * 16):
        blocks = [stream[s : s + seq_len + 1] for s in range(start, min(start + seq_len * 16, n_blocks * seq_len), seq_len)]
        batch = torch.stack(blocks)
        logits = model(input_ids=batch[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train()
    return math.exp(total_nll / total_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TRAINING["steps"], help="optimiser steps (default: the shipped run)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="where to write the checkpoint")
    args = parser.parse_args()
    TRAINING["steps"] = args.steps

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(TRAINING["torch_threads"])
    started = time.time()

    chapters = read_kjv_chapters()
    train_chapters, heldout_chapters = split_chapters(chapters)
    HELDOUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    HELDOUT_PATH.write_text("\n\n".join(heldout_chapters) + "\n", encoding="utf-8")
    print(f"corpus: {len(train_chapters)} training chapters, {len(heldout_chapters)} held-out chapters "
          f"({HELDOUT_PATH.stat().st_size:,} bytes)")

    tokenizer = train_tokenizer(train_chapters)
    train_stream = token_stream(tokenizer, train_chapters)
    heldout_stream = token_stream(tokenizer, heldout_chapters)
    print(f"tokens: {len(train_stream):,} training, {len(heldout_stream):,} held-out")

    config = LlamaConfig(
        **ARCHITECTURE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": TRAINING["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=TRAINING["peak_learning_rate"], betas=TRAINING["betas"],
    )
    seq_len, batch_size = TRAINING["sequence_length"], TRAINING["batch_size"]
    generator = torch.Generator().manual_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.csv"
    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "learning_rate", "train_loss", "heldout_perplexity", "elapsed_seconds"])
        model.train()
        progress = tqdm(range(TRAINING["steps"]), desc="training", unit="step")
        for step in progress:
            starts = torch.randint(0, len(train_stream) - seq_len - 1, (batch_size,), generator=generator)
            batch = torch.stack([train_stream[s : s + seq_len + 1] for s in starts.tolist()])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            inputs = batch[:, :-1]
            loss = model(input_ids=inputs, labels=inputs).loss  # the model shifts labels by one itself
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), TRAINING["grad_clip"])
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            is_eval_step = (step + 1) % 200 == 0 or step + 1 == TRAINING["steps"]
            ppl = evaluate_perplexity(model, heldout_stream[: 64 * seq_len + 1], seq_len) if is_eval_step else ""
            log.writerow([step + 1, f"{learning_rate(step):.6f}", f"{loss.item():.4f}",
                          f"{ppl:.2f}" if ppl != "" else "", f"{time.time() - started:.0f}"])
            log_file.flush()
            if is_eval_step:
                tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, held-out perplexity (slice) {ppl:.2f}")

    model = model.to(torch.bfloat16)  # stored as Meta stores Llama checkpoints
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=40,
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    elapsed = time.time() - started
    (args.out / "training_summary.json").write_text(json.dumps({
        "seed": SEED, "architecture": ARCHITECTURE, "training": {**TRAINING, "betas": list(TRAINING["betas"])},
        "parameters": n_params, "training_tokens": len(train_stream), "heldout_tokens": len(heldout_stream),
        "elapsed_seconds": round(elapsed), "torch": torch.__version__,
    }, indent=2) + "\n")
    print(f"saved to {args.out} in {elapsed / 60:.1f} minutes")


if __name__ == "__main__":
    main()
