"""Execute the course notebooks top to bottom, and summarize what each measured.

``python -m helpers.runner run``      executes every notebook into build/ (the committed ones stay untouched)
``python -m helpers.runner refresh``  re-executes the committed notebooks in place (new reference outputs)

A notebook marks the code cell whose output summarizes it with the cell tag ``summary``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = REPO_ROOT / "build"
SUMMARY_TAG = "summary"


def course_notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute(notebook_path: Path, output_path: Path, timeout: int = 1800):
    """Run one notebook in a fresh kernel, from its own folder, and write the executed copy."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(notebook_path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook_path.parent)}})
    client.execute()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, output_path)
    return notebook


def summary_of(notebook) -> str:
    """The text printed by the cell tagged ``summary`` (empty if the notebook has none)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout")
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course notebooks top to bottom.")
    parser.add_argument("mode", choices=["run", "refresh"], help="run: into build/; refresh: in place")
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = [NOTEBOOK_DIR / name for name in args.notebooks] if args.notebooks else course_notebooks()
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    failures = 0
    for path in chosen:
        target = path if args.mode == "refresh" else BUILD_DIR / path.name
        started = time.time()
        print(f"=== {path.name} ", flush=True)
        try:
            notebook = execute(path, target)
        except Exception as error:  # report every notebook, then fail
            failures += 1
            print(f"FAILED after {time.time() - started:.0f} s: {type(error).__name__}: {str(error)[-2000:]}")
            continue
        print(summary_of(notebook).rstrip() or "(no summary cell)")
        print(f"--- executed in {time.time() - started:.0f} s -> {target.relative_to(REPO_ROOT)}\n", flush=True)
    print(f"{len(chosen) - failures} notebooks executed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
