"""Notebook 06's training helpers: trl's SFTTrainer repeats the explicit loop, loss-curve reading, optimizer states."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import environment, lora, pricer

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO_ROOT / "data" / "tiny-llama"


def pinned_versions() -> dict[str, str]:
    """``name -> version`` of every exact pin in requirements.txt, the ``#no-deps`` lines included."""
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.removeprefix("#no-deps ").strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


# ---------------------------------------------------------------------------------------------- the pinned set


def test_trl_is_pinned_and_installed_at_its_pin():
    pins = pinned_versions()
    assert "trl" in pins, "requirements.txt must pin trl exactly"
    assert importlib.metadata.version("trl") == pins["trl"]


def test_trl_runtime_requirements_are_met_by_the_pinned_set():
    """Every requirement trl declares (extras aside) is satisfied by what is installed, and no pin moved."""
    pins = pinned_versions()
    for text in importlib.metadata.requires("trl") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(Version(installed), prereleases=True), (requirement, installed)
        key = requirement.name.lower().replace("_", "-")
        if key in pins:
            assert installed == pins[key], f"{key} moved from its pin {pins[key]} to {installed}"


def test_trl_imports_with_the_pinned_set():
    from trl import SFTConfig, SFTTrainer  # noqa: F401


# ---------------------------------------------------------------------------------------------- SFTTrainer = the loop


def _tiny_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    environment.seed_everything(0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    return get_peft_model(model, lora_config), tokenizer


def test_a_tiny_sft_trainer_run_repeats_the_explicit_loop(tmp_path):
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    settings = lora.TrainingSettings(steps=4, batch_size=2, learning_rate=1e-2, warmup_steps=2,
                                     gradient_checkpointing=False, loss_scaling=False, reasons=())
    items = pricer.load_split("train")[: settings.steps * settings.batch_size]
    model, tokenizer = _tiny_peft_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]

    def optimizer_and_schedule():
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: settings.learning_rate_at(step) / settings.learning_rate)

    encoded = [pricer.encode_for_training(tokenizer, item) for item in items]
    optimizer, scheduler = optimizer_and_schedule()
    loop_losses = []
    model.train()
    for step in range(settings.steps):
        batch = pricer.collate_for_training(encoded[step * 2:(step + 1) * 2], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loop_losses.append(loss.item())

    with torch.no_grad():
        for p, start in zip(trainable, initial):
            p.copy_(start)
    data = datasets.Dataset.from_list([{"prompt": item.prompt, "completion": item.answer} for item in items])
    args = SFTConfig(**lora.sft_config_kwargs(settings, tmp_path, save_steps=1, save_total_limit=2))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         optimizers=optimizer_and_schedule())
    trainer.remove_callback(PrinterCallback)
    prepared = trainer.train_dataset
    assert [(row["input_ids"], row["labels"]) for row in prepared] == [tuple(pair) for pair in encoded]
    trainer.train()
    trainer_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(trainer_losses) == settings.steps
    assert max(abs(a - b) for a, b in zip(loop_losses, trainer_losses)) < lora.trainer_loss_tolerance(torch.float32)
    assert lora.checkpoint_folders(tmp_path) == ["checkpoint-3", "checkpoint-4"]


# ---------------------------------------------------------------------------------------------- pure functions


def test_sft_config_kwargs_undo_the_defaults_that_would_differ():
    settings = lora.training_settings("llama-3.2-3b", torch.float16, on_gpu=True)
    kwargs = lora.sft_config_kwargs(settings, "/tmp/out", save_steps=20, save_total_limit=2, seed=3)
    assert kwargs["max_steps"] == 60 and kwargs["per_device_train_batch_size"] == 4
    assert kwargs["train_sampling_strategy"] == "sequential" and kwargs["shuffle_dataset"] is False
    assert kwargs["max_grad_norm"] == 0.0 and kwargs["bf16"] is False and kwargs["fp16"] is True
    assert kwargs["activation_checkpointing"] is True and kwargs["completion_only_loss"] is True
    assert (kwargs["save_steps"], kwargs["save_total_limit"], kwargs["seed"]) == (20, 2, 3)
    cpu = lora.sft_config_kwargs(lora.training_settings("tiny", torch.float32, on_gpu=False), "out", 10, 1)
    assert cpu["fp16"] is False and cpu["activation_checkpointing"] is False


def test_sft_config_kwargs_are_accepted_by_trl():
    from trl import SFTConfig

    settings = lora.training_settings("tiny", torch.float32, on_gpu=False)
    args = SFTConfig(**lora.sft_config_kwargs(settings, "unused-out", save_steps=10, save_total_limit=2))
    assert (args.max_steps, args.save_total_limit, args.bf16, args.max_grad_norm) == (30, 2, False, 0.0)
    assert args.gradient_checkpointing is False  # trl's own default (True) is overridden


def test_sft_config_kwargs_refuse_bad_input():
    settings = lora.training_settings("tiny", torch.float32, on_gpu=False)
    with pytest.raises(TypeError, match="TrainingSettings"):
        lora.sft_config_kwargs({"steps": 3}, "out", 1, 1)
    with pytest.raises(ValueError, match="save_total_limit"):
        lora.sft_config_kwargs(settings, "out", 1, 0)
    with pytest.raises(ValueError, match="save_steps"):
        lora.sft_config_kwargs(settings, "out", True, 1)
    with pytest.raises(ValueError, match="output_dir"):
        lora.sft_config_kwargs(settings, " ", 1, 1)


def test_trainer_loss_tolerance():
    assert lora.trainer_loss_tolerance(torch.float32) == 1e-3
    assert lora.trainer_loss_tolerance(torch.float16) == 5e-2
    with pytest.raises(ValueError, match="compute_dtype"):
        lora.trainer_loss_tolerance(torch.int8)


def test_checkpoint_folders_in_step_order(tmp_path):
    for name in ("checkpoint-20", "checkpoint-3", "checkpoint-x", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    assert lora.checkpoint_folders(tmp_path) == ["checkpoint-3", "checkpoint-20"]
    with pytest.raises(FileNotFoundError):
        lora.checkpoint_folders(tmp_path / "missing")


def test_moving_average():
    assert lora.moving_average([4, 2, 6, 0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert lora.moving_average([1, 2, 3], 5) == [1.0, 1.5, 2.0]
    assert lora.moving_average([], 3) == []
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            lora.moving_average([1.0], bad)


def test_epoch_ends():
    assert lora.epoch_ends(240, 8, 30) == [30]
    assert lora.epoch_ends(1000, 8, 30) == []
    assert lora.epoch_ends(100, 8, 30) == [13, 25]
    assert lora.epoch_ends(16, 8, 5) == [2, 4]
    with pytest.raises(ValueError, match="batch_size"):
        lora.epoch_ends(10, 0, 3)


def test_optimizer_state_memory_exact_bytes():
    sizes = [8192, 4096, 4095, 300_000]
    assert lora.optimizer_state_memory(sizes, "adamw").total == 8 * sum(sizes)
    eight = lora.optimizer_state_memory(sizes, "adamw8bit")
    expected = (2 * 8192 + 8 * 32) + (2 * 4096 + 8 * 16) + 8 * 4095 + (2 * 300_000 + 8 * 1172) + 2 * 256 * 4
    assert eight.total == expected and eight.paged == 0
    paged = lora.optimizer_state_memory(sizes, "paged_adamw")
    assert paged.total == 8 * sum(sizes) and paged.paged == 8 * 300_000
    assert lora.optimizer_state_memory(sizes, "paged_adamw8bit").paged == 2 * 300_000
    assert lora.optimizer_state_memory([100], "adamw8bit").total == 800  # all 32-bit: no code books


def test_optimizer_state_memory_matches_bitsandbytes_on_cpu():
    import bitsandbytes as bnb

    sizes = [8192, 2048, 300, 5000]
    params = [torch.nn.Parameter(torch.ones(n)) for n in sizes]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    code_books = {id(v): v.nelement() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                  if k.startswith("qmap")}
    measured = sum(v.nelement() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                   if torch.is_tensor(v) and k != "step" and not k.startswith("qmap")) + sum(code_books.values())
    assert measured == lora.optimizer_state_memory(sizes, "adamw8bit").total


def test_lora_tensor_sizes_sum_to_the_parameter_count():
    config = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 3, "vocab_size": 100}
    sizes = lora.lora_tensor_sizes(config, 8, ["q_proj", "k_proj"])
    assert sizes == [8 * 64, 64 * 8, 8 * 64, 32 * 8] * 3
    assert sum(sizes) == lora.lora_param_count(config, 8, ["q_proj", "k_proj"])


def test_optimizer_state_memory_refuses_bad_input():
    with pytest.raises(ValueError, match="optimizer"):
        lora.optimizer_state_memory([10], "sgd")
    with pytest.raises(ValueError, match="tensor_sizes"):
        lora.optimizer_state_memory([10, 0], "adamw")


def test_runnable_optimizers_by_hardware():
    assert set(lora.runnable_optimizers(on_gpu=False)) == {"adamw", "adamw8bit"}
    assert set(lora.runnable_optimizers(on_gpu=True)) == set(lora.OPTIMIZERS)
    with pytest.raises(TypeError, match="on_gpu"):
        lora.runnable_optimizers("yes")


def test_notebook_06_colab_extras_are_pinned():
    """Notebook 06 asks Colab for trl and datasets: both must be exact pins of requirements.txt."""
    from helpers import colab

    pins = colab.read_pins((REPO_ROOT / "requirements.txt").read_text())
    assert {"trl", "datasets"} <= set(pins)
    assert colab.install_extras_on_colab(REPO_ROOT, ("trl", "datasets")) is None  # not on Colab: installs nothing


def test_the_loop_leaves_the_schedule_where_it_was_after_a_step_the_scaler_skipped():
    from helpers.lora import schedule_after_step

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step + 1.0)
    scaler = torch.amp.GradScaler(device="cpu", init_scale=2.0 ** 4)
    advanced = []
    for gradient in (torch.tensor([1.0, 1.0]), torch.tensor([float("inf"), 1.0]), torch.tensor([1.0, 1.0])):
        scaler.scale((weight * gradient).sum()).backward()  # a gradient of `gradient`, scaled
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        advanced.append(schedule_after_step(scheduler, scaler, before))
        optimizer.zero_grad()
    assert advanced == [True, False, True] and scheduler.last_epoch == 2
    assert scaler.get_scale() == 2.0 ** 3  # the inf halved the scale once
    disabled = torch.amp.GradScaler(device="cpu", enabled=False)
    assert schedule_after_step(scheduler, disabled, disabled.get_scale()) and scheduler.last_epoch == 3


def test_the_loop_computes_under_the_trainers_autocast_only_with_float16_compute():
    from helpers.lora import training_autocast, training_settings

    linear = torch.nn.Linear(4, 4)
    x = torch.ones(1, 4)
    for dtype, expected in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        settings = training_settings("llama-3.2-3b", dtype, on_gpu=False)
        with training_autocast(settings, "cpu"):
            assert linear(x).dtype == expected
    with pytest.raises(TypeError, match="TrainingSettings"):
        training_autocast("fp16", "cpu")
