"""A pytest plugin for nbval: keep an executed copy of every notebook nbval runs, failed ones included.

Load it with ``-p helpers.nbval_keep`` and turn it on with ``--nbval-keep=DIR`` (the GPU lanes do both); without
that option it does nothing, so ``make test`` is unaffected. nbval executes each code cell once, as one pytest item
(``nbval.plugin.IPyNbCell``), and keeps what the kernel sent on ``item.test_outputs``; this plugin reads those
outputs after each cell and, once a notebook's last cell is done, writes ``DIR/<notebook name>`` with them: nothing is
executed a second time. A failing cell keeps its outputs, the error included; a failure that sent no error output
(a changed ``NBVAL_CHECK_OUTPUT`` output, a dead kernel, a time limit without a traceback) is added to the cell as
an error output named ``nbval`` with nbval's message. Cells that did not run (``NBVAL_SKIP``, after a dead kernel)
have no outputs.

Each failing cell's first error, one line, is also recorded as the property ``nbval_error`` of its test case, which
``--junitxml`` writes (``helpers.runner.junit_results`` reads it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

ERROR_PROPERTY = "nbval_error"
"""The name of the test-case property that holds a failing cell's first error, in one line."""
NBVAL_EXCEPTION_MESSAGE = "Cell execution caused an exception"
"""nbval's message when a cell raised; the error itself is then in the cell's outputs."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("nbval").addoption(
        "--nbval-keep", metavar="DIR", default=None,
        help="write an executed copy of every notebook nbval runs into DIR, failed ones included "
             "(helpers.nbval_keep)")


def pytest_configure(config: pytest.Config) -> None:
    directory = config.getoption("nbval_keep")
    if directory:
        if not (config.getoption("nbval") or config.getoption("nbval_lax")):
            raise pytest.UsageError("--nbval-keep keeps what nbval executes: add --nbval or --nbval-lax")
        config.pluginmanager.register(NotebookKeeper(Path(directory)), "nbval-keep")


def first_line(text: object) -> str:
    """The first non-empty line of ``text``, stripped (empty if there is none)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def cell_problem(outputs: list | None, error: BaseException) -> str:
    """One line saying why a cell failed: the kernel's error when the cell raised, else nbval's message (pure).

    After a time limit the kernel's error is the ``KeyboardInterrupt`` of nbval's interrupt, so nbval's message,
    which names the limit, is the one shown.
    """
    message = first_line(error)
    errors = [output for output in outputs or [] if output.get("output_type") == "error"]
    if errors and message == NBVAL_EXCEPTION_MESSAGE:
        return f"{errors[-1].get('ename', 'Error')}: {first_line(errors[-1].get('evalue', ''))}".rstrip(": ")
    if type(error).__name__ == "NbCellError":  # nbval's own verdict: a changed output, a time limit
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class NotebookKeeper:
    """Collects what nbval executed, cell by cell, and writes each notebook's executed copy once it is done."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # notebook item -> code cell number -> (outputs, or None where it did not run; its problem or None)
        self.cells: dict[object, dict[int, tuple[list | None, str | None]]] = {}
        self.written: set[object] = set()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        from nbval.plugin import IPyNbCell

        if not isinstance(item, IPyNbCell):
            return (yield)
        records = self.cells.setdefault(item.parent, {})  # every notebook gets a copy, even one whose cells all skip
        failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
        if call.when == "call" or (call.when == "setup" and failed):
            outputs = item.test_outputs if call.when == "call" else None  # None: the cell did not run
            problem = cell_problem(outputs, call.excinfo.value) if failed else None
            if problem:
                item.user_properties.append((ERROR_PROPERTY, problem))
            # a setup failure (the kernel did not start) is shown in the notebook's first failing cell only
            if call.when == "call" or not any(recorded for _, recorded in records.values()):
                if outputs is not None or problem:
                    records[item.cell_num] = (outputs, problem)
        return (yield)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        notebook = getattr(item, "parent", None)
        if notebook in self.cells and (nextitem is None or nextitem.parent is not notebook):
            self.write(notebook)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for notebook in list(self.cells):  # those an interrupted session left unwritten
            self.write(notebook)

    def write(self, notebook) -> None:
        """Write ``notebook``'s executed copy (once): its cells with what nbval recorded, in the order they ran."""
        import nbformat
        from nbval.plugin import coalesce_streams

        if notebook in self.written:
            return
        self.written.add(notebook)
        executed = copy.deepcopy(notebook.nb)
        code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
        for cell in code_cells:
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        count = 0
        for number, (outputs, problem) in sorted(self.cells.get(notebook, {}).items()):
            cell = code_cells[number]
            if outputs is not None:
                count += 1
                cell.outputs, cell.execution_count = coalesce_streams(copy.deepcopy(list(outputs))), count
            if problem and not any(output.output_type == "error" for output in cell.outputs):
                cell.outputs.append(nbformat.v4.new_output("error", ename="nbval", evalue=problem,
                                                           traceback=[f"nbval: {problem}"]))
            for output in cell.outputs:
                if output.output_type == "execute_result":
                    output.execution_count = cell.execution_count
        self.directory.mkdir(parents=True, exist_ok=True)
        nbformat.write(executed, self.directory / Path(str(notebook.fspath)).name)
