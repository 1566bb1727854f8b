"""How a lesson ends (issue 21, item 5): takeaways in words, further reading with links, and one line on what is next.

The check applies to every notebook that has a Takeaways section, so a notebook joins it when it gets one.
"""

import re

import nbformat
import pytest

from helpers import runner

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"`*])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_of(path):
    return [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"]


def section(markdown: list[str], heading: str) -> str | None:
    """The text under ``## heading`` up to the next heading of any level, or None."""
    text = "\n\n".join(markdown)
    found = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^#|\Z)", text, flags=re.M | re.S)
    return found.group(1).strip() if found else None


WITH_TAKEAWAYS = [path for path in runner.course_notebooks() if section(markdown_of(path), "Takeaways") is not None]


def test_the_lessons_that_end_properly_include_01_02_and_05():
    assert {"01_full_precision.ipynb", "02_int8.ipynb", "05_weight_packing.ipynb"} <= {p.name for p in WITH_TAKEAWAYS}


@pytest.mark.parametrize("path", WITH_TAKEAWAYS, ids=lambda p: p.name)
def test_takeaways_are_three_to_six_sentences_of_words(path):
    takeaways = section(markdown_of(path), "Takeaways")
    sentences = [s for s in SENTENCE_END.split(takeaways) if s.strip()]
    assert 3 <= len(sentences) <= 6, sentences
    assert "✓" not in takeaways and "```" not in takeaways


@pytest.mark.parametrize("path", WITH_TAKEAWAYS, ids=lambda p: p.name)
def test_further_reading_links_papers_or_docs_and_the_glossary(path):
    reading = section(markdown_of(path), "Further reading")
    assert reading is not None, "a lesson with takeaways has a Further reading section"
    links = LINK.findall(reading)
    assert "GLOSSARY.md" in links
    assert sum(link.startswith("https://") for link in links) >= 3, links


@pytest.mark.parametrize("path", WITH_TAKEAWAYS, ids=lambda p: p.name)
def test_the_last_cell_says_what_is_next(path):
    last = markdown_of(path)[-1]
    nexts = re.findall(r"\*\*Next:\*\* `(\d\d[a-z]?_\w+\.ipynb)`", last)
    names = [p.name for p in runner.course_notebooks()]
    if path.name == names[-1]:  # the last notebook has no next one: its **Next:** line points back to the README
        assert not nexts and re.search(r"^\*\*Next:\*\* .*\]\(\.\./README\.md\)", last, flags=re.M), last
        return
    assert len(nexts) == 1 and nexts[0] in names and names.index(nexts[0]) == names.index(path.name) + 1
