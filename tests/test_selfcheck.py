"""The students' self-check: one command, and one notebook cell, with a real exit status.

``nbgrader validate`` exits 0 even when a test fails. ``python -m bncore.grading check
NOTEBOOK`` runs the notebook in a fresh kernel, lists every test cell with its points, and exits
1 when one fails; ``self_check()`` does the same from the notebook's last cell and raises. Both
are run here on chapter 3's notebook: the solution passes, the release and a partly answered
notebook fail, and the summary counts the checks the notebook really has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from test_grading import is_code_answer, is_test, nbgrader_meta, points, submission

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "ch3-forward-backward"
NAME = f"{ASSIGNMENT}.ipynb"


def check(path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NBGRADER_EXECUTION",
                                                           "BNCORE_SELF_CHECK")}
    return subprocess.run([sys.executable, "-m", "bncore.grading", *extra, str(path)],
                          capture_output=True, text=True, timeout=600, cwd=path.parent, env=env)


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    """The solution, the release and a partial answer (the first answer only), each alone in
    a folder as a student has it."""
    release = nbformat.read(ROOT / "exercises" / ASSIGNMENT / NAME, as_version=4)
    solution = nbformat.read(ROOT / "solutions" / ASSIGNMENT / NAME, as_version=4)
    answers = [nbgrader_meta(c)["grade_id"] for c in solution.cells if is_code_answer(c)]
    everything = [nbgrader_meta(c)["grade_id"] for c in solution.cells
                  if nbgrader_meta(c).get("solution")]
    made = {}
    for kind, nb in [("full", submission(release, solution, fill=everything)),
                     ("release", release),
                     ("partial", submission(release, solution, fill=answers[:1]))]:
        folder = tmp_path_factory.mktemp(kind)
        nbformat.write(nb, folder / NAME)
        made[kind] = folder / NAME
    made["tests"] = [nbgrader_meta(c)["grade_id"] for c in solution.cells if is_test(c)]
    made["solution"] = solution
    return made


def test_check_passes_on_a_correct_notebook(notebooks):
    done = check(notebooks["full"], "check")
    assert done.returncode == 0, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"{len(tests)} of {len(tests)} checks passed" in done.stdout
    for grade_id in tests:
        assert f"passed  {grade_id}" in done.stdout


def test_check_fails_on_the_release(notebooks):
    done = check(notebooks["release"])  # the short form: python -m bncore.grading NOTEBOOK
    assert done.returncode == 1, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"0 of {len(tests)} checks passed" in done.stdout
    assert "NotImplementedError (a function it checks is not written yet)" in done.stdout


def test_check_fails_on_a_partial_answer_and_counts_the_passing_checks(notebooks):
    """Only the first answer is written: the checks of group 1 pass, the others fail."""
    solution = notebooks["solution"]
    answers = [i for i, c in enumerate(solution.cells) if is_code_answer(c)]
    group = [c for c in solution.cells[answers[0] + 1:answers[1]] if is_test(c)]
    done = check(notebooks["partial"], "check")
    assert done.returncode == 1, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"{len(group)} of {len(tests)} checks passed ({points(group):g} of" in done.stdout
    for cell in group:
        assert f"passed  {nbgrader_meta(cell)['grade_id']}" in done.stdout
    assert "FAILED" in done.stdout


def test_check_warns_about_an_edited_test(notebooks, tmp_path):
    nb = nbformat.read(notebooks["full"], as_version=4)
    test = next(c for c in nb.cells if is_test(c))
    test.source = "pass"
    nbformat.write(nb, tmp_path / NAME)
    done = check(tmp_path / NAME, "check")
    assert f"{nbgrader_meta(test)['grade_id']} differs from the release" in done.stdout


def test_self_check_cell_runs_the_check_from_inside_the_notebook(notebooks):
    """Execute the notebooks top to bottom as a student does (Run All): their last cell,
    self_check(...), reports and turns red on the partial answer, and passes on the full one."""
    from nbclient import NotebookClient

    results = {}
    for kind in ("full", "partial"):
        nb = nbformat.read(notebooks[kind], as_version=4)
        assert "self_check(" in nb.cells[-1].source, "the notebook ends with its self-check"
        env_before = {k: os.environ.pop(k) for k in ("NBGRADER_EXECUTION", "BNCORE_SELF_CHECK")
                      if k in os.environ}
        try:
            NotebookClient(nb, timeout=300, allow_errors=True,
                           resources={"metadata": {"path": str(notebooks[kind].parent)}}
                           ).execute(stderr=subprocess.DEVNULL)
        finally:
            os.environ.update(env_before)
        outputs = nb.cells[-1].outputs
        results[kind] = ("".join(o.get("text", "") for o in outputs),
                         [o.ename for o in outputs if o.output_type == "error"])
    text, errors = results["full"]
    tests = notebooks["tests"]
    assert f"{len(tests)} of {len(tests)} checks passed" in text and not errors, results["full"]
    text, errors = results["partial"]
    assert "checks passed" in text and errors == ["AssertionError"], results["partial"]


def test_self_check_stands_aside_while_grading(monkeypatch, capsys):
    from bncore.grading import self_check

    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert self_check("no-such-notebook.ipynb") is True
    assert "self-check skipped" in capsys.readouterr().out
