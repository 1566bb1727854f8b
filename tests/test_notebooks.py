"""The committed notebooks: executed top to bottom, no secrets, Colab-ready, few ignored cells, no noise."""

import re
from pathlib import Path

import nbformat
import pytest

from helpers import colab, runner

NOTEBOOKS = runner.course_notebooks()
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
IGNORE_MARKERS = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP")


def read(path: Path):
    return nbformat.read(path, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


MODEL_NOTEBOOKS = [path for path in NOTEBOOKS if colab.needs_model(path.name)]
"""The notebooks that load a model: every one but the basics lesson (``colab.MODEL_FREE_NOTEBOOKS``)."""


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:2] == ["00_quantization_basics.ipynb", "01_full_precision.ipynb"]
    assert set(colab.MODEL_FREE_NOTEBOOKS) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_top_to_bottom_with_counts_1_to_n(path):
    cells = code_cells(read(path))
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_hub_token_anywhere(path):
    assert not TOKEN_PATTERN.search(path.read_text(encoding="utf-8"))


COLAB_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^\s)]+")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_badge_and_setup_point_at_the_repository(path):
    """Badge and clone agree with helpers/colab.py, the one place that names the repository and branch."""
    notebook = read(path)
    assert notebook.cells[0].cell_type == "markdown"
    assert COLAB_BADGE.findall(notebook.cells[0].source) == [colab.colab_badge_url(path.name)]
    setup = code_cells(notebook)[0].source
    assert f'REPOSITORY_URL = "{colab.REPOSITORY_URL}"' in setup
    if colab.needs_model(path.name):
        assert "course.start(ROOT, PROFILE" in setup  # which installs on Colab (helpers.course.start)
        assert notebook.metadata.get("accelerator") == "GPU"
    else:  # Colab already has all it imports, and a lesson without a model needs no GPU
        assert "course.start_lesson()" in setup and "accelerator" not in notebook.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_is_exactly_the_one_helpers_colab_writes(path):
    setup = code_cells(read(path))[0].source
    if "REPOSITORY_BRANCH" not in setup:
        pytest.xfail("this notebook still has the setup cell from before helpers.colab; paste "
                     "`python -m helpers.colab setup-cell` into it (or run `make set-repository`)")
    assert setup == colab.setup_cell_source(notebook_name=path.name)


def test_readme_badges_point_at_the_repository():
    readme = (runner.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert COLAB_BADGE.findall(readme) == [colab.colab_badge_url(path.name) for path in NOTEBOOKS]


@pytest.mark.parametrize("path", MODEL_NOTEBOOKS, ids=lambda p: p.name)
def test_the_profile_parameter_is_the_first_line_of_the_setup_cell(path):
    cells = code_cells(read(path))
    assert cells[0].source.startswith("PROFILE = None  #")
    assert not any("PROFILE = " in cell.source or "choose_profile(" in cell.source for cell in cells[1:])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_setup_cell_with_at_most_three_lines_then_the_lesson(path):
    """Issue 21: one setup cell, at most 3 lines of output, and the next markdown cell opens section 1."""
    notebook = read(path)
    setup = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    text = "".join(output.get("text", "") for output in notebook.cells[setup].outputs)
    assert len(text.splitlines()) <= 3, text
    assert not any(marker in notebook.cells[setup].source for marker in IGNORE_MARKERS)  # compared, but one line
    assert notebook.cells[setup + 1].cell_type == "markdown" and notebook.cells[setup + 1].source.startswith("## 1.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_at_most_a_fifth_of_cells_ignored_and_each_says_why(path):
    cells = code_cells(read(path))
    ignored = [cell for cell in cells if cell.source.startswith(IGNORE_MARKERS)]
    assert len(ignored) <= 0.2 * len(cells), f"{len(ignored)} of {len(cells)} code cells are ignored"
    for cell in ignored:
        second_line = cell.source.splitlines()[1] if len(cell.source.splitlines()) > 1 else ""
        assert second_line.startswith("# ("), f"an ignored cell must say why on its second line: {cell.source[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stderr_and_no_errors_in_committed_outputs(path):
    for cell in code_cells(read(path)):
        for output in cell.outputs:
            assert output.output_type != "error", f"error output in {cell.source[:60]!r}"
            assert output.get("name") != "stderr", f"stderr in {cell.source[:60]!r}: {output.get('text', '')[:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_a_summary_cell_and_releases_memory(path):
    cells = code_cells(read(path))
    assert any(runner.SUMMARY_TAG in cell.metadata.get("tags", []) for cell in cells)
    if colab.needs_model(path.name):
        assert any("memory.release(" in cell.source for cell in cells)
    else:
        assert not any("load_model(" in cell.source or "from_pretrained(" in cell.source for cell in cells)


@pytest.mark.parametrize("path", MODEL_NOTEBOOKS, ids=lambda p: p.name)
def test_memory_plan_printed_before_the_first_model_load(path):
    sources = [cell.source for cell in code_cells(read(path))]
    plan_at = next(i for i, s in enumerate(sources) if f'check_memory_before_loading("{path.stem}"' in s)
    load_at = next(i for i, s in enumerate(sources) if "load_model(" in s)
    assert plan_at <= load_at
    assert sources[plan_at].index("check_memory_before_loading") < sources[load_at].index("load_model(") \
        or plan_at < load_at
    plan_output = "".join(o.get("text", "") for o in code_cells(read(path))[plan_at].outputs)
    assert f"Memory plan for {path.stem}" in plan_output and "fits this machine: True" in plan_output


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_random_data_follows_the_device_of_what_it_meets(path):
    # On a GPU profile the model lives on cuda:0: data made on the CPU and fed to it raises "Expected all tensors to
    # be on the same device". Random inputs are drawn portably (the same on every CPU) and moved in the same line.
    for cell in code_cells(read(path)):
        for line in cell.source.splitlines():
            if "portable_randn(" in line:
                assert ".to(" in line, f"random data not moved to a device: {line.strip()!r}"
            assert "torch.randn(" not in line or cell.source.startswith(IGNORE_MARKERS), (
                f"torch.randn draws other numbers under another CPU instruction set; use "
                f"environment.portable_randn in compared cells: {line.strip()!r}")


def test_a_deep_dive_sorts_right_after_the_lesson_it_deepens_and_has_its_own_key(tmp_path, monkeypatch):
    for name in ("04_lora.ipynb", "03a_deep_dive_x.ipynb", "03_nf4.ipynb", "notes.ipynb", "3_bad.ipynb"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", tmp_path)
    assert [p.name for p in runner.course_notebooks()] == ["03_nf4.ipynb", "03a_deep_dive_x.ipynb", "04_lora.ipynb"]
    assert [runner.notebook_key(p) for p in runner.course_notebooks()] == ["03", "03a", "04"]
    with pytest.raises(ValueError, match="not a course notebook name"):
        runner.notebook_key("notes.ipynb")
