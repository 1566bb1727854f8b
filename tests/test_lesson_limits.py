"""Issue 21: every notebook, optional deep dives included, is a lesson of about 45 minutes.

Proxy limits: at most 3,000 words of markdown and 30 code cells, at least three exercises, and an ending
(tests/test_lesson_ends.py checks the ending's parts).
"""

import re

import nbformat
import pytest

from helpers import runner

MAX_MARKDOWN_WORDS = 3000
MAX_CODE_CELLS = 30
MIN_EXERCISES = 3
EXERCISE_CALL = re.compile(r'exercises\.check\("(\d\d[a-z]?\.\d+)"')


def lesson_size(path) -> tuple[int, int, int]:
    """(markdown words, code cells, exercises) of a notebook."""
    cells = nbformat.read(path, as_version=4).cells
    words = sum(len(cell.source.split()) for cell in cells if cell.cell_type == "markdown")
    code = [cell for cell in cells if cell.cell_type == "code"]
    return words, len(code), sum(len(EXERCISE_CALL.findall(cell.source)) for cell in code)


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_a_notebook_is_a_lesson_of_about_45_minutes(path):
    words, code_cells, exercises = lesson_size(path)
    assert words <= MAX_MARKDOWN_WORDS, f"{words} words of markdown: say each thing once, or move expert material out"
    assert code_cells <= MAX_CODE_CELLS, f"{code_cells} code cells: merge small ones, or split the notebook"
    assert exercises >= MIN_EXERCISES, f"{exercises} exercises: pose at least {MIN_EXERCISES} where concepts are fresh"


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_every_notebook_ends_as_a_lesson(path):
    """Takeaways, then Further reading (their content: tests/test_lesson_ends.py, which checks every notebook that has
    a Takeaways section; this makes that every notebook)."""
    headings = [line for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    assert "## Takeaways" in headings and "## Further reading" in headings, headings[-4:]
    assert headings.index("## Takeaways") < headings.index("## Further reading")


def test_deep_dives_say_they_are_optional():
    for path in runner.course_notebooks():
        if runner.notebook_key(path)[-1].isalpha():
            title = nbformat.read(path, as_version=4).cells[0].source
            assert "Deep dive (optional)" in title, path.name


@pytest.mark.parametrize("path", runner.course_notebooks(), ids=lambda p: p.name)
def test_sections_are_numbered_in_order(path):
    """"## 0. Setup", "## 1. ...", ... with no number skipped or repeated: prose that says "section 5" can be trusted."""
    numbers = [int(m.group(1)) for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"
               for m in re.finditer(r"^## (\d+)\. ", cell.source, re.M)]
    assert numbers == list(range(len(numbers))), numbers
