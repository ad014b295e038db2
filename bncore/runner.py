"""How a graded notebook is run, by the self-check and by the grader alike.

Every code cell except the tests runs in the notebook's kernel, in order: the set-up, the
student's answers, the locked experiment cells. The test cells run here, in the checker's
process, against the kernel through ``nb`` (:mod:`bncore.channel`): a test calls the notebook's
functions, gets plain data back, and checks it with this process's NumPy. So nothing the
notebook's code does to its own process (patching NumPy, wrapping IPython, threads, frames)
can change how a test decides. The set-up cell runs here too, so that tests use the course's
own helpers (``rel_error``, ``numerical_gradient``).

One set of rules decides a test cell (:func:`outcome`), used by both:

* a test cell passes when it raises nothing: no failed assertion, no error from the notebook's
  code, no time-out;
* what it prints, on stdout or stderr (warnings included), is shown and costs nothing. nbgrader
  would score a cell with any stderr output 0, so the runner writes a test cell's stderr as
  stdout text, and never leaves a result value for nbgrader to read as a partial grade;
* a test cell whose code runs past the time limit is interrupted and fails; a kernel that cannot
  be interrupted, or dies, is stopped, and the cells after it are not run.

The self-check runs the tests a student can see; the grader runs the hidden tests as well (the
part of a test cell between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``). While a
notebook is checked, the course's reference modules are not importable in its kernel
(:func:`blocked_modules`): an answer must be the student's own code.
"""

from __future__ import annotations

import ast
import contextlib
import io
import linecache
import pkgutil
import traceback
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat

from bncore.channel import ChannelError, KernelStuck, KernelTimeout, NotebookChannel, NotebookError

BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
#: A cell with this tag is not run when the notebook is checked or graded (an expensive figure,
#: the self-check cell itself).
SKIP_TAG = "skip-when-checked"


# --- what a cell is ------------------------------------------------------------------------------


def nbgrader_meta(cell: Any) -> dict:
    """The cell's nbgrader metadata (an empty dict when it has none or it is malformed)."""
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def grade_ids(nb: Any) -> list[str]:
    """The nbgrader ids of a notebook's cells, in order."""
    return [nbgrader_meta(c)["grade_id"] for c in nb.cells if nbgrader_meta(c).get("grade_id")]


def insertion_index(cells: list[Any], order: list[str], name: str,
                    present: Collection[Any]) -> int:
    """Where a deleted cell ``name`` goes back among ``cells``: after the last cell (among
    ``present``) that precedes it in ``order``, the source notebook's grade ids; at the top
    when none does."""
    before = [n for n in order[:order.index(name)] if n in present]
    if not before:
        return 0
    return 1 + max(i for i, c in enumerate(cells)
                   if nbgrader_meta(c).get("grade_id") == before[-1])


def is_test_cell(cell: Any) -> bool:
    """An autograded test: a code cell that carries points and is not an answer."""
    meta = nbgrader_meta(cell)
    return cell.get("cell_type") == "code" and bool(meta.get("grade")) \
        and not meta.get("solution")


def is_setup_cell(cell: Any) -> bool:
    """The locked cell named ``setup``: it runs in the kernel and in the checker."""
    meta = nbgrader_meta(cell)
    return cell.get("cell_type") == "code" and meta.get("grade_id") == "setup" \
        and bool(meta.get("locked")) and not meta.get("grade")


def is_skipped(cell: Any) -> bool:
    return SKIP_TAG in (cell.get("metadata", {}).get("tags") or [])


def split_hidden(source: str, begin: str = BEGIN_HIDDEN,
                 end: str = END_HIDDEN) -> tuple[str, str]:
    """A test cell's source as (visible code, hidden code), the hidden regions being those
    between the lines holding ``begin`` and ``end``. Hidden regions are blanked in the
    visible part and the other way round, and the marker lines in both, so line numbers stay
    those of the cell."""
    visible, hidden, inside = [], [], False
    for line in source.split("\n"):
        if begin in line:
            inside = True
            visible.append("")
            hidden.append("")
        elif end in line:
            inside = False
            visible.append("")
            hidden.append("")
        else:
            (hidden if inside else visible).append(line)
            (visible if inside else hidden).append("")
    return "\n".join(visible), "\n".join(hidden)


# --- the rules ----------------------------------------------------------------------------------


def outcome(cell: Any) -> tuple[bool, str]:
    """Whether a test cell passed, and the first line of its error when it did not.

    The one rule of the course: a test cell fails when it has an error output. The runner
    writes test cells so that nbgrader's own rule (an error or any stderr output gives 0, an
    execute_result is a partial grade) agrees with this one.
    """
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            ename = output.get("ename", "Error")
            evalue = str(output.get("evalue", "")).strip().split("\n")[0]
            return False, f"{ename}: {evalue}" if evalue else ename
    return True, ""


def scoring_outputs(outputs: list[dict]) -> list[dict]:
    """A test cell's outputs as nbgrader must read them: stderr text becomes stdout text (a
    warning costs no points), results become displays (nbgrader would read a number as a
    partial grade), and consecutive streams merge."""
    merged: list[dict] = []
    for output in outputs:
        output = dict(output)
        if output.get("output_type") == "stream":
            output["name"] = "stdout"
            if merged and merged[-1].get("output_type") == "stream":
                merged[-1] = {**merged[-1], "text": merged[-1]["text"] + output["text"]}
                continue
        elif output.get("output_type") == "execute_result":
            output["output_type"] = "display_data"
            output.pop("execution_count", None)
        merged.append(output)
    return merged


# --- modules a checked notebook's kernel may not import ------------------------------------------


def _bncore_imports(module: str) -> set[str]:
    """The bncore modules that a bncore module imports (statically)."""
    import bncore

    path = Path(bncore.__file__).parent / (module.split(".", 1)[1].replace(".", "/") + ".py")
    if not path.is_file():
        return set()
    return {name for name in imported_modules([path.read_text(encoding="utf-8")])
            if name.split(".")[0] == "bncore"}


def imported_modules(sources: Iterable[str]) -> list[str]:
    """The modules that code imports (``import a.b``, ``from a.b import c``: ``a.b``, and
    ``a.b.c`` when c is a module)."""
    found: list[str] = []
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append(node.module)
                found += [f"{node.module}.{a.name}" for a in node.names]
    return list(dict.fromkeys(found))


def blocked_modules(notebook: Any) -> list[str]:
    """The modules a notebook's kernel may not import while it is checked: every bncore module
    that the notebook's locked cells do not need (directly or through other bncore modules),
    and torch unless they import it. The answers must be the student's own code, not the
    course's reference implementation."""
    import bncore

    locked = [c.get("source", "") for c in notebook.get("cells", [])
              if c.get("cell_type") == "code" and nbgrader_meta(c).get("locked")
              and not is_test_cell(c)]
    wanted = {m for m in imported_modules(locked) if m.split(".")[0] in ("bncore", "torch")}
    allowed = {"bncore", "bncore.check"}
    todo = [m for m in wanted if m.startswith("bncore.")]
    while todo:
        module = todo.pop()
        if module in allowed:
            continue
        allowed.add(module)
        todo += sorted(_bncore_imports(module) - allowed)
    everything = [f"bncore.{info.name}" for info in pkgutil.iter_modules(bncore.__path__)]
    blocked = sorted(m for m in everything if m not in allowed)
    if not any(m.split(".")[0] == "torch" for m in wanted):
        blocked.append("torch")
    return blocked


_BLOCKER = '''
import sys as _sys

class _BncoreBlocked:
    """Refuses the course's reference modules while the notebook is checked."""
    blocked = {blocked!r}

    def find_spec(self, name, path=None, target=None):
        for module in self.blocked:
            if name == module or name.startswith(module + "."):
                raise ModuleNotFoundError(
                    f"{{name}} cannot be imported while this notebook is checked or graded: "
                    "the answers must be your own code", name=name)
        return None

_sys.meta_path.insert(0, _BncoreBlocked())
for _name in [n for n in _sys.modules if any(n == m or n.startswith(m + ".")
                                             for m in _BncoreBlocked.blocked)]:
    del _sys.modules[_name]
del _sys, _name, _BncoreBlocked
'''


def blocker_code(blocked: Iterable[str]) -> str:
    """Code that makes ``blocked`` modules unimportable in a kernel (run before any cell)."""
    return _BLOCKER.format(blocked=tuple(blocked))


# --- running a test cell here --------------------------------------------------------------------


class _Printed(io.TextIOBase):
    """What test code prints, appended in order to the outputs the channel collects."""

    def __init__(self, channel: NotebookChannel, name: str):
        self.channel, self.name = channel, name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            self.channel._collect({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


class TestCells:
    """Runs a notebook's set-up and test cells in this process (see the module docstring)."""

    def __init__(self, channel: NotebookChannel, *, hidden: bool, timeout: float):
        self.channel, self.hidden, self.timeout = channel, hidden, timeout
        self.namespace: dict = {"__name__": "__test__"}
        self.report: dict = {"visible_failed": []}

    def run_setup(self, source: str) -> None:
        """Run the set-up cell here too (its prints belong to the kernel's run)."""
        code = _compile(source, "<set-up cell>")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(code, self.namespace)  # the course's own locked cell

    def run(self, cell: Any) -> list[Any]:
        """Run one test cell; its outputs (nbformat dicts)."""
        name = nbgrader_meta(cell).get("grade_id", "test")
        visible, hidden = split_hidden(cell.get("source", ""))
        parts = [("visible", visible)] + ([("hidden", hidden)] if self.hidden
                                          and hidden.strip() else [])
        error = None
        with self.channel.session(self.timeout) as notebook:
            self.namespace["nb"] = notebook
            printed_out, printed_err = (_Printed(self.channel, "stdout"),
                                        _Printed(self.channel, "stderr"))
            with contextlib.redirect_stdout(printed_out), contextlib.redirect_stderr(printed_err):
                for part, source in parts:
                    filename = f"<test {name}>" if part == "visible" else f"<hidden {name}>"
                    try:
                        exec(_compile(source, filename), self.namespace)
                    except (KernelStuck, ChannelError) as failure:
                        if not isinstance(failure, KernelTimeout):
                            raise
                        error = _error_output("CellTimeoutError", str(failure), [])
                    except Exception as failure:  # a failed test
                        error = _describe(failure, filename, hidden=part == "hidden")
                    if error is not None:
                        if part == "visible":
                            self.report["visible_failed"].append(name)
                        break
        outputs = [nbformat.from_dict(o) for o in scoring_outputs(self.channel.outputs)]
        if error is not None:
            outputs.append(error)
        return outputs


def _compile(source: str, filename: str) -> Any:
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec", dont_inherit=True)


def _error_output(ename: str, evalue: str, traceback_lines: list[str]) -> Any:
    return nbformat.from_dict({"output_type": "error", "ename": ename, "evalue": evalue,
                               "traceback": traceback_lines or [f"{ename}: {evalue}"]})


def _describe(error: BaseException, filename: str, *, hidden: bool) -> dict:
    """An error output for a failed test. For hidden tests only the message: their code is
    not shown to students. For visible tests the lines of the test that failed, and where the
    error came from the notebook's code, its traceback there."""
    ename = type(error).__name__
    evalue = str(error)
    if isinstance(error, NotebookError):
        evalue = error.explain()
    if hidden:
        return _error_output(ename, evalue, [])
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename == filename or f.filename == "<set-up cell>"]
    lines = ["Traceback (the test that failed):\n", *traceback.format_list(frames)]
    if isinstance(error, NotebookError) and error.notebook_traceback:
        lines += ["\nIn the notebook's code:\n", error.notebook_traceback]
    lines.append(f"{ename}: {evalue}\n")
    return _error_output(ename, evalue, ["".join(lines)])


# --- running a whole notebook --------------------------------------------------------------------


class RunsTestsOutsideKernel:
    """For an nbclient ``NotebookClient`` (the self-check's client, the grader's Execute):
    :meth:`run_cells` runs ``self.nb`` as the module docstring says. Call it inside
    ``self.setup_kernel()``; it returns what happened, a dict (the grader's record)."""

    run_hidden_tests = False
    if TYPE_CHECKING:  # provided by nbclient's NotebookClient
        nb: Any
        km: Any
        timeout: int | None

        def execute_cell(self, cell: Any, cell_index: int, store_history: bool = True
                         ) -> Any: ...

    def run_cells(self) -> dict[str, Any]:
        report: dict[str, Any] = {"timed_out": [], "kernel_died": None, "not_run": [],
                                  "skipped": [], "visible_failed": [], "errors": [],
                                  "unreachable": []}
        channel = NotebookChannel(self.km)
        try:
            channel.install()
            channel.run_code(blocker_code(blocked_modules(self.nb)))
            tests = TestCells(channel, hidden=self.run_hidden_tests, timeout=self.timeout or 60)
            self._run_all(tests, report)
            report["visible_failed"] = tests.report["visible_failed"]
        finally:
            channel.close()
        number = 0
        for cell in self.nb.cells:
            if cell.cell_type == "code":
                number += 1
                cell.execution_count = number if cell.get("outputs") is not None \
                    and cell.get("execution_count") is not None else None
        return report

    def _run_all(self, tests: TestCells, report: dict[str, Any]) -> None:
        stopped = None
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code":
                continue
            name = cell_name(self.nb, index)
            if stopped is not None:
                cell.outputs = [_error_output("NotRun", stopped, [])]
                cell.execution_count = None
                if is_test_cell(cell):
                    report["not_run"].append(name)
                continue
            if is_skipped(cell):
                cell.outputs, cell.execution_count = [], None
                report["skipped"].append(name)
                continue
            if is_test_cell(cell):
                stopped = self._run_test(tests, cell, name, report)
            else:
                stopped = self._run_in_kernel(cell, index, name, report)
                if stopped is None and is_setup_cell(cell):
                    tests.run_setup(cell.source)

    def _run_test(self, tests: TestCells, cell: Any, name: str, report: dict[str, Any]
                  ) -> str | None:
        try:
            cell.outputs = tests.run(cell)
        except KernelStuck as error:
            cell.outputs = [_error_output("CellTimeoutError", str(error), [])]
            report["timed_out"].append(name)
            self._stop_kernel()
            return f"not run: {name} could not be interrupted"
        except ChannelError as error:
            if self._kernel_alive():  # the notebook broke its own end: this test fails
                cell.outputs = [_error_output(
                    "NotebookUnreachable", f"the test could not reach the notebook's code: "
                    f"{error}", [])]
                report["unreachable"].append(name)
                tests.report["visible_failed"].append(nbgrader_meta(cell).get("grade_id", name))
                return None
            cell.outputs = [_error_output("KernelDied", f"{error}; the cells after it were "
                                          "not run", [])]
            report["kernel_died"] = name
            return f"not run: the kernel stopped in {name}"
        cell.execution_count = 0
        if any(o.get("ename") == "CellTimeoutError" for o in cell.outputs):
            report["timed_out"].append(name)
        return None

    def _run_in_kernel(self, cell: Any, index: int, name: str, report: dict[str, Any]
                       ) -> str | None:
        from nbclient.exceptions import CellTimeoutError, DeadKernelError

        try:
            self.execute_cell(cell, index, store_history=True)
        except DeadKernelError:
            cell.outputs.append(_error_output(
                "KernelDied", "the kernel stopped while running this cell (os._exit, a crash, "
                "or a resource limit); the cells after it were not run", []))
            report["kernel_died"] = name
            return f"not run: the kernel stopped in {name}"
        except CellTimeoutError:
            cell.outputs.append(_error_output(
                "CellTimeoutError", f"the cell ran longer than {self.timeout} s and could not "
                "be interrupted; the kernel was stopped", []))
            report["timed_out"].append(name)
            self._stop_kernel()
            return f"not run: {name} could not be interrupted"
        if any(o.get("ename") == "CellTimeoutError" for o in cell.outputs
               if o.get("output_type") == "error"):
            report["timed_out"].append(name)
        passed, message = outcome(cell)
        if not passed:
            report["errors"].append([name, message])
        return None

    def _kernel_alive(self) -> bool:
        from jupyter_core.utils import run_sync

        try:
            return bool(run_sync(self.km.is_alive)())
        except Exception:  # a manager that cannot tell: treat the kernel as gone
            return False

    def _stop_kernel(self) -> None:
        from jupyter_core.utils import run_sync

        with contextlib.suppress(Exception):
            run_sync(self.km.shutdown_kernel)(now=True)


def cell_name(notebook: Any, index: int) -> str:
    """How a cell is named to a student: its number among the code cells, as JupyterLab
    shows it after *Restart Kernel and Run All Cells* (``[4]``), and its nbgrader id."""
    number = sum(1 for c in notebook.cells[: index + 1] if c.cell_type == "code")
    grade_id = nbgrader_meta(notebook.cells[index]).get("grade_id")
    return f"cell [{number}]" + (f" ({grade_id})" if grade_id else "")

