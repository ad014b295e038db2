"""The canary: before grading a class, grade the instructor's own solution, the same way.

If the course's environment is misconfigured (a package missing from the kernel's Python, a
sandbox that cannot start, a broken configuration), every student would get zero and the run
would still report "graded". The canary grades the model submission of each assignment (every
answer taken from ``solutions/``) with the course's ``nbgrader_config.py``, in a scratch copy
of the course (the real gradebook is not touched), and compares its autograded score with the
points of the assignment's test cells. ``python -m bngrade.autograde`` stops before the first
student when the canary does not get full marks, and says which test failed and why.

    python -m bngrade canary ch3-forward-backward       # exit 1 when the solution loses points
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import nbformat

from bncore.runner import cell_name, is_test_cell, nbgrader_meta, outcome
from bngrade.course import nbgrader_command
from bngrade.submissions import autograded_points, model_submission

STUDENT = "canary"


@dataclass
class CanaryResult:
    assignment: str
    score: float | None = None
    max_score: float = 0.0
    failures: list[str] = field(default_factory=list)  # "cell [n] (id): the error's first line"
    error: str = ""  # grading itself failed

    @property
    def ok(self) -> bool:
        return not self.error and self.score is not None and self.score >= self.max_score

    def describe(self) -> str:
        if self.ok:
            return f"{self.assignment}: the solution earns {self.score:g} of {self.max_score:g}"
        if self.error:
            return f"{self.assignment}: grading the solution failed: {self.error}"
        lines = [f"{self.assignment}: the solution earns only {self.score or 0:g} of "
                 f"{self.max_score:g} points, so this set-up would mark correct answers down:"]
        lines += [f"  {failure}" for failure in self.failures[:8]]
        return "\n".join(lines)


def grade_solutions(assignments: Sequence[str], root: Path | str = ".",
                    extra_config: str = "",
                    timeout: float = 900) -> list[CanaryResult]:
    """Grade the model submissions of ``assignments`` in one scratch copy of the course at
    ``root`` (one nbgrader run to release them, one to grade them). ``extra_config`` is
    appended to the copy's nbgrader_config.py (tests use it to break the set-up)."""
    root = Path(root).resolve()
    results = [CanaryResult(a) for a in assignments]
    with tempfile.TemporaryDirectory(prefix="bngrade-canary-") as scratch:
        course = Path(scratch) / "course"
        course.mkdir()
        shutil.copy(root / "nbgrader_config.py", course)
        if extra_config:
            with (course / "nbgrader_config.py").open("a") as config:
                config.write("\n" + extra_config + "\n")
        for assignment in assignments:
            shutil.copytree(root / "solutions" / assignment, course / "solutions" / assignment)
        done = _nbgrader(course, "generate_assignment", "*", "--force", timeout=timeout)
        for result in results:
            _submit(course, result) if done.returncode == 0 else None
            if done.returncode != 0:
                result.error = _last_error(done)
        done = _nbgrader(course, "autograde", "*", "--student", STUDENT, timeout=timeout)
        for result in results:
            if not result.error:
                _read_grade(course, result, done)
    return results


def grade_solution(assignment: str, root: Path | str = ".", extra_config: str = "",
                   timeout: float = 900) -> CanaryResult:
    """:func:`grade_solutions` for one assignment."""
    return grade_solutions([assignment], root, extra_config, timeout)[0]


def _submit(course: Path, result: CanaryResult) -> None:
    name = f"{result.assignment}.ipynb"
    release = nbformat.read(course / "exercises" / result.assignment / name, as_version=4)
    solution = nbformat.read(course / "solutions" / result.assignment / name, as_version=4)
    result.max_score = autograded_points(solution)
    folder = course / "submitted" / STUDENT / result.assignment
    folder.mkdir(parents=True)
    nbformat.write(model_submission(release, solution), folder / name)


def _read_grade(course: Path, result: CanaryResult, done: subprocess.CompletedProcess
                ) -> None:
    name = f"{result.assignment}.ipynb"
    graded = course / "autograded" / STUDENT / result.assignment / name
    if not graded.is_file():
        result.error = _last_error(done)
        return
    notebook = nbformat.read(graded, as_version=4)
    result.score = 0.0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        passed, message = outcome(cell)
        if is_test_cell(cell) and passed:
            result.score += float(nbgrader_meta(cell).get("points", 0))
        elif not passed:
            result.failures.append(f"{cell_name(notebook, index)}: {message}")


def _nbgrader(course: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*nbgrader_command(), *args, "--log-level=ERROR"], cwd=course,
                          capture_output=True, text=True, timeout=timeout)


def _last_error(done: subprocess.CompletedProcess) -> str:
    """The exception that stopped nbgrader, as its last line says it."""
    import re

    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [m.group(1) for line in lines
              if (m := re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit): .*)$", line))]
    return (errors or lines or [f"exit status {done.returncode}"])[-1][:300]


def check(assignments: Sequence[str], root: Path | str = ".", out: TextIO = sys.stdout
          ) -> bool:
    """Run the canary for every assignment; print what it found; True when all pass."""
    ok = True
    print(f"canary: grading the model solution of {len(assignments)} assignment(s) first ...",
          file=out, flush=True)
    for result in grade_solutions(list(assignments), root):
        print(("canary: " if result.ok else "CANARY FAILED: ") + result.describe(), file=out,
              flush=True)
        ok = ok and result.ok
    return ok
