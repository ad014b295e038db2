"""The students' self-check: one command and one notebook cell, with a real exit status.

``nbgrader validate`` exits 0 even when a test fails. ``python -m bncore.check NOTEBOOK`` runs
the notebook as the grader does (every cell but the tests in a fresh kernel, the visible tests
in the checker's process), lists every test cell with its points and its number as JupyterLab
shows it, and exits 1 when one fails; ``self_check("<assignment>")`` does the same from the
notebook's last cell, whatever the file is called, and checks the live kernel where there is
no file (Colab). Run here on chapter 3's notebook: the solution passes, the release and a
partly answered notebook fail, and the summary counts the checks the notebook really has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from bncore.runner import is_test_cell, nbgrader_meta
from bngrade.submissions import group_one, model_submission, points, submission_kinds
from tests.course import ROOT

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

ASSIGNMENT = "ch3-forward-backward"
NAME = f"{ASSIGNMENT}.ipynb"
RENAMED = f"{ASSIGNMENT} (1).ipynb"  # what a browser saves on a second download


def check(path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NBGRADER_EXECUTION",
                                                           "BNCORE_SELF_CHECK")}
    return subprocess.run([sys.executable, "-m", "bncore.check", *extra, str(path)],
                          capture_output=True, text=True, timeout=600, cwd=path.parent, env=env)


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    """The model answer, the release and a partial answer (the first answer only), each alone
    in a folder under the name a second download gets."""
    release = nbformat.read(ROOT / "exercises" / ASSIGNMENT / NAME, as_version=4)
    solution = nbformat.read(ROOT / "solutions" / ASSIGNMENT / NAME, as_version=4)
    made = {}
    kinds = submission_kinds(release, solution)
    for kind in ("full", "untouched", "partial"):
        folder = tmp_path_factory.mktemp(kind)
        nbformat.write(kinds[kind], folder / RENAMED)
        made[kind] = folder / RENAMED
    made["tests"] = [nbgrader_meta(c)["grade_id"] for c in solution.cells if is_test_cell(c)]
    made["solution"], made["release"] = solution, release
    return made


def test_check_passes_on_a_correct_notebook_whatever_its_name(notebooks):
    done = check(notebooks["full"])
    assert done.returncode == 0, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"{len(tests)} of {len(tests)} checks passed" in done.stdout
    for grade_id in tests:
        assert f"passed  {grade_id}" in done.stdout
    # The numbers JupyterLab shows after Restart Kernel and Run All Cells: code cells only.
    release = notebooks["release"]
    code = [c for c in release.cells if c.cell_type == "code"]
    first = next(i for i, c in enumerate(code, 1) if is_test_cell(c))
    assert f"{tests[0]}" in done.stdout and f"cell [{first}]" in done.stdout


def test_check_fails_on_the_release_and_says_what_is_missing(notebooks):
    done = check(notebooks["untouched"])
    assert done.returncode == 1, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"0 of {len(tests)} checks passed" in done.stdout
    assert "batchnorm_forward is not written yet" in done.stdout


def test_check_fails_on_a_partial_answer_and_counts_the_passing_checks(notebooks):
    """Only the first answer is written: the checks of group 1 pass, the others fail."""
    group = group_one(notebooks["solution"])
    done = check(notebooks["partial"])
    assert done.returncode == 1, done.stdout + done.stderr
    tests = notebooks["tests"]
    assert f"{len(group)} of {len(tests)} checks passed ({points(group):g} of" in done.stdout
    for cell in group:
        assert f"passed  {nbgrader_meta(cell)['grade_id']}" in done.stdout
    assert "FAILED" in done.stdout


def test_check_warns_about_an_edited_test(notebooks, tmp_path):
    nb = nbformat.read(notebooks["full"], as_version=4)
    test = next(c for c in nb.cells if is_test_cell(c))
    test.source = "pass"
    nbformat.write(nb, tmp_path / NAME)
    done = check(tmp_path / NAME)
    assert f"{nbgrader_meta(test)['grade_id']} differs from the release" in done.stdout


def test_check_reports_json_for_tools(notebooks):
    done = check(notebooks["partial"], "--json")
    found = json.loads(done.stdout)
    assert done.returncode == 1 and found["passed"] is False
    assert [c["grade_id"] for c in found["checks"]] == notebooks["tests"]


def test_a_missing_notebook_exits_2(tmp_path):
    assert check(tmp_path / "nothing.ipynb").returncode == 2


def run_all(nb, folder: Path) -> tuple[str, list[str]]:
    """Execute a notebook top to bottom in ``folder`` as a student does (Run All); what its
    last cell (the self-check) printed, and the errors it raised."""
    from nbclient import NotebookClient

    env_before = {k: os.environ.pop(k) for k in ("NBGRADER_EXECUTION", "BNCORE_SELF_CHECK")
                  if k in os.environ}
    try:
        NotebookClient(nb, timeout=300, allow_errors=True,
                       resources={"metadata": {"path": str(folder)}}
                       ).execute(stderr=subprocess.DEVNULL)
    finally:
        os.environ.update(env_before)
    outputs = nb.cells[-1].outputs
    return ("".join(o.get("text", "") for o in outputs),
            [o.ename for o in outputs if o.output_type == "error"])


def test_the_self_check_cell_finds_its_notebook_whatever_its_name(notebooks):
    tests = notebooks["tests"]
    nb = nbformat.read(notebooks["full"], as_version=4)
    assert f'self_check("{ASSIGNMENT}")' in nb.cells[-1].source
    text, errors = run_all(nb, notebooks["full"].parent)
    assert f"Checking {RENAMED}" in text, text
    assert f"{len(tests)} of {len(tests)} checks passed" in text and not errors, text
    text, errors = run_all(nbformat.read(notebooks["partial"], as_version=4),
                           notebooks["partial"].parent)
    assert "checks passed" in text and errors == ["AssertionError"], text


def test_without_a_file_the_self_check_checks_the_kernel_and_says_so(notebooks, tmp_path):
    """As in Colab: the notebook is not a file in the working folder."""
    tests = notebooks["tests"]
    text, errors = run_all(model_submission(notebooks["release"], notebooks["solution"]),
                           tmp_path)
    assert "checks the kernel as it is now" in text, text
    assert f"{len(tests)} of {len(tests)} checks passed" in text and not errors, text
    text, errors = run_all(nbformat.read(notebooks["untouched"], as_version=4), tmp_path)
    assert "0 of" in text and errors == ["AssertionError"], text


def test_of_several_copies_the_one_this_kernel_ran_is_checked(notebooks, tmp_path):
    """Two downloads of the same assignment in one folder: the self-check checks the copy whose
    cells the kernel ran, and names the other."""
    full = nbformat.read(notebooks["full"], as_version=4)
    nbformat.write(full, tmp_path / RENAMED)
    nbformat.write(nbformat.read(notebooks["untouched"], as_version=4), tmp_path / NAME)
    os.utime(tmp_path / NAME)  # the untouched copy is the most recently saved
    text, errors = run_all(full, tmp_path)
    assert f"Checking {RENAMED}" in text and f"not {NAME}" in text, text
    assert not errors, text


def test_self_check_stands_aside_while_grading(monkeypatch, capsys):
    from bncore.check import self_check

    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    self_check("no-such-notebook.ipynb")
    assert "self-check skipped" in capsys.readouterr().out
