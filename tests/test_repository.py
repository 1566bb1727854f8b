"""`make set-repository`: a fork points badges, setup cells and helpers/colab.py at itself, on a copy of the course."""

import shutil
from pathlib import Path

import nbformat
import pytest

from helpers import colab, repository, runner

REPO_ROOT = Path(__file__).resolve().parents[1]
FORK_URL, FORK_BRANCH = "https://github.com/someone/course-fork", "spring-2027"


@pytest.fixture()
def course_copy(tmp_path):
    (tmp_path / "helpers").mkdir()
    shutil.copy(REPO_ROOT / "helpers" / "colab.py", tmp_path / "helpers" / "colab.py")
    shutil.copy(REPO_ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO_ROOT / "notebooks", tmp_path / "notebooks")
    return tmp_path


def test_rewrite_constants_changes_exactly_the_two_lines():
    source = 'x = 1\nREPOSITORY_URL = "https://github.com/a/b"\n"""doc"""\nREPOSITORY_BRANCH = "main"\n'
    assert repository.rewrite_constants(source, FORK_URL, FORK_BRANCH) == (
        f'x = 1\nREPOSITORY_URL = "{FORK_URL}"\n"""doc"""\nREPOSITORY_BRANCH = "{FORK_BRANCH}"\n')
    with pytest.raises(ValueError, match="expected one line `REPOSITORY_BRANCH"):
        repository.rewrite_constants('REPOSITORY_URL = "x"\n', FORK_URL, FORK_BRANCH)


def test_rewrite_badges_points_every_colab_badge_at_the_fork():
    text = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/old/repo/blob/main/notebooks/03_nf4.ipynb) and "
            "(https://colab.research.google.com/github/old/repo/blob/feature/x/notebooks/05_weight_packing.ipynb)")
    assert repository.rewrite_badges(text, FORK_URL, FORK_BRANCH) == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab.colab_badge_url('03_nf4.ipynb', FORK_URL, FORK_BRANCH)}) and "
        f"({colab.colab_badge_url('05_weight_packing.ipynb', FORK_URL, FORK_BRANCH)})")


def test_set_repository_rewrites_badges_setup_cells_and_constants_only(course_copy):
    originals = {path.name: nbformat.read(path, as_version=4) for path in (course_copy / "notebooks").glob("*.ipynb")}
    changed = repository.set_repository(course_copy, FORK_URL, FORK_BRANCH)
    notebooks = sorted(course_copy / "notebooks" / path.name for path in runner.course_notebooks())
    assert changed == [*notebooks, course_copy / "helpers" / "colab.py", course_copy / "README.md"]
    for path in notebooks:
        before, after = originals[path.name], nbformat.read(path, as_version=4)
        setup_index = next(i for i, cell in enumerate(after.cells) if cell.cell_type == "code")
        assert after.cells[setup_index].source == colab.setup_cell_source(FORK_URL, FORK_BRANCH, path.name)
        assert colab.colab_badge_url(path.name, FORK_URL, FORK_BRANCH) in after.cells[0].source
        assert "llm-quantization-course/llm-quantization-course" not in after.cells[0].source
        for index, (old, new) in enumerate(zip(before.cells, after.cells)):
            assert old.get("outputs") == new.get("outputs")  # outputs and counts stay: strict nbval still holds
            if index not in (0, setup_index):
                assert old.source == new.source
    constants = (course_copy / "helpers" / "colab.py").read_text().splitlines()
    assert f'REPOSITORY_URL = "{FORK_URL}"' in constants and f'REPOSITORY_BRANCH = "{FORK_BRANCH}"' in constants
    readme = (course_copy / "README.md").read_text()
    assert readme.count(f"github/someone/course-fork/blob/{FORK_BRANCH}/notebooks/") == len(notebooks)
    assert repository.set_repository(course_copy, FORK_URL, FORK_BRANCH) == []  # a second run changes nothing


def test_a_bad_address_changes_nothing(course_copy):
    with pytest.raises(ValueError, match="expected https://github.com/OWNER/NAME"):
        repository.set_repository(course_copy, "git@github.com:someone/fork.git", "main")
    assert (course_copy / "helpers" / "colab.py").read_text() == (REPO_ROOT / "helpers" / "colab.py").read_text()
