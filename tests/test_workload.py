"""helpers.workload: the one setting that shrinks the amounts of work, never the shapes."""

import pytest

from helpers import lora, workload
from helpers.workload import WORKLOADS, Workload


def test_the_full_workload_keeps_every_cells_own_size():
    full = workload.current({})
    assert full is WORKLOADS["full"] and not full.reduced
    assert [full.cap(amount, 8) for amount in ("eval_windows", "pricer_items", "training_steps",
                                               "calibration_sequences", "new_tokens", "timed_repeats")] == [8] * 6
    assert full.describe() == "full (each cell's own sizes)"


def test_the_small_workload_caps_each_amount_and_never_raises_one():
    small = workload.current({"COURSE_WORKLOAD": " Small "})
    assert small.reduced
    assert small.cap("eval_windows", 8) == 1 and small.cap("training_steps", 60) == 4 and small.cap("pricer_items", 1) == 1
    assert small.describe().startswith("small (at most: eval_windows 1, pricer_items 2, training_steps 4")


def test_the_module_functions_read_the_environment(monkeypatch):
    monkeypatch.setenv("COURSE_WORKLOAD", "small")
    assert (workload.windows(8), workload.items(100), workload.steps(60), workload.sequences(16),
            workload.new_tokens(20), workload.repeats(2)) == (1, 2, 4, 2, 4, 1)
    monkeypatch.delenv("COURSE_WORKLOAD")
    assert (workload.windows(8), workload.items(100), workload.steps(60)) == (8, 100, 60)


def test_first_keeps_a_prefix(monkeypatch):
    monkeypatch.setenv("COURSE_WORKLOAD", "small")
    assert workload.first(list(range(10)), "pricer_items") == [0, 1] and workload.first([], "pricer_items") == []
    monkeypatch.setenv("COURSE_WORKLOAD", "full")
    assert workload.first(list(range(10)), "pricer_items") == list(range(10))


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match=r"COURSE_WORKLOAD='tiny' is not a workload: choose one of full, small"):
        workload.current({"COURSE_WORKLOAD": "tiny"})
    with pytest.raises(ValueError, match="no amount of work called 'layers'"):
        WORKLOADS["small"].cap("layers", 3)
    with pytest.raises(ValueError, match="must be a positive int"):
        WORKLOADS["small"].cap("eval_windows", 0)
    with pytest.raises(ValueError, match="training_steps must be a positive int or None"):
        Workload("odd", training_steps=0)


def test_a_shortened_training_run_keeps_its_rate_and_says_why():
    import torch

    settings = lora.training_settings("llama-3.2-3b", torch.float16, on_gpu=True)
    assert settings.with_steps(settings.steps) is settings
    short = settings.with_steps(4)
    assert (short.steps, short.warmup_steps, short.learning_rate, short.batch_size) == (4, 0, 2e-4, 4)
    assert short.reasons[-1] == "4 steps instead of 60: a small workload (helpers.workload)"
    with pytest.raises(ValueError, match="steps must be a positive int"):
        settings.with_steps(0)
