"""The grader's record of how a notebook ran: written into the autograded notebook
(``metadata.bncore.grading``) by :class:`StoreGradingReport`, read by :func:`grading_problems`.

:class:`bngrade.execute.GradingExecute` records the cells that timed out, a kernel that died
and the cells it left unrun, output cut off, the cells skipped while grading (``skip-when-
checked``), the test cells whose visible checks failed, and the CPU seconds of a warm kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbgrader.preprocessors import NbGraderPreprocessor


class StoreGradingReport(NbGraderPreprocessor):
    """Writes what GradingExecute recorded into the autograded notebook's metadata; runs after
    nbconvert's ClearMetadataPreprocessor."""

    def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
        report = resources.get("bncore", {}).get("grading")
        if report is not None:
            nb.metadata.setdefault("bncore", {})["grading"] = report
        return nb, resources


def grading_record(path: str | Path) -> dict[str, Any]:
    """What GradingExecute recorded in an autograded notebook (empty when nothing)."""
    import nbformat

    return nbformat.read(Path(path), as_version=4).metadata.get("bncore", {}).get("grading", {})


def timed_out(autograded_notebook_path: str | Path) -> bool:
    """Whether a cell of an autograded notebook ran past the per-cell time limit."""
    return bool(grading_record(autograded_notebook_path).get("timed_out"))


def grading_problems(autograded_notebook_path: str | Path) -> list[str]:
    """What went wrong while an autograded notebook ran (empty when nothing did): cells that
    timed out, a kernel that died and the cells it left unrun, output cut off, test cells that
    could not reach the notebook (its code broke its end of the channel)."""
    return problems_in(grading_record(autograded_notebook_path))


def problems_in(report: dict[str, Any]) -> list[str]:
    """:func:`grading_problems` of a record already read."""
    problems = [f"timed out: {cell}" for cell in report.get("timed_out", [])]
    if report.get("kernel_died"):
        problems.append(f"the kernel died in {report['kernel_died']}")
    problems += [f"not run: {cell}" for cell in report.get("not_run", [])]
    problems += [f"output truncated: {cell}" for cell in report.get("output_truncated", [])]
    problems += [f"the tests could not reach the notebook in {cell}"
                 for cell in report.get("unreachable", [])]
    return list(dict.fromkeys(problems))
