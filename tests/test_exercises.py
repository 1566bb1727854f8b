"""The exercise machinery: every checker accepts its worked solution, rejects a typical wrong answer with a hint that
does not give the answer away, greets an unattempted answer politely, and the committed notebooks are unattempted."""

import re

import nbformat
import pytest
import torch

from helpers import exercises, runner, solutions
from helpers.exercises import NOT_ATTEMPTED, NOT_YET, RIGHT


def _per_row_scales(weight, group_size, bits):  # forgot the groups
    return weight.abs().amax(dim=1) / (2 ** (bits - 1) - 1)


def _scales_over_128(weight, group_size, bits):  # divided by 2**(bits-1): absmax's largest code is one less
    return weight.reshape(weight.shape[0], -1, group_size).abs().amax(-1) / 2 ** (bits - 1)


def _groups_down_the_columns(weight, group_size, bits):
    return weight.t().reshape(-1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)


def _forgot_return(weight, group_size, bits):
    weight.reshape(weight.shape[0], -1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)


def _not_written_yet(weight, group_size, bits):
    raise NotImplementedError


WRONG = {  # exercise: [(a typical wrong answer, words its hint must contain)]
    "00.1": [(torch.finfo(torch.float16).eps, "spacing near 1.0"), (1.0, "1.something x 2**e"),
             (1000 * torch.finfo(torch.float16).eps, "powers of two")],
    "00.2": [((7, 0.5), "absmax"), ((8, 3.5 / 8), "n - 1 gaps"), ((9, 0.5), "count the different codes"),
             ((8, 0.4), "spread the whole range")],
    "00.3": [(_per_row_scales, "expected one per group"), (_scales_over_128, "2**(bits - 1) - 1"),
             (_groups_down_the_columns, "consecutive weights of one row"), (_forgot_return, "forget `return`"),
             (lambda w, g, b: w[:, ::g] * 0 + 1, "some scales differ")],
    "00.4": [(128, "try smaller groups"), (256, "try smaller groups"), (32, "try larger ones"),
             (8, "try larger ones"), (100, "try powers of two")],
}


def test_every_exercise_has_a_solution_and_typical_wrong_answers():
    assert set(exercises.EXERCISES) == set(solutions.KEYS) == set(WRONG)


@pytest.mark.parametrize("key", solutions.KEYS)
def test_the_solution_is_right(key, capsys):
    verdict = exercises.grade(key, solutions.answer(key))
    assert verdict.status == RIGHT, verdict.message
    exercises.check(key, solutions.answer(key))
    out, err = capsys.readouterr()
    assert out.startswith(f"✓ Exercise {key}: right. ") and err == ""


@pytest.mark.parametrize("key", solutions.KEYS)
def test_typical_wrong_answers_get_their_hint_and_never_the_answer(key, capsys):
    right = solutions.answer(key)
    revealing = [] if callable(right) else [str(v) for v in (right if isinstance(right, tuple) else (right,))]
    for answer, hint in WRONG[key]:
        verdict = exercises.grade(key, answer)
        assert verdict.status == NOT_YET and hint in verdict.message, (answer, verdict)
        for text in revealing:  # the right value never appears in a hint
            assert not re.search(rf"(?<![\d.]){re.escape(text)}(?![\d])", verdict.message), (text, verdict.message)
        exercises.check(key, answer)  # shown, not raised: the notebook goes on
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"✗ Exercise {key}, not yet: ")


@pytest.mark.parametrize("key", solutions.KEYS)
def test_unattempted_answers_get_a_polite_note(key, capsys):
    placeholders = [..., None] + ([_not_written_yet] if exercises.EXERCISES[key].kind == "function" else [])
    for placeholder in placeholders:
        assert exercises.grade(key, placeholder).status == NOT_ATTEMPTED
        exercises.check(key, placeholder)
        out, err = capsys.readouterr()
        assert out.startswith(f"Exercise {key} not attempted yet: replace the ") and out.endswith("again.\n")
        assert err == ""


def test_any_correct_way_is_accepted():
    assert exercises.grade("00.1", 2.0**-1).status == RIGHT
    assert exercises.grade("00.1", torch.tensor(0.5, dtype=torch.float16)).status == RIGHT
    assert exercises.grade("00.2", [8.0, 3.5 / 7]).status == RIGHT

    def with_view_and_max(weight, group_size, bits):  # another way: a 3-D view and max over its last dimension
        groups = weight.view(weight.shape[0], weight.shape[1] // group_size, group_size)
        return torch.max(groups.abs(), dim=2).values * (1.0 / (2 ** (bits - 1) - 1))

    def flat_list_of_scales(weight, group_size, bits):  # the right scales, flat
        return weight.reshape(-1, group_size).abs().amax(-1) / (2 ** (bits - 1) - 1)

    assert exercises.grade("00.3", with_view_and_max).status == RIGHT
    assert exercises.grade("00.3", flat_list_of_scales).status == RIGHT


def test_an_answer_of_the_wrong_kind_is_a_hint_not_a_crash():
    assert exercises.grade("00.1", "half").status == NOT_YET
    assert exercises.grade("00.2", 8).status == NOT_YET
    assert exercises.grade("00.3", 0.5).status == NOT_YET
    raised = exercises.grade("00.3", lambda w, g, b: 1 / 0)
    assert raised.status == NOT_YET and raised.message.startswith("running your answer raised ZeroDivisionError")
    with pytest.raises(KeyError, match="no exercise"):
        exercises.grade("99.9", 1)


def test_the_lesson_never_imports_the_solutions():
    for path in runner.course_notebooks():
        assert "solutions" not in "".join(cell.source for cell in nbformat.read(path, as_version=4).cells
                                          if cell.cell_type == "code"), path.name


def test_the_knob_exercise_measures_what_the_notebook_prints():
    error, clean = exercises.outlier_experiment(solutions.exercise_00_4())
    assert error <= clean
    assert exercises.outlier_experiment(2 * solutions.exercise_00_4())[0] > clean


def test_registering_twice_or_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        exercises.exercise("00.1", "predict", "again")(lambda answer: None)
    with pytest.raises(ValueError, match="kind must be one of"):
        exercises.exercise("x", "essay", "?")


EXERCISE_CALL = re.compile(r'exercises\.check\("(\d\d\.\d)"')


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_committed_notebooks_leave_every_exercise_unattempted(path):
    """A committed notebook shows the polite note for each exercise: no answer is given away in the lesson."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        keys = EXERCISE_CALL.findall(cell.source) if cell.cell_type == "code" else []
        for key in keys:
            assert key.startswith(path.name[:2]) and key in exercises.EXERCISES, key
            text = "".join(o.get("text", "") for o in cell.outputs)
            assert text == f"Exercise {key} not attempted yet: {exercises.grade(key, ...).message}.\n"
