"""The GPU lanes' execution, checked on small notebooks without a GPU: one execution per notebook, a kept copy with
the error in it, nbval-lax's verdict, per-notebook time limits and the one-screen summary."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from helpers import runner


def write_notebook(path: Path, *sources: str, tags: dict[int, list[str]] | None = None) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# a test notebook")]
    for index, source in enumerate(sources):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = (tags or {}).get(index, [])
        notebook.cells.append(cell)
    nbformat.write(notebook, path)
    return path


def counting_cell(counter: Path) -> str:
    """A cell that appends the kernel's COURSE_PROFILE to a file: one line per execution."""
    return (f"import os\nwith open({str(counter)!r}, 'a') as f:\n"
            "    f.write(os.environ.get('COURSE_PROFILE', '-') + '\\n')")


def test_execute_keeps_a_failed_copy_with_the_error_in_the_failing_cell(tmp_path):
    source = write_notebook(tmp_path / "broken.ipynb", "print('one')", "1 / 0", "print('never')")
    with pytest.raises(CellExecutionError):
        runner.execute(source, tmp_path / "out" / "broken.ipynb", timeout=60)
    copy = nbformat.read(tmp_path / "out" / "broken.ipynb", as_version=4)
    outputs = [[o.output_type for o in cell.outputs] for cell in copy.cells[1:]]
    assert outputs == [["stream"], ["error"], []]
    assert runner.lax_problem(nbformat.read(source, as_version=4), copy) == \
        "code cell 2: ZeroDivisionError: division by zero"


def test_a_notebook_over_its_time_limit_stops_and_its_copy_says_so(tmp_path):
    source = write_notebook(tmp_path / "slow.ipynb", "x = 1", "import time\ntime.sleep(60)", "print('never')")
    result = runner.check_notebook(source, tmp_path / "out" / "slow.ipynb", kernel_env=None, timeout=3)
    assert result.seconds < 30
    assert result.problem == "code cell 2: CellTimeoutError: the notebook ran past its 3 s limit"
    copy = nbformat.read(tmp_path / "out" / "slow.ipynb", as_version=4)
    assert copy.cells[2].outputs[-1].ename == "CellTimeoutError" and copy.cells[3].outputs == []


def test_lax_markers_skip_allow_and_compare_like_nbval(tmp_path):
    source = write_notebook(
        tmp_path / "marked.ipynb",
        "# NBVAL_SKIP\nraise SystemExit('skipped by nbval, so never run')",
        "# NBVAL_RAISES_EXCEPTION\nraise ValueError('expected')",
        "print('same')",
        "print('changed')",
        tags={2: ["nbval-check-output"], 3: ["nbval-check-output"]},
    )
    reference = nbformat.read(source, as_version=4)
    reference.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="same\n")]
    reference.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="committed\n")]
    nbformat.write(reference, source)
    result = runner.check_notebook(source, tmp_path / "out" / "marked.ipynb", kernel_env=None, timeout=60)
    assert result.problem == "code cell 4: output differs from the committed one (NBVAL_CHECK_OUTPUT)"
    copy = nbformat.read(tmp_path / "out" / "marked.ipynb", as_version=4)
    assert copy.cells[1].outputs == [] and copy.cells[2].outputs[0].ename == "ValueError"


def test_each_notebook_runs_once_with_the_lane_environment_and_every_copy_is_kept(tmp_path, capsys):
    counter = tmp_path / "executions.txt"
    good = write_notebook(tmp_path / "01_good.ipynb", counting_cell(counter), "print('fine')")
    bad = write_notebook(tmp_path / "02_bad.ipynb", counting_cell(counter), "raise RuntimeError('CUDA error: boom')")
    env = {**os.environ, "COURSE_PROFILE": "tiny"}
    results = runner.run_notebooks([good, bad], tmp_path / "copies", env, timeout=60)
    assert counter.read_text() == "tiny\ntiny\n"  # one execution each, in the lane's environment
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == ["01_good.ipynb", "02_bad.ipynb"]
    assert [(r.name, r.problem) for r in results] == [
        ("01_good", None), ("02_bad", "code cell 2: RuntimeError: CUDA error: boom")]
    assert "=== 02_bad.ipynb\nFAILED: code cell 2: RuntimeError: CUDA error: boom" in capsys.readouterr().out


def test_lane_summary_is_one_line_per_notebook_with_the_first_error():
    results = [runner.NotebookResult("01_full_precision", 41.2),
               runner.NotebookResult("02_int8", 12.0, "code cell 9: RuntimeError: " + "x" * 200)]
    summary = runner.lane_summary("gpu-smoke", "tiny", results, runner.BUILD_DIR / "gpu-smoke")
    assert summary.splitlines() == [
        "gpu-smoke on profile tiny: 1 of 2 notebooks passed in 0.9 min; executed copies in build/gpu-smoke/",
        "  passed  01_full_precision         41 s",
        "  FAILED  02_int8                   12 s  code cell 9: RuntimeError: " + "x" * 70 + "...",
    ]


@pytest.mark.parametrize("cuda,build,expected", [
    (True, "12.4", None),
    (False, None, "needs a CUDA GPU, and this torch is a CPU-only build"),
    (False, "12.4", "needs a CUDA GPU, and torch (built for CUDA 12.4) sees no CUDA device"),
])
def test_smoke_refusal(cuda, build, expected):
    refusal = runner.smoke_refusal(cuda, build)
    assert refusal is None if expected is None else (expected in refusal and "`make test`" in refusal)


def test_nbval_markers_from_comments_and_tags():
    cell = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\n# (why)\nx = 1  # NBVAL_SKIP is not a marker here")
    cell.metadata["tags"] = ["nbval-check-output", "summary"]
    assert runner.nbval_markers(cell) == {"NBVAL_IGNORE_OUTPUT", "NBVAL_CHECK_OUTPUT"}


def test_gpu_setup_keeps_the_torch_family():
    pins = {"torch": "2.13.0", "torchvision": "0.28.0", "numpy": "2.4.6", "peft": "0.21.2"}
    assert runner.gpu_setup_pins(pins) == {"numpy": "2.4.6", "peft": "0.21.2"}


@pytest.mark.parametrize("kernel_python,refused", [("python", False), ("python3", False),
                                                   ("/opt/venv/bin/python", False), ("/usr/bin/python3", True)])
def test_the_kernel_must_run_the_lanes_python(kernel_python, refused):
    refusal = runner.kernel_refusal(kernel_python, "/opt/venv/bin/python")
    assert (refusal is not None) == refused
    if refused:
        assert refusal.startswith("the Jupyter kernel `python3` runs /usr/bin/python3, not this Python")


def test_run_executes_two_notebooks_at_a_time_where_there_are_two_cores():
    assert [runner.default_jobs(n) for n in (None, 1, 2, 16)] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        runner.execute_all([], in_place=False, jobs=0)


def test_execute_all_runs_notebooks_side_by_side_and_reports_in_order(tmp_path, capsys):
    paths = []
    for index in (1, 2):
        notebook = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell(f"print('summary {index}')")
        cell.metadata["tags"] = [runner.SUMMARY_TAG]
        notebook.cells = [cell]
        paths.append(tmp_path / f"0{index}_tiny.ipynb")
        nbformat.write(notebook, paths[-1])
    assert runner.execute_all(paths, in_place=True, jobs=2) == 0
    out = capsys.readouterr().out
    assert out.index("=== 01_tiny.ipynb\nsummary 1") < out.index("=== 02_tiny.ipynb\nsummary 2")
    assert "2 notebooks executed, 0 failed" in out and "(2 at a time, " in out
    assert nbformat.read(paths[1], as_version=4).cells[0].outputs[0]["text"] == "summary 2\n"


def test_kernels_side_by_side_share_the_pinned_threads():
    assert [runner.kernel_threads(jobs, 2) for jobs in (1, 2, 3)] == [2, 1, 1]
    assert runner.kernel_threads(2, 8) == 4
    with pytest.raises(ValueError, match="at least 1"):
        runner.kernel_threads(0, 2)
