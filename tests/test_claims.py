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


def test_a_not_checked_claim_prints_why_and_verifies_nothing(capsys):
    claims.check_all({"beats the yardstick": claims.NotChecked("not measured on these items")})
    assert capsys.readouterr().out == "- not checked: beats the yardstick (not measured on these items)\n"
    with pytest.raises(TypeError, match="neither true nor false"):
        bool(claims.NotChecked("why"))  # never silently counted as a pass by all() or any()
    with pytest.raises(ValueError, match="one non-empty line"):
        claims.NotChecked(" ")


# ------------------------------------------------------------------- every printed True/False in a notebook is checked

import re  # noqa: E402

import nbformat  # noqa: E402

from helpers import runner  # noqa: E402

BOOLEAN_WORD = re.compile(r"\b(True|False)\b")
DESCRIPTIVE = {
    # values of a config object, printed as they are; each such cell also checks them against what was asked
    "settings of a config": re.compile(r"^\s*(load_in_\w+|bnb_4bit_\w+|llm_int8_\w+|use_rslora):?\s"),
    # bitsandbytes' quant state before and after its fused CPU kernel repacks it (03a, a CPU-dependent ignored cell)
    "fields of a quant state": re.compile(r"nested (True|False), absmax|repacked (True|False)"),
    # where the notebook runs (the versions cell): a fact about the machine, not about the lesson's numbers
    "where the notebook runs": re.compile(r"colab: (True|False)\s+hub offline: (True|False)"),
    # source code a notebook prints with inspect.getsource: a keyword argument, not a claim
    "keyword arguments in printed source": re.compile(r"\(.*\b\w+=(True|False)\)"),
    # PyTorch's module reprs (the cells check that no Linear has a bias)
    "module reprs": re.compile(r"\((in_features|p)=.*(bias|inplace)=(True|False)\)"),
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
        "stream", name="stdout", text="✓ checked: True\nbytes equal: True\n  load_in_4bit: True\n")])]
    assert unchecked_boolean_lines(notebook) == ["cell 0: bytes equal: True"]


def test_every_check_mark_line_says_true():
    for path in runner.course_notebooks():
        for cell in nbformat.read(path, as_version=4).cells:
            for output in cell.get("outputs", []):
                for line in str(output.get("text", "")).splitlines():
                    assert not line.startswith(claims.CHECK_MARK) or line.endswith(": True"), (path.name, line)


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_every_cell_that_prints_true_or_false_checks_something(path):
    enforcing = re.compile(r"claims\.check|claims\.observe|\bassert\b|\braise\b|check_memory_before_loading")
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "code":
            continue
        text = "".join(str(o.get("text") or o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))
        text = "\n".join(line for line in DESCRIPTIVE["where the notebook runs"].sub("", text).splitlines()
                          if not any(pattern.search(line) for pattern in DESCRIPTIVE.values()))
        assert not BOOLEAN_WORD.search(text) or enforcing.search(cell.source), f"cell {index} prints a bare boolean"


def test_an_observation_is_checked_like_a_law_outside_the_rehearsal(capsys, monkeypatch):
    monkeypatch.delenv(claims.RANDOM_WEIGHTS_ENV_VAR, raising=False)
    claims.observe("the adapter beats its base", True)
    assert capsys.readouterr().out == "✓ the adapter beats its base: True\n"
    with pytest.raises(claims.ClaimFailed, match="beats its base"):
        claims.observe("the adapter beats its base", False)
    with pytest.raises(ValueError, match="at least one claim"):
        claims.observe_all({})


def test_in_the_rehearsal_an_observation_says_it_was_not_checked_and_a_law_still_raises(capsys, monkeypatch):
    monkeypatch.setenv(claims.RANDOM_WEIGHTS_ENV_VAR, "t4")
    claims.observe_all({"perplexity within 2%": False, "agreement above 98%": True})
    assert capsys.readouterr().out == ("- not checked: perplexity within 2% (random weights)\n"
                                       "- not checked: agreement above 98% (random weights)\n")
    with pytest.raises(claims.ClaimFailed):
        claims.check("estimate == measured", False)  # a law holds for any weights
