"""Point the course at another repository or branch: what a fork runs once before publishing.

``python -m helpers.repository --url https://github.com/OWNER/NAME --branch BRANCH`` (``make set-repository
URL=... BRANCH=...``) rewrites the two constants of ``helpers/colab.py``, every notebook's Colab badge and first code
cell (``colab.setup_cell_source``), and the README's badges. Without arguments it re-applies the current constants
(after editing them by hand). Only sources change: committed outputs stay, and strict nbval does not compare sources.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from helpers import colab

REPO_ROOT = Path(__file__).resolve().parents[1]
BADGE_PREFIX = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"']+?/blob/[^\s)\"']+?/notebooks/")


def rewrite_constants(colab_source: str, url: str, branch: str) -> str:
    """helpers/colab.py's text with REPOSITORY_URL and REPOSITORY_BRANCH set (pure)."""
    colab.check_repository(url, branch)
    for name, value in (("REPOSITORY_URL", url), ("REPOSITORY_BRANCH", branch)):  # not the template's "{url}" lines
        colab_source, count = re.subn(rf'^{name} = "[^"{{}}\n]*"$', f'{name} = "{value}"', colab_source,
                                      flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"expected one line `{name} = \"...\"` in helpers/colab.py, found {count}")
    return colab_source


def rewrite_badges(text: str, url: str, branch: str) -> str:
    """Every Colab badge target in a text pointed at this repository and branch (pure)."""
    prefix = colab.colab_badge_url("", url, branch)
    return BADGE_PREFIX.sub(lambda _: prefix, text)


def rewrite_notebook(path: Path, url: str, branch: str) -> bool:
    """Point one notebook's badge and setup cell at the repository; True when the file changed."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    setup = next((cell for cell in notebook.cells if cell.cell_type == "code"), None)
    if setup is None or "REPOSITORY_URL = " not in setup.source:
        raise ValueError(f"{path.name}: the first code cell is not the setup cell (no REPOSITORY_URL line)")
    before = [cell.source for cell in notebook.cells]
    notebook.cells[0].source = rewrite_badges(notebook.cells[0].source, url, branch)
    setup.source = colab.setup_cell_source(url, branch, notebook_name=path.name)
    if [cell.source for cell in notebook.cells] == before:
        return False
    nbformat.write(notebook, path)
    return True


def set_repository(root: Path, url: str, branch: str) -> list[Path]:
    """Rewrite helpers/colab.py, the notebooks and README.md under ``root``; returns the files that changed."""
    colab.check_repository(url, branch)  # before any file is touched
    changed = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]*_*.ipynb")):
        if rewrite_notebook(path, url, branch):
            changed.append(path)
    for path, rewrite in ((root / "helpers" / "colab.py", rewrite_constants), (root / "README.md", rewrite_badges)):
        text = path.read_text(encoding="utf-8")
        new_text = rewrite(text, url, branch)
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Point the Colab badges and setup cells at a repository.")
    parser.add_argument("--url", default=colab.REPOSITORY_URL, help="https://github.com/OWNER/NAME")
    parser.add_argument("--branch", default=colab.REPOSITORY_BRANCH, help="the branch Colab opens and clones")
    args = parser.parse_args(argv)
    try:
        changed = set_repository(REPO_ROOT, args.url, args.branch)
    except ValueError as error:
        parser.error(str(error))
    print(f"repository {args.url}, branch {args.branch}: "
          + (", ".join(str(path.relative_to(REPO_ROOT)) for path in changed) or "everything already agreed"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
