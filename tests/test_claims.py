"""helpers.claims: a claim prints with its mark when true and raises when false."""

import numpy as np
import pytest
import torch

from helpers import claims


def test_true_claim_prints_with_mark_and_returns_nothing(capsys):
    assert claims.check("estimate == measured", 3 == 3) is None  # no Out[] line when a cell ends with a check
    assert capsys.readouterr().out == "✓ estimate == measured: True\n"


@pytest.mark.parametrize("holds", [np.bool_(True), torch.tensor(True), torch.tensor([True])])
def test_numpy_and_torch_booleans_are_accepted(holds, capsys):
    claims.check("ok", holds)
    assert capsys.readouterr().out == "✓ ok: True\n"


def test_false_claim_raises_with_the_claim_and_the_detail_and_prints_nothing(capsys):
    with pytest.raises(claims.ClaimFailed, match=r"'bytes equal'.*measured 7 vs 8"):
        claims.check("bytes equal", False, detail="measured 7 vs 8.")
    assert capsys.readouterr().out == ""
    assert issubclass(claims.ClaimFailed, AssertionError)  # a failing cell reads like a failed assert


@pytest.mark.parametrize("holds", [1, 0.0, "True", None, torch.tensor([True, True]), torch.tensor(1.0)])
def test_non_boolean_values_are_refused(holds):
    with pytest.raises(TypeError, match="needs a bool"):
        claims.check("claim", holds)


@pytest.mark.parametrize("claim", ["", "   ", "two\nlines", 3])
def test_bad_claim_text_is_refused(claim):
    with pytest.raises(ValueError):
        claims.check(claim, True)


def test_check_all_stops_at_the_first_false_claim(capsys):
    with pytest.raises(claims.ClaimFailed, match="'second'"):
        claims.check_all({"first": True, "second": False, "third": True})
    assert capsys.readouterr().out == "✓ first: True\n"
    with pytest.raises(ValueError):
        claims.check_all({})


# ------------------------------------------------------------------- every printed True/False in a notebook is checked

import re  # noqa: E402

import nbformat  # noqa: E402

from helpers import runner  # noqa: E402

BOOLEAN_WORD = re.compile(r"\b(True|False)\b")
DESCRIPTIVE = {
    # facts about the setup, not claims about the notebook's numbers: they may be True or False
    "settings of a config": re.compile(r"^\s*(load_in_\w+|bnb_4bit_\w+|llm_int8_\w+):?\s"),
    "module reprs": re.compile(r"\((in_features|p)=.*(bias|inplace)=(True|False)\)"),
    "where the notebook runs": re.compile(r"colab: (True|False)\s+hub offline: (True|False)"),
    "tied or not": re.compile(r"^tied \(one shared matrix\): (True|False)$"),
    "hardware facts": re.compile(r"native bfloat16 (True|False) ->"),
    "storage facts": re.compile(r"double quantization\s+(True|False)|\(nested\): (True|False)|nested (True|False)"),
    "model modes": re.compile(r"^(inference_mode|gradient checkpointing on): (True|False)$|^dropout active: (True|False);"),
    "greedy continuations may part": re.compile(r"\(same: (True|False)\)$"),
    # printed by helpers.memory.check_memory_plan, which raises when the plan does not fit
    "memory plan": re.compile(r"^Memory plan for .*fits this machine: True$"),
}


def unchecked_boolean_lines(notebook) -> list[str]:
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            for line in str(text).splitlines():
                if not BOOLEAN_WORD.search(line) or line.lstrip().startswith(claims.CHECK_MARK + " "):
                    continue
                if not any(pattern.search(line) for pattern in DESCRIPTIVE.values()):
                    found.append(f"cell {index}: {line.strip()}")
    return found


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_every_printed_true_or_false_is_a_checked_claim_or_a_described_fact(path):
    assert unchecked_boolean_lines(nbformat.read(path, as_version=4)) == []


def test_the_walk_finds_an_unchecked_claim():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("print(...)", outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="✓ checked: True\nbytes equal: True\ntied (one shared matrix): False\n")])]
    assert unchecked_boolean_lines(notebook) == ["cell 0: bytes equal: True"]


def test_every_check_mark_line_says_true():
    for path in runner.course_notebooks():
        for cell in nbformat.read(path, as_version=4).cells:
            for output in cell.get("outputs", []):
                for line in str(output.get("text", "")).splitlines():
                    assert not line.startswith(claims.CHECK_MARK) or line.endswith(": True"), (path.name, line)
