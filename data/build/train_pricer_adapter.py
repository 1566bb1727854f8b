"""Train the shipped pricer adapter with QLoRA on the tiny Llama, then score base vs adapted.

Run from the repository root, after ``data/tiny-llama/`` and ``data/pricer/`` exist::

    HF_HUB_OFFLINE=1 python data/build/train_pricer_adapter.py

The recipe is the course's: the base model is loaded in 4-bit NF4 with double quantization and stays
frozen; ``peft.prepare_model_for_kbit_training`` readies it; LoRA (r=32, alpha=64, on q_proj, k_proj,
v_proj and o_proj: ``helpers.pricer.ADAPTER_LORA_SETTINGS``) is the only thing trained; the loss is
computed on the answer tokens only (the digits of the price and the end-of-text token).

Writes into ``data/pricer-adapter/``: ``adapter_config.json`` and ``adapter_model.safetensors`` (peft
format), ``training_log.csv`` (step, learning rate, loss, seconds) and ``evaluation.json`` (base vs
adapted on the held-out test split, greedy decoding).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the Hub

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # for `helpers`

from helpers import lora, pricer  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the tiny Llama's schedule
from train_tiny_llama import warmup_cosine  # noqa: E402
from helpers.environment import seed_everything  # noqa: E402

BASE_DIR = REPO_ROOT / "data" / "tiny-llama"
BASE_NAME_IN_CONFIG = "data/tiny-llama"  # written into adapter_config.json instead of this machine's path

TRAINING = dict(
    seed=1234,
    batch_size=16,
    steps=1000,  # 8 epochs of the 2,000 training items, about 8 minutes on 2 CPU threads
    peak_learning_rate=4.5e-4,  # low enough that the update stays a correction (median ||ΔW|| / ||W|| <= 0.25)
    min_learning_rate=4.5e-5,
    warmup_steps=30,
    weight_decay=0.0,
    grad_clip=1.0,
    # float32 compute, as the notebooks compute on every CPU (helpers.models.compute_dtype_for): bfloat16 is
    # emulated on CPUs without AVX512-BF16/AMX, slower there and rounded differently on each instruction set.
    compute_dtype="float32",
)


def load_base(base_dir: Path, compute_dtype: torch.dtype):
    """The frozen base: Linear weights in 4-bit NF4 with double quantization, everything else float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 16 levels at the quantiles of a normal distribution
        bnb_4bit_use_double_quant=True,  # quantize the per-block absmax constants too
        bnb_4bit_compute_dtype=compute_dtype,  # dtype the weights are dequantized to for each matmul
        bnb_4bit_quant_storage=torch.uint8,  # two 4-bit codes per byte
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return model, tokenizer


def learning_rate(step: int) -> float:
    """Linear warm-up, then a cosine decay from the peak to the minimum (the tiny Llama's schedule)."""
    return warmup_cosine(step, TRAINING)


def train(model, tokenizer, items: list[pricer.PricerItem], log_path: Path) -> tuple[float, float]:
    """Run the training loop; return (seconds, mean loss of the last 50 steps)."""
    t = TRAINING
    encoded = [pricer.encode_for_training(tokenizer, item) for item in items]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t["peak_learning_rate"], weight_decay=t["weight_decay"])
    order_generator = torch.Generator().manual_seed(t["seed"])
    order: list[int] = []
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with log_path.open("w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "learning_rate", "loss", "seconds"])
        progress = tqdm(range(t["steps"]), desc="training", unit="step")
        for step in progress:
            if len(order) < t["batch_size"]:  # a fresh shuffle of the whole training split: one epoch
                order += torch.randperm(len(encoded), generator=order_generator).tolist()
            batch_indices, order = order[: t["batch_size"]], order[t["batch_size"] :]
            batch = pricer.collate_for_training([encoded[i] for i in batch_indices], tokenizer.pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            loss = model(**batch).loss  # transformers averages over the labels that are not IGNORE_INDEX
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, t["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            log.writerow([step + 1, f"{learning_rate(step):.6f}", f"{losses[-1]:.4f}", f"{time.perf_counter() - start:.1f}"])
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return time.perf_counter() - start, sum(losses[-50:]) / len(losses[-50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE_DIR, help="base model folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=pricer.ADAPTER_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=TRAINING["steps"], help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=TRAINING["peak_learning_rate"], help="peak learning rate (default: %(default)s)")
    args = parser.parse_args()
    TRAINING["steps"] = args.steps
    TRAINING["peak_learning_rate"] = args.lr
    TRAINING["min_learning_rate"] = args.lr / 10

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    torch.set_num_threads(args.threads)
    seed_everything(TRAINING["seed"])
    compute_dtype = getattr(torch, TRAINING["compute_dtype"])
    train_items, test_items = pricer.load_split("train"), pricer.load_split("test")

    model, tokenizer = load_base(args.base, compute_dtype)
    # Freezes the base and casts the non-quantized parts (norms, embeddings, lm_head) to float32.
    # Gradient checkpointing is off: it saves activation memory by recomputing the forward pass,
    # memory this tiny model does not need, and compute is what a CPU lacks.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(**pricer.ADAPTER_LORA_SETTINGS))
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable LoRA parameters: {trainable:,} of {total:,} stored parameters")

    args.out.mkdir(parents=True, exist_ok=True)
    seconds, final_loss = train(model, tokenizer, train_items, args.out / "training_log.csv")
    print(f"trained {TRAINING['steps']} steps in {seconds / 60:.1f} min; mean loss of the last 50 steps {final_loss:.4f}")

    model.peft_config["default"].base_model_name_or_path = BASE_NAME_IN_CONFIG
    model.save_pretrained(args.out)
    (args.out / "README.md").unlink(missing_ok=True)  # peft's blank model card: data/README.md documents the folder
    del model

    # Score what was saved, not what is in memory: a fresh 4-bit base, then the adapter from disk.
    seed_everything(TRAINING["seed"])
    base, tokenizer = load_base(args.base, compute_dtype)
    base_scores, base_answers = pricer.answer_prices(base, tokenizer, test_items)
    adapted = PeftModel.from_pretrained(base, args.out)
    adapted_scores, adapted_answers = pricer.answer_prices(adapted, tokenizer, test_items)
    ratios = lora.update_ratios(adapted)
    median_ratio = statistics.median(ratios.values())
    print(f"||ΔW|| / ||W|| over {len(ratios)} modules: median {median_ratio:.3f}, max {max(ratios.values()):.3f}")

    for item, before, after in list(zip(test_items, base_answers, adapted_answers))[:5]:
        print(f"true ${item.price:>4} | base {before!r:<28} | adapted {after!r}")
    for label, scores in (("base", base_scores), ("adapted", adapted_scores)):
        print(f"{label:>8}: right format {scores.format_share:.1%}, mean absolute error ${scores.mean_absolute_error:.2f}")
    report = {
        "test_items": len(test_items),
        "decoding": f"greedy, at most {pricer.ANSWER_MAX_NEW_TOKENS} new tokens",
        "unparsable_rule": "an answer that is not in the right format counts as $0 (its error is the true price)",
        "base": asdict(base_scores),
        "adapted": asdict(adapted_scores),
        "update_ratio": {"median": round(median_ratio, 4), "max": round(max(ratios.values()), 4),
                         "per_module": {name: round(value, 4) for name, value in ratios.items()}},
        "training": {**TRAINING, "threads": args.threads, "seconds": round(seconds, 1), "final_loss": round(final_loss, 4)},
    }
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
