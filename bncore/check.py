"""The self-check, and ``nb`` for the test cells of the graded notebooks.

In a graded notebook's test cells, ``nb.name`` is the notebook's ``name``: the tests call your
functions as ``nb.batchnorm_forward(x, gamma, beta)``. When you run a test cell yourself, ``nb``
is simply this kernel's namespace. When the notebook is checked or graded, the same test cells
run in the checker's process and ``nb`` reaches your kernel through a channel
(:mod:`bncore.runner`), so a test's verdict never depends on anything in your kernel but the
values your functions return.

Check a notebook before you hand it in, from a terminal (any file name)::

    python -m bncore.check "ch3-forward-backward (1).ipynb"

or from its last cell: ``self_check("ch3-forward-backward")``. Both run the notebook as saved,
from the top, in a fresh kernel, with the same rules as the grader, list every test with its
points, and fail when a test fails. Where the notebook is not a file in the working folder (in
Colab, say), ``self_check`` checks this kernel as it is now: the visible tests of the assignment,
as released with this version of bncore, against the functions you have defined.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

#: Set while a notebook runs inside a check (the notebook's own self_check() stands aside).
CHECKING_ENV = "BNCORE_SELF_CHECK"
_RELEASES = Path(__file__).with_name("releases.json")


class _ThisKernel:
    """``nb`` when a test cell runs in the notebook's own kernel."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        namespace = _user_namespace()
        if name not in namespace:
            raise NameError(f"name {name!r} is not defined in the notebook: did its cell run, "
                            "and is the name spelled as in the instructions?")
        return namespace[name]

    def __repr__(self) -> str:
        return "<the notebook's names>"

    @contextlib.contextmanager
    def replaced(self, name: str, value: Any) -> Iterator[None]:
        """Within the block, the notebook's ``name`` is ``value``."""
        namespace = _user_namespace()
        missing = object()
        old = namespace.get(name, missing)
        namespace[name] = value
        try:
            yield
        finally:
            if old is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = old


nb = _ThisKernel()


def _user_namespace() -> dict:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover -- notebooks always run under IPython
        shell = None
    return shell.user_ns if shell is not None else vars(sys.modules["__main__"])


# --- finding the notebook -----------------------------------------------------------------------


def notebook_assignment(path: Path) -> str | None:
    """The course assignment a notebook file belongs to (its metadata), or None."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return None
    value = meta.get("bncore", {}).get("assignment") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def find_notebook(assignment: str | None, folder: Path | None = None) -> tuple[Path | None, str]:
    """The saved file of the notebook that is running, and how it was found.

    Tried in order: the path Jupyter gives the kernel (``JPY_SESSION_NAME``), VS Code's
    ``__vsc_ipynb_file__``, then the notebooks in the working folder that belong to
    ``assignment``, whatever their file names. Among several copies, the one whose cells this
    kernel has run wins (ties: the most recently saved)."""
    folder = folder or Path.cwd()
    candidates = []
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session.endswith(".ipynb"):
        candidates += [Path(session), folder / session, folder / Path(session).name]
    vscode = _user_namespace().get("__vsc_ipynb_file__")
    if isinstance(vscode, str):
        candidates.append(Path(vscode))
    for path in candidates:
        if path.is_file() and (assignment is None or notebook_assignment(path) in
                               (assignment, None)):
            return path, "the file this notebook runs from"
    copies = [p for p in folder.glob("*.ipynb")
              if assignment is None or notebook_assignment(p) == assignment]
    if not copies:
        return None, f"no saved {assignment or 'course'} notebook in {folder}"
    ran = set(_user_namespace().get("In", []) or [])
    copies.sort(key=lambda p: (_cells_run(p, ran), p.stat().st_mtime), reverse=True)
    if len(copies) == 1:
        return copies[0], f"the only {assignment or 'course'} notebook in {folder}"
    others = ", ".join(p.name for p in copies[1:4])
    return copies[0], (f"of the copies in {folder}, the one whose cells this kernel ran; not "
                       f"{others}: pass a file name to check another")


def _cells_run(path: Path, ran: set) -> int:
    """How many of a notebook file's code cells this kernel has run, as saved."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return 0
    sources = ["".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"]
    return sum(1 for source in sources if source.strip() and source in ran)


# --- running the check --------------------------------------------------------------------------


def as_graded(notebook: Any) -> list[str]:
    """Put the notebook's locked cells (tests, set-up, instructions) back as released, in
    place, as grading does (bngrade.sanitize and nbgrader's OverwriteCells): edited ones get
    their released source, deleted ones return after the locked cell before them, unknown or
    duplicated nbgrader ids become the student's own cells. Needs the notebook's assignment in
    its metadata; returns what it put back."""
    import copy

    assignment = notebook.metadata.get("bncore", {}).get("assignment")
    try:
        release = released_tests(assignment) if assignment else {}
    except (ValueError, OSError):
        release = {}
    released, order = release.get("locked", []), release.get("order", [])
    if not released:
        return []
    by_id = {cell["grade_id"]: cell for cell in released}
    from bncore.runner import grade_ids, insertion_index, nbgrader_meta

    last = {}
    for index, cell in enumerate(notebook.cells):
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id:
            last[grade_id] = index
    changed = []
    for index, cell in enumerate(notebook.cells):
        meta = cell.get("metadata", {}).get("nbgrader")
        if not isinstance(meta, dict) or "grade_id" not in meta:
            continue
        grade_id = meta["grade_id"]
        if grade_id in by_id and last[grade_id] == index:
            original = by_id[grade_id]
            if cell.source != original["source"] or cell.cell_type != original["cell_type"]:
                changed.append(grade_id)
            if cell.cell_type != original["cell_type"]:  # a retyped cell: made anew
                metadata = copy.deepcopy(cell.metadata)
                notebook.cells[index] = cell = _new_cell(original)
                cell.metadata.update(metadata)
            cell.source = original["source"]
            _restore_metadata(cell, original)
        elif grade_id not in order or last[grade_id] != index:
            del cell.metadata["nbgrader"]  # the student's own cell (or an earlier copy)
    present = set(grade_ids(notebook))
    for original in released:
        if original["grade_id"] in present:
            continue
        cell = _new_cell(original)
        _restore_metadata(cell, original)
        index = insertion_index(notebook.cells, order, original["grade_id"], present)
        notebook.cells.insert(index, cell)
        present.add(original["grade_id"])
        changed.append(original["grade_id"])
    return changed


def _restore_metadata(cell: Any, original: dict[str, Any]) -> None:
    """The released cell's nbgrader metadata and tags, on ``cell``."""
    cell.metadata["nbgrader"] = dict(original["nbgrader"])
    if original["tags"]:
        cell.metadata["tags"] = list(original["tags"])


def _new_cell(original: dict[str, Any]) -> Any:
    import nbformat

    maker = (nbformat.v4.new_code_cell if original["cell_type"] == "code"
             else nbformat.v4.new_markdown_cell)
    return maker(original["source"])


def edited_locked_cells(notebook: Any) -> list[str]:
    """The locked cells (tests, set-up) that differ from the release, by their nbgrader
    checksum (nbgrader's own recipe). Grading puts the originals back, so a check of an edited
    test says nothing about the grade."""
    import hashlib

    edited = []
    for cell in notebook.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not (isinstance(meta, dict) and meta.get("locked") and meta.get("checksum")
                and meta.get("grade_id")):
            continue
        digest = hashlib.md5()  # nbgrader's checksum, not a security measure
        for part in (cell.source, cell.cell_type, str(bool(meta.get("grade"))),
                     str(bool(meta.get("solution"))), str(bool(meta.get("locked"))),
                     meta["grade_id"]):
            digest.update(part.encode("utf-8"))
        if meta.get("grade"):
            digest.update(str(float(meta.get("points", 0))).encode("utf-8"))
        if digest.hexdigest() != meta["checksum"]:
            edited.append(meta["grade_id"])
    return edited


def run_checks(notebook: Any, *, timeout: int = 60, path: Path | None = None
               ) -> tuple[list[tuple[str, str, float, bool, str]], list[tuple[str, str]],
                          dict[str, Any]]:
    """Run a notebook (a NotebookNode) as the grader does, without the hidden tests: every
    cell but the tests in a fresh kernel of this Python, the tests here. Returns
    ``(checks, errors, report)``: checks are ``(cell name, grade_id, points, passed,
    message)`` per test cell, errors ``(cell name, message)`` for other cells that raised."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    from bncore.runner import (
        RunsTestsOutsideKernel,
        cell_name,
        is_test_cell,
        nbgrader_meta,
        outcome,
    )

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str, *args: Any, **kwargs: Any) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"], display_name="Python 3",
                              language="python", name=kernel_name)

    class SelfCheckClient(RunsTestsOutsideKernel, NotebookClient):
        pass

    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())
    folder = str((path or Path.cwd()).parent if path else Path.cwd())
    client = SelfCheckClient(notebook, km=km, timeout=timeout, allow_errors=True,
                             resources={"metadata": {"path": folder}})
    previous = os.environ.get(CHECKING_ENV)
    os.environ[CHECKING_ENV] = "1"
    try:
        with client.setup_kernel(stderr=subprocess.DEVNULL):  # the kernel's own log
            report = client.run_cells()
    finally:
        if previous is None:
            os.environ.pop(CHECKING_ENV, None)
        else:
            os.environ[CHECKING_ENV] = previous
    checks, errors = [], []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        name = cell_name(notebook, index)
        passed, message = outcome(cell)
        if is_test_cell(cell):
            meta = nbgrader_meta(cell)
            checks.append((name, meta.get("grade_id", name), float(meta.get("points", 0)),
                           passed, message))
        elif not passed:
            errors.append((name, message))
    return checks, errors, report


def summarize(checks: Sequence[tuple[str, str, float, bool, str]],
              errors: Sequence[tuple[str, str]], out: TextIO | None = None) -> bool:
    """Print the list of checks and the total; True when every check passed and no cell
    raised."""
    out = out or sys.stdout
    width = max([len(grade_id) for _, grade_id, *_ in checks] + [4])
    for name, grade_id, points, passed, message in checks:
        status = "passed" if passed else "FAILED"
        where = name.split(" (")[0]
        line = f"  {status}  {grade_id:<{width}}  {points:g} point{'s' if points != 1 else ''}"
        print(line + f"  {where}" + (f": {message[:200]}" if message and not passed else ""),
              file=out)
    for name, message in errors:
        print(f"  ERROR   {name}: {message[:200]}", file=out)
    count = sum(1 for *_, ok, _ in checks if ok)
    earned = sum(points for _, _, points, ok, _ in checks if ok)
    total = sum(points for _, _, points, _, _ in checks)
    print(f"{count} of {len(checks)} checks passed ({earned:g} of {total:g} points from the "
          "visible tests)" + (f"; {len(errors)} other cell(s) raised an error" if errors else "")
          + ".", file=out)
    ok = bool(checks) and count == len(checks) and not errors
    if not ok:
        print("Fix the first failure first: later checks often depend on it.", file=out)
    return ok


def check_file(path: str | os.PathLike, *, timeout: int = 60, out: TextIO | None = None,
               as_json: bool = False) -> int:
    """The terminal self-check of a saved notebook: 0 when every check passed, 1 when one
    failed or a cell raised, 2 when there is no notebook to check. ``as_json``: print the
    checks as JSON (for tools) instead of the list."""
    import nbformat

    out = out or sys.stdout
    path = Path(path)
    if not path.is_file():
        print(f"{path}: no such notebook", file=out)
        return 2
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # any unreadable file
        print(f"{path}: not a notebook ({error})", file=out)
        return 2
    if not as_json:
        print(f"Checking {path.name} as last saved: every cell from the top in a fresh kernel, "
              "with the tests you can see (grading adds hidden tests).", file=out)
    edited = as_graded(notebook) or edited_locked_cells(notebook)
    checks, errors, _ = run_checks(notebook, timeout=timeout, path=path.resolve())
    if as_json:
        ok = bool(checks) and all(c[3] for c in checks) and not errors
        keys = ("cell", "grade_id", "points", "passed", "message")
        print(json.dumps({"checks": [dict(zip(keys, c, strict=True)) for c in checks],
                          "errors": [list(e) for e in errors], "passed": ok}), file=out)
        return 0 if ok else 1
    ok = summarize(checks, errors, out)
    for grade_id in edited:
        print(f"  warning: {grade_id} differs from the release: checked with the original, as "
              "grading does", file=out)
    return 0 if ok else 1


# --- checking the kernel as it is (no saved file) -----------------------------------------------


def released_tests(assignment: str) -> dict:
    """The set-up and visible tests of an assignment as released with this bncore:
    ``{"setup": source, "tests": [{"grade_id", "points", "source", "number"}]}``."""
    releases = json.loads(_RELEASES.read_text(encoding="utf-8"))
    if assignment not in releases:
        raise ValueError(f"unknown assignment {assignment!r}; this bncore knows "
                         f"{', '.join(sorted(releases))}")
    return releases[assignment]


def check_this_kernel(assignment: str, out: TextIO | None = None) -> bool:
    """Run the assignment's visible tests, here, against this kernel's functions."""
    import io
    import traceback

    out = out or sys.stdout
    release = released_tests(assignment)
    namespace: dict = {"__name__": "__test__"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(release["setup"], "<set-up cell>", "exec"), namespace)
    namespace["nb"] = nb
    checks = []
    for test in release["tests"]:
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                exec(compile(test["source"], f"<test {test['grade_id']}>", "exec"),
                     namespace)
            message, passed = "", True
        except Exception as error:  # a failed test
            line = traceback.format_exception_only(type(error), error)[-1].strip()
            message, passed = line.split("\n")[0], False
        checks.append((f"cell [{test['number']}]", test["grade_id"], float(test["points"]),
                       passed, message))
    return summarize(checks, [], out)


def self_check(notebook: str | os.PathLike | None = None, *, timeout: int = 60) -> None:
    """The self-check from a notebook's last cell: ``self_check("ch3-forward-backward")``.

    ``notebook`` is the assignment's name (or a notebook's file name). The saved notebook is
    found whatever its file name (see :func:`find_notebook`) and checked from the top in a
    fresh kernel. Where there is no saved file (Colab), this kernel is checked as it is now.
    Raises AssertionError when a check fails, so the cell turns red. Does nothing while the
    notebook is itself being checked or graded.
    """
    if os.environ.get(CHECKING_ENV) or os.environ.get("NBGRADER_EXECUTION"):
        print("(self-check skipped: this notebook is being checked or graded right now)")
        return
    name = None if notebook is None else str(notebook)
    path: Path | None
    if name is not None and name.endswith(".ipynb") and Path(name).is_file():
        path, how = Path(name), "the file you named"
        assignment = notebook_assignment(path)
    else:
        assignment = name[:-6] if name and name.endswith(".ipynb") else name
        path, how = find_notebook(assignment)
    if path is not None:
        print(f"Checking {path.name} ({how}) as last saved: save it first (Ctrl-S) to check "
              "your latest work.", flush=True)
        done = subprocess.run([sys.executable, "-m", "bncore.check", str(path), "--timeout",
                               str(timeout)], capture_output=True, text=True)
        print(done.stdout + done.stderr, end="")
        ok = done.returncode == 0
    else:
        if assignment is None:
            raise ValueError('self_check needs the assignment\'s name, e.g. '
                             'self_check("ch3-forward-backward")')
        print(f"There is {how} (in Colab a notebook is not a file in the working folder), so "
              f"this checks the kernel as it is now: the visible tests of {assignment}, as "
              "released with this bncore, against the functions defined in this session. Run "
              "every cell above first. Grading runs your saved notebook from the top.",
              flush=True)
        ok = check_this_kernel(assignment)
    if not ok:
        raise AssertionError("the self-check failed: see the list above")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bncore.check",
        description="Check a graded notebook as the grader runs it (visible tests only): "
                    "exit 0 when every check passes, 1 when one fails, 2 when there is no "
                    "notebook.")
    parser.add_argument("notebook", help="the notebook file, any name")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per cell (60)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    return check_file(args.notebook, timeout=args.timeout, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
