"""The answers graded by hand: ``python -m bngrade written ASSIGNMENT [--score ...]``.

Lists every written answer with its student, cell and points, and records a grade and a comment
for the feedback, as nbgrader's formgrader does, from a terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bncore.runner import nbgrader_meta
from bngrade.course import course_directory


def written_answers(assignment: str, *, root: Path | str = ".", pending_only: bool = False
                    ) -> list[dict[str, Any]]:
    """The answers of ``assignment`` graded by hand, one dict per student and cell: student,
    notebook, cell (grade_id), points, score (None until graded), answer (the student's text,
    from the autograded notebook)."""
    import nbformat
    from nbgrader.api import Gradebook

    coursedir = course_directory(root)
    found = []
    with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
        for submission in sorted(gb.assignment_submissions(assignment),
                                 key=lambda s: s.student.id):
            for notebook in submission.notebooks:
                path = Path(coursedir.format_path(coursedir.autograded_directory,
                                                  submission.student.id, assignment))
                path = path / f"{notebook.name}.ipynb"
                cells = ({nbgrader_meta(c).get("grade_id"): c.source
                          for c in nbformat.read(path, as_version=4).cells}
                         if path.exists() else {})
                for grade in notebook.grades:
                    if grade.cell.cell_type != "markdown" and grade.auto_score is not None:
                        continue
                    if pending_only and not grade.needs_manual_grade:
                        continue
                    found.append({"student": submission.student.id, "notebook": notebook.name,
                                  "cell": grade.name, "points": grade.max_score,
                                  "score": grade.manual_score,
                                  "answer": cells.get(grade.name, "")})
    return found


def set_written_score(assignment: str, student: str, cell: str, points: float,
                      comment: str | None = None, *, notebook: str | None = None,
                      root: Path | str = ".") -> None:
    """Record a hand-given grade (and a comment for the student's feedback), as the formgrader
    does."""
    from nbgrader.api import Gradebook

    coursedir = course_directory(root)
    notebook = notebook or assignment
    with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
        grade = gb.find_grade(cell, notebook, assignment, student)
        if not 0 <= points <= grade.max_score:
            raise ValueError(f"{cell} is worth 0 to {grade.max_score:g} points, not {points:g}")
        grade.manual_score = float(points)
        grade.needs_manual_grade = False
        if comment is not None:
            gb.find_comment(cell, notebook, assignment, student).manual_comment = comment
        gb.db.commit()


