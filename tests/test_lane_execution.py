"""The GPU lanes, checked on small notebooks without a GPU: the pytest --nbval-lax command line, nbval run with
helpers.nbval_keep (every cell once, every failing cell reported, an executed copy of every notebook with the error
in it, a junit report), the one-screen summary; and the runner's own execution for make run."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
from nbclient.exceptions import CellExecutionError

from helpers import nbval_keep, runner


def write_notebook(path: Path, *sources: str, tags: dict[int, list[str]] | None = None) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell("# a test notebook")]
    for index, source in enumerate(sources):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = (tags or {}).get(index, [])
        notebook.cells.append(cell)
    nbformat.write(notebook, path)
    return path


def counting_cell(counter: Path, label: str) -> str:
    """A cell that appends its label and the kernel's COURSE_PROFILE and HF_HUB_OFFLINE to a file: one line per run."""
    return (f"import os\nwith open({str(counter)!r}, 'a') as f:\n"
            f"    f.write({label!r} + ' ' + os.environ.get('COURSE_PROFILE', '-') + ' '"
            " + os.environ.get('HF_HUB_OFFLINE', '-') + '\\n')")


def code_cells(path: Path) -> list:
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_execute_keeps_a_failed_copy_with_the_error_in_the_failing_cell(tmp_path):
    source = write_notebook(tmp_path / "broken.ipynb", "print('one')", "1 / 0", "print('never')")
    with pytest.raises(CellExecutionError):
        runner.execute(source, tmp_path / "out" / "broken.ipynb", timeout=60)
    copy = nbformat.read(tmp_path / "out" / "broken.ipynb", as_version=4)
    outputs = [[o.output_type for o in cell.outputs] for cell in copy.cells[1:]]
    assert outputs == [["stream"], ["error"], []]
    assert copy.cells[2].outputs[0].ename == "ZeroDivisionError"


def test_the_lane_command_is_nbval_lax_with_the_plugin_a_junit_report_and_the_lane_environment():
    notebooks = runner.course_notebooks()[:2]
    environ = {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "1", "COURSE_PROFILE": "tiny"}
    argv, env = runner.gpu_lane_command("gpu-test", "llama-3.2-3b", notebooks, cell_timeout=3600,
                                        output_dir=runner.BUILD_DIR / "gpu", environ=environ, python="/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "pytest"]
    assert {"--nbval-lax", "--nbval-kernel-name=python3", "--nbval-cell-timeout=3600", "--color=no",
            "--continue-on-collection-errors", f"--nbval-keep={runner.BUILD_DIR / 'gpu'}",
            f"--junitxml={runner.BUILD_DIR / 'gpu' / 'junit.xml'}"} <= set(argv)
    assert argv[argv.index("helpers.nbval_keep") - 1] == "-p" and "--nbval" not in argv
    assert argv[argv.index("junit_family=xunit1") - 1] == "-o"  # xunit1 writes the nbval_error properties
    assert argv[-2:] == [f"notebooks/{path.name}" for path in notebooks]  # run from the repository root
    assert env == {"PATH": "/usr/bin", "HF_HUB_OFFLINE": "0", "COURSE_PROFILE": "llama-3.2-3b"}
    assert environ["HF_HUB_OFFLINE"] == "1"  # not modified
    smoke_argv, smoke_env = runner.gpu_lane_command("gpu-smoke", "tiny", notebooks, cell_timeout=240,
                                                    output_dir=runner.BUILD_DIR / "gpu-smoke", environ={})
    assert smoke_argv[0] == sys.executable and "--nbval-cell-timeout=240" in smoke_argv
    assert smoke_env == {"COURSE_PROFILE": "tiny", "HF_HUB_OFFLINE": "1"}
    with pytest.raises(ValueError, match="unknown GPU lane"):
        runner.gpu_lane_command("gpu-fast", "tiny", notebooks, cell_timeout=1, output_dir=Path("x"), environ={})
    with pytest.raises(ValueError, match="at least 1 s"):
        runner.gpu_lane_command("gpu-smoke", "tiny", notebooks, cell_timeout=0, output_dir=Path("x"), environ={})


def test_the_smoke_lane_runs_nbval_once_per_cell_reports_every_failing_cell_and_keeps_every_copy(
        tmp_path, monkeypatch, capfd):
    counter = tmp_path / "executions.txt"
    good = write_notebook(
        tmp_path / "01_good.ipynb",
        counting_cell(counter, "good-1"), "print('fine')\n6 * 7",
        "# NBVAL_SKIP\n" + counting_cell(counter, "skipped"), "# NBVAL_RAISES_EXCEPTION\nraise ValueError('expected')")
    bad = write_notebook(
        tmp_path / "02_bad.ipynb",
        counting_cell(counter, "bad-1"), counting_cell(counter, "bad-2") + "\nraise RuntimeError('CUDA error: boom')",
        counting_cell(counter, "bad-3") + "\nprint('after the error')", "print('changed')",
        tags={3: ["nbval-check-output"]})
    committed = nbformat.read(bad, as_version=4)
    committed.cells[4].execution_count = 4
    committed.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="committed\n")]
    nbformat.write(committed, bad)
    copies = tmp_path / "copies"
    copies.mkdir()
    (copies / "02_bad.ipynb").write_text("an older run's copy")
    monkeypatch.setitem(runner.GPU_LANE_DIRS, "gpu-smoke", copies)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a test GPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the smoke lane sets it to 1 for the kernels

    assert runner.run_gpu_lane("gpu-smoke", None, 60, [good, bad]) == 1

    # every cell ran once, in the lane's environment; the skipped one never; nbval went on after the error
    assert counter.read_text().splitlines() == ["good-1 tiny 1", "bad-1 tiny 1", "bad-2 tiny 1", "bad-3 tiny 1"]
    out = capfd.readouterr().out
    assert "02_bad.ipynb::Cell 1" in out and "02_bad.ipynb::Cell 3" in out  # both failing cells reported
    assert "gpu-smoke on profile tiny: 1 of 2 notebooks passed in " in out
    assert f"executed copies and junit.xml in {copies}/" in out
    assert "  FAILED  02_bad" in out and "Cell 1: RuntimeError: CUDA error: boom" in out
    assert "  passed  01_good" in out

    junit = ET.parse(copies / "junit.xml").getroot()
    # the class name is the notebook's path relative to pytest's root, dotted: it ends with the file's name
    failed = [(case.get("classname").rsplit("/", 1)[-1].endswith("02_bad.ipynb"), case.get("name"))
              for case in junit.iter("testcase") if case.find("failure") is not None]
    assert failed == [(True, "Cell 1"), (True, "Cell 3")]
    results = runner.junit_results(copies / "junit.xml", [good, bad])
    assert [(r.name, r.problem) for r in results] == [
        ("01_good", None), ("02_bad", "Cell 1: RuntimeError: CUDA error: boom")]

    good_cells, bad_cells = code_cells(copies / "01_good.ipynb"), code_cells(copies / "02_bad.ipynb")
    assert [cell.execution_count for cell in good_cells] == [1, 2, None, 3]
    assert [o.output_type for o in good_cells[1].outputs] == ["stream", "execute_result"]
    assert good_cells[1].outputs[1].data["text/plain"] == "42" and good_cells[2].outputs == []
    assert good_cells[3].outputs[0].ename == "ValueError"
    assert bad_cells[1].outputs[-1].ename == "RuntimeError" and bad_cells[1].outputs[-1].evalue == "CUDA error: boom"
    assert bad_cells[2].outputs[0].text == "after the error\n"
    assert [o.output_type for o in bad_cells[3].outputs] == ["stream", "error"]
    assert bad_cells[3].outputs[0].text == "changed\n"
    assert (bad_cells[3].outputs[1].ename, bad_cells[3].outputs[1].evalue) == ("nbval", "Cell outputs differ")
    for path in (copies / "01_good.ipynb", copies / "02_bad.ipynb"):
        nbformat.validate(nbformat.read(path, as_version=4))


def test_a_kernel_that_does_not_start_fails_its_notebook_with_the_reason_in_the_copy(tmp_path):
    notebook = write_notebook(tmp_path / "01_any.ipynb", "print('never')", "print('never either')")
    argv, env = runner.gpu_lane_command("gpu-smoke", "tiny", [notebook], cell_timeout=60,
                                        output_dir=tmp_path / "copies", environ=os.environ)
    argv[argv.index("--nbval-kernel-name=python3")] = "--nbval-kernel-name=no-such-kernel"
    assert subprocess.run(argv, env=env, cwd=runner.REPO_ROOT, capture_output=True, timeout=300).returncode == 1
    cells = code_cells(tmp_path / "copies" / "01_any.ipynb")
    assert [(o.ename, o.evalue) for o in cells[0].outputs] == [("nbval", "NoSuchKernel: No such kernel named "
                                                                         "no-such-kernel")]
    assert cells[1].outputs == [] and [cell.execution_count for cell in cells] == [None, None]
    [result] = runner.junit_results(tmp_path / "copies" / "junit.xml", [notebook])
    assert result.problem == "Cell 0: NoSuchKernel: No such kernel named no-such-kernel"


def test_junit_results_name_each_notebooks_first_failure_and_a_missing_notebook(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="notebooks.01_a.ipynb" name="Cell 0" time="2.5" />'
        '<testcase classname="notebooks.01_a.ipynb" name="Cell 1" time="1.0"><failure message="Notebook cell '
        'execution failed&#10;Cell 1: Cell outputs differ">...</failure></testcase>'
        '<testcase classname="notebooks.01_a.ipynb" name="Cell 2" time="0.5"><properties>'
        '<property name="nbval_error" value="NameError: x" /></properties><failure message="m" /></testcase>'
        '<testcase classname="" name="notebooks.02_b.ipynb" time="0.1"><error message="collection failure&#10;'
        'NotJSONError: not a notebook" /></testcase>'
        '</testsuite></testsuites>')
    notebooks = [Path("notebooks/01_a.ipynb"), Path("notebooks/02_b.ipynb"), Path("notebooks/03_c.ipynb")]
    results = runner.junit_results(tmp_path / "junit.xml", notebooks)
    assert [(r.name, r.seconds, r.problem) for r in results] == [
        ("01_a", 4.0, "Cell 1: Notebook cell execution failed"),
        ("02_b", 0.1, "collection: collection failure"),
        ("03_c", 0.0, "no result in the junit report (the run stopped before this notebook)")]


def test_the_plugin_does_nothing_without_its_option_and_needs_nbval_with_it():
    registered = []
    manager = SimpleNamespace(register=lambda plugin, name: registered.append(name))
    options = {"nbval_keep": None, "nbval": False, "nbval_lax": False}
    config = SimpleNamespace(getoption=options.get, pluginmanager=manager)
    nbval_keep.pytest_configure(config)
    assert registered == []  # make test: no --nbval-keep, nothing hooked
    options["nbval_keep"] = "build/x"
    with pytest.raises(pytest.UsageError, match="add --nbval or --nbval-lax"):
        nbval_keep.pytest_configure(config)
    options["nbval_lax"] = True
    nbval_keep.pytest_configure(config)
    assert registered == ["nbval-keep"]


def test_a_cells_problem_is_the_kernels_error_or_nbvals_message():
    error = nbformat.v4.new_output("error", ename="OutOfMemoryError", evalue="CUDA out of memory.\nTried", traceback=[])
    raised = RuntimeError("Cell execution caused an exception")
    assert nbval_keep.cell_problem([error], raised) == "OutOfMemoryError: CUDA out of memory."
    NbCellError = type("NbCellError", (Exception,), {})
    timed_out = NbCellError("Timeout of 240 seconds exceeded executing cell")
    interrupted = nbformat.v4.new_output("error", ename="KeyboardInterrupt", evalue="", traceback=[])
    assert nbval_keep.cell_problem([interrupted], timed_out) == "Timeout of 240 seconds exceeded executing cell"
    assert nbval_keep.cell_problem(None, RuntimeError("Kernel dead on test start")) == \
        "RuntimeError: Kernel dead on test start"


def test_lane_summary_is_one_line_per_notebook_with_the_first_error():
    results = [runner.NotebookResult("01_full_precision", 41.2),
               runner.NotebookResult("02_int8", 12.0, "Cell 9: RuntimeError: " + "x" * 200)]
    summary = runner.lane_summary("gpu-smoke", "tiny", results, runner.BUILD_DIR / "gpu-smoke")
    assert summary.splitlines() == [
        "gpu-smoke on profile tiny: 1 of 2 notebooks passed in 0.9 min; executed copies and junit.xml in "
        "build/gpu-smoke/",
        "  passed  01_full_precision         41 s",
        "  FAILED  02_int8                   12 s  Cell 9: RuntimeError: " + "x" * 75 + "...",
    ]


@pytest.mark.parametrize("cuda,build,expected", [
    (True, "12.4", None),
    (False, None, "needs a CUDA GPU, and this torch is a CPU-only build"),
    (False, "12.4", "needs a CUDA GPU, and torch (built for CUDA 12.4) sees no CUDA device"),
])
def test_smoke_refusal(cuda, build, expected):
    refusal = runner.smoke_refusal(cuda, build)
    assert refusal is None if expected is None else (expected in refusal and "`make test`" in refusal)


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
