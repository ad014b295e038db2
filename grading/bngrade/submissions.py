"""Submissions built from the course's own notebooks: the model answer, the untouched release,
a partial answer. The canary grades the model submission before a class; the tests and the
grading benchmark grade all three kinds.

The partial rule of the course: a submission with only its first code answer filled in earns
exactly the points of "group 1", the test cells between the first and the second code answer
(:func:`group_one`); every graded notebook is written so that this holds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from bncore.runner import is_test_cell, nbgrader_meta


def is_code_answer(cell: Any) -> bool:
    return cell.cell_type == "code" and bool(nbgrader_meta(cell).get("solution"))


def points(cells: Iterable[Any]) -> float:
    return sum(float(nbgrader_meta(c).get("points", 0)) for c in cells)


def autograded_points(notebook: Any) -> float:
    """The points of a notebook's test cells (the written answers are graded by hand)."""
    return points(c for c in notebook.cells if is_test_cell(c))


def group_one(notebook: Any) -> list[Any]:
    """The test cells after the first code answer and before the second one (or the end)."""
    answers = [i for i, cell in enumerate(notebook.cells) if is_code_answer(cell)]
    if not answers:
        raise ValueError("the notebook has no code answer cell")
    end = answers[1] if len(answers) > 1 else len(notebook.cells)
    return [cell for cell in notebook.cells[answers[0] + 1:end] if is_test_cell(cell)]


def model_answer(source: str) -> str:
    """The answer a student would write: the solution cell without nbgrader's markers."""
    return "\n".join(line for line in source.split("\n")
                     if "BEGIN SOLUTION" not in line and "END SOLUTION" not in line)


def submission(release: Any, solution: Any, fill: Iterable[str] = (),
               answers: dict[str, str] | None = None) -> Any:
    """The release with the answer cells in ``fill`` (grade_ids) taken from the solution, and
    the cells in ``answers`` ({grade_id: source}) replaced by that source."""
    model = {nbgrader_meta(c)["grade_id"]: model_answer(c.source)
             for c in solution.cells if nbgrader_meta(c).get("solution")}
    notebook = copy.deepcopy(release)
    fill = set(fill)
    for cell in notebook.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if answers and grade_id in answers:
            cell.source = answers[grade_id]
        elif nbgrader_meta(cell).get("solution") and grade_id in fill:
            cell.source = model[grade_id]
    return notebook


def model_submission(release: Any, solution: Any) -> Any:
    """Every answer (code and written) taken from the solution."""
    every = [nbgrader_meta(c)["grade_id"] for c in solution.cells
             if nbgrader_meta(c).get("solution")]
    return submission(release, solution, fill=every)


def submission_kinds(release: Any, solution: Any) -> dict[str, Any]:
    """``full`` (every answer), ``untouched`` (the release) and ``partial`` (the first code
    answer only)."""
    first = [nbgrader_meta(c)["grade_id"] for c in solution.cells if is_code_answer(c)][:1]
    return {"full": model_submission(release, solution), "untouched": release,
            "partial": submission(release, solution, fill=first)}
