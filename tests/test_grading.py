"""Grading: the nbgrader round trip for every assignment, through the real nbgrader commands.

For each assignment under solutions/, a temporary copy of the course gets four submissions:

- ``full``: the release with every answer filled in from the solution: full autograded marks;
- ``untouched``: the release as students get it: zero;
- ``partial``: only the first code answer filled in (the generic rule of the course's graded
  notebooks): exactly the points of group 1, the test cells between the first and the second
  code answer, read from the notebook's metadata (bngrade.submissions);
- ``cheater`` (where ``CHEATS`` has answers for the assignment): answers that call bncore's
  reference implementation, which the notebook's kernel cannot import while it is graded: no
  points.

Then the feedback (HTML with the score, without hidden test code) and the grade CSV are
checked against the gradebook, and the honest submissions must leave the grader nothing to
report (``bngrade.report.grading_problems``) and the scan nothing to flag.

``test_instructor_workflow`` runs every command of book/instructors.md on a small class, from a
Canvas download to the grade CSV. The hostile submissions and the valid alternatives are in
test_hostile.py, the students' self-check in test_selfcheck.py.
"""

from __future__ import annotations

import ast
import csv
import re
import shutil
import subprocess
import sys
import time

import nbformat
import numpy as np
import pytest

from bncore.runner import (
    BEGIN_HIDDEN,
    SKIP_TAG,
    is_setup_cell,
    is_test_cell,
    nbgrader_meta,
    split_hidden,
)
from bngrade.asserts import assert_close
from bngrade.course import nbgrader_command
from bngrade.feedback import HideHiddenTests
from bngrade.report import grading_problems, timed_out
from bngrade.scan import scan_submission
from bngrade.submissions import (
    autograded_points,
    group_one,
    is_code_answer,
    points,
    submission,
    submission_kinds,
)
from tests.course import (
    ASSIGNMENTS,
    COURSE_ID,
    ROOT,
    hidden_lines,
    nbgrader,
    released_course,
    submit,
    visible_text,
)

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

# Answers that call bncore instead of computing, by assignment and answer cell (grade_id):
# directly, through an alias, and through a second copy of the module loaded from its file.
CHEATS = {
    "ch3-forward-backward": {
        "forward": (
            "import bncore.numpy as bn\n\n\n"
            "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
            "    return bn.batch_norm_forward(x, gamma, beta, eps=eps)\n"
        ),
        "backward": (
            "from bncore.numpy import batch_norm_backward as reference_backward\n\n\n"
            "def batchnorm_backward(dout, cache):\n"
            "    return reference_backward(dout, cache)\n"
        ),
        "backward_alt": (
            "import importlib.util\n\nimport bncore\n\n"
            "spec = importlib.util.spec_from_file_location(\n"
            "    'my_bn', bncore.__path__[0] + '/numpy.py')\n"
            "my_bn = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(my_bn)\n\n\n"
            "def batchnorm_backward_alt(dout, cache):\n"
            "    return my_bn.batch_norm_backward(dout, cache)\n"
        ),
    },
}


# --- fast checks of the notebooks' conventions and of the grader's helpers -----------------


def answer_names(notebook) -> set[str]:
    """The functions and classes the answer cells define."""
    names = set()
    for cell in notebook.cells:
        if is_code_answer(cell):
            tree = ast.parse(cell.source)
            names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef,
                                                                  ast.ClassDef))}
    return names


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_every_assignment_follows_the_conventions(assignment):
    path = ROOT / "solutions" / assignment / f"{assignment}.ipynb"
    assert path.exists(), f"solutions/{assignment}/ must hold {assignment}.ipynb"
    nb = nbformat.read(path, as_version=4)
    group = group_one(nb)
    assert points(group) > 0, f"{assignment}: group 1 (first answer's tests) has no points"
    assert points(group) < autograded_points(nb), f"{assignment}: nothing after group 1"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and nbgrader_meta(first).get("locked"), (
        "the first cell is a locked markdown cell (title, points, how to check)")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nbgrader_meta(code[0]).get("grade_id") == "bootstrap", "first: the set-up cell"
    setup = [c for c in nb.cells if is_setup_cell(c)]
    assert len(setup) == 1 and "from bncore.check import nb" in setup[0].source
    last = code[-1]
    assert f'self_check("{assignment}")' in last.source and SKIP_TAG in last.metadata["tags"]
    assert nb.metadata["bncore"]["assignment"] == assignment
    # Test cells reach the student's functions through nb only (they run outside the kernel),
    # and every test cell has hidden tests.
    names = answer_names(nb)
    for cell in nb.cells:
        if not is_test_cell(cell):
            continue
        grade_id = nbgrader_meta(cell)["grade_id"]
        visible, hidden = split_hidden(cell.source)
        assert hidden.strip(), f"{grade_id} has no hidden tests"
        for part in (visible, hidden):
            tree = ast.parse(part)
            defined = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                       and isinstance(n.ctx, ast.Store)}
            bare = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)} & (names - defined)
            assert not bare, f"{grade_id} uses {sorted(bare)} without nb."


def test_assert_close_names_the_matching_mistake():
    expected = np.arange(4.0)
    assert_close("y", expected + 1e-12, expected)
    with pytest.raises(AssertionError, match="forgot the offset"):
        assert_close("y", expected - 1, expected, mistakes=[("forgot the offset", expected - 1)])
    with pytest.raises(AssertionError, match="summed over axis 1"):
        assert_close("g", np.zeros(3), expected, mistakes=[("summed over axis 1", np.zeros(3))])
    with pytest.raises(AssertionError, match="float32, expected float64"):
        assert_close("y", expected.astype(np.float32), expected)
    with pytest.raises(AssertionError, match="largest error"):
        assert_close("y", expected * 2, expected)


def test_hide_hidden_tests_removes_code_and_tracebacks():
    cell = nbformat.v4.new_code_cell(
        "assert f(1) == 1\n### BEGIN HIDDEN TESTS\nassert f(2) == 4, 'f(2) is wrong'\n"
        "### END HIDDEN TESTS",
        metadata={"nbgrader": {"grade": True, "solution": False, "locked": True,
                               "grade_id": "t", "points": 1, "schema_version": 3}})
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout",
                               text="called from:\nassert f(2) == 4, 'f(2) is wrong'\n"),
        nbformat.v4.new_output(
            "error", ename="AssertionError", evalue="f(2) is wrong",
            traceback=["----> 3 assert f(2) == 4, 'f(2) is wrong'",
                       "AssertionError: f(2) is wrong"]),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb, _ = HideHiddenTests().preprocess(nb, {})
    assert nb.cells[0].source == "assert f(1) == 1"
    printed, error = nb.cells[0].outputs
    assert "called from:" in printed.text and "assert f(2)" not in printed.text
    shown = "\n".join(error.traceback)
    assert "f(2) is wrong" in shown and "assert f(2)" not in shown


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_round_trip(assignment, tmp_path, capsys):
    from nbgrader.api import Gradebook

    name = f"{assignment}.ipynb"
    # The release as students get it: the committed one (test_exercises_in_sync.py checks that
    # it is what nbgrader generates). generate_assignment also records the assignment's cells
    # in the gradebook, which autograde needs.
    committed = ROOT / "exercises" / assignment / name
    course = released_course(tmp_path / "course", names=[assignment])
    release = nbformat.read(committed if committed.exists()
                            else course / "exercises" / assignment / name, as_version=4)
    solution = nbformat.read(course / "solutions" / assignment / name, as_version=4)
    students = submission_kinds(release, solution)
    if assignment in CHEATS:
        students["cheater"] = submission(release, solution, answers=CHEATS[assignment])
    for student, nb in students.items():
        submit(course, student, assignment, nb)

    start = time.perf_counter()
    nbgrader("autograde", assignment, cwd=course)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{assignment}: autograde of {len(students)} notebooks took {seconds:.1f} s "
              f"({seconds / len(students):.1f} s per notebook)")

    total = autograded_points(solution)
    expected = {"full": total, "untouched": 0.0, "partial": points(group_one(solution))}
    hidden_cells = [nbgrader_meta(c)["grade_id"] for c in solution.cells
                    if is_test_cell(c) and BEGIN_HIDDEN in c.source]
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        scores = {s: gb.find_submission(assignment, s).score for s in students}
        max_score = gb.find_assignment(assignment).max_score
        cheat_grades = {g: gb.find_grade(g, assignment, assignment, "cheater").score
                        for g in hidden_cells} if "cheater" in students else {}
    with capsys.disabled():
        print(f"{assignment}: scores {scores} of {total} autograded points "
              f"({max_score} with the hand-graded ones)")
    for student, wanted in expected.items():
        assert scores[student] == pytest.approx(wanted), (
            f"{assignment}: {student} scored {scores[student]}, expected {wanted} "
            f"(autograded total {total})")
        # An honest submission: nothing for the grader to undo or report, nothing suspicious.
        graded = course / "autograded" / student / assignment / name
        problems = grading_problems(graded)
        assert problems == [], (student, problems)
        assert not timed_out(graded)
        submitted = course / "submitted" / student / assignment / name
        found = scan_submission(submitted)
        assert found == [], (student, found)
    if cheat_grades:
        assert not any(cheat_grades.values()), (
            f"{assignment}: answers calling bncore earned hidden-test points: {cheat_grades}")
        # ... because the reference cannot be imported, not for some unrelated error.
        graded = nbformat.read(course / "autograded" / "cheater" / assignment / name, 4)
        refused = "cannot be imported while this notebook is"
        answer_errors = [o.evalue for c in graded.cells if is_code_answer(c)
                         for o in c.outputs if o.output_type == "error"]
        assert len(answer_errors) == 3 and all(refused in e for e in answer_errors), (
            answer_errors)

    # A student checking the correct notebook with nbgrader validate sees it pass.
    out = nbgrader("validate", f"submitted/full/{assignment}/{name}", cwd=course)
    assert "Success! Your notebook passes all the tests." in out, out

    # Feedback: one HTML page per student, with the score and without hidden test code.
    nbgrader("generate_feedback", assignment, cwd=course)
    secret = hidden_lines(solution, release)
    autograded = "\n".join(cell.source for cell in nbformat.read(
        course / "autograded" / "full" / assignment / name, as_version=4).cells)
    assert BEGIN_HIDDEN not in "".join(c.source for c in release.cells)
    if hidden_cells:  # the check below finds hidden code where there is some
        assert secret and all(line in autograded for line in secret)
    for student, score in scores.items():
        page = course / "feedback" / student / assignment / f"{assignment}.html"
        assert page.exists(), f"no feedback for {student}"
        text = visible_text(page.read_text())
        header = f"(Score: {round(float(score), 2)} / {round(float(max_score), 2)})"
        assert header in text, f"{student}'s feedback does not show {header}"
        leaked = sorted(line for line in secret if line in text)
        assert not leaked, f"{student}'s feedback shows hidden test code: {leaked[:3]}"
        assert BEGIN_HIDDEN not in text

    # The grade CSV agrees with the gradebook.
    nbgrader("export", cwd=course)
    with open(course / "grades.csv", newline="") as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh)
                if row["assignment"] == assignment}
    assert set(rows) == set(students)
    for student, score in scores.items():
        assert float(rows[student]["score"]) == pytest.approx(score)
        assert float(rows[student]["max_score"]) == pytest.approx(max_score)


@pytest.mark.slow
@pytest.mark.parametrize("secret", ["another course", "another term"])
def test_the_model_solutions_pass_whatever_the_course_secret(secret, monkeypatch):
    """Hidden inputs change with the course's secret; correct answers pass with any of them."""
    from bngrade.canary import grade_solutions

    monkeypatch.setenv("BNGRADE_SECRET", secret)
    results = grade_solutions(ASSIGNMENTS, ROOT)
    assert all(r.ok for r in results), "\n".join(r.describe() for r in results if not r.ok)


# --- the instructor's workflow, as book/instructors.md gives it ------------------------------

WORKFLOW_ASSIGNMENT = "ch3-forward-backward"
# Every command of the instructors' page, in its order; the test runs each one.
WORKFLOW = [
    "python -m bngrade.sandbox check",
    "nbgrader generate_assignment ch3-forward-backward --force",
    "nbgrader db student import students.csv",
    "nbgrader zip_collect ch3-forward-backward",
    "python -m bngrade scan submitted/*/ch3-forward-backward/ch3-forward-backward.ipynb",
    "python -m bngrade canary ch3-forward-backward",
    "python -m bngrade.autograde ch3-forward-backward",
    "python -m bngrade similarity ch3-forward-backward",
    "python -m bngrade written ch3-forward-backward",
    "python -m bngrade written ch3-forward-backward --score 1001 written_jacobian 2 "
    '--comment "Clear and complete."',
    "nbgrader generate_feedback ch3-forward-backward",
    "nbgrader export",
]


def test_instructors_page_gives_the_tested_commands():
    page = (ROOT / "book" / "instructors.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", page, flags=re.S))
    blocks = re.sub(r" \\\n\s+", " ", blocks)  # a command continued on the next line
    for command in WORKFLOW:
        assert command in blocks, f"book/instructors.md does not give: {command}"
    positions = [blocks.index(command) for command in WORKFLOW]
    assert positions == sorted(positions), "the page gives the commands in another order"


@pytest.mark.slow
def test_instructor_workflow(tmp_path, capsys):
    """Release, class list, zip_collect from a Canvas download, scan, autograde the class,
    grade a written answer, feedback, export: each command of book/instructors.md, for real."""
    import glob
    import shlex
    import zipfile

    from nbgrader.api import Gradebook

    assignment, name = WORKFLOW_ASSIGNMENT, f"{WORKFLOW_ASSIGNMENT}.ipynb"
    course = tmp_path / "course"
    (course / "solutions").mkdir(parents=True)
    shutil.copytree(ROOT / "solutions" / assignment, course / "solutions" / assignment)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    (course / "students.csv").write_text(
        "id,first_name,last_name,email\n1001,Jane,Doe,\n1002,Bob,Roe,\n1003,Ann,Poe,\n")
    release = nbformat.read(ROOT / "exercises" / assignment / name, as_version=4)
    solution = nbformat.read(ROOT / "solutions" / assignment / name, as_version=4)
    kinds = submission_kinds(release, solution)
    archive = course / "downloaded" / assignment / "archive"
    archive.mkdir(parents=True)
    with zipfile.ZipFile(archive / "canvas-download.zip", "w") as zf:  # as Canvas names them
        zf.writestr(f"doejane_1001_5001_{name}",
                    nbformat.writes(kinds["full"]))
        zf.writestr(f"roebob_LATE_1002_5002_{assignment}-1.ipynb",
                    nbformat.writes(kinds["partial"]))

    outputs = {}
    for command in WORKFLOW:
        args = shlex.split(command)
        if args[0] == "python":
            args = [sys.executable, *args[1:]]
        elif args[0] == "nbgrader":
            args = [*nbgrader_command(), *args[1:]]
        args = [a for arg in args
                for a in (sorted(glob.glob(arg, root_dir=course)) if "*" in arg else [arg])]
        t0 = time.perf_counter()
        done = subprocess.run(args, cwd=course, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
        outputs[command] = done.stdout + done.stderr
        with capsys.disabled():
            print(f"{command[:60]:60s} {time.perf_counter() - t0:5.1f} s")

    for student in ("1001", "1002"):
        assert (course / "submitted" / student / assignment / name).exists()
    assert outputs[WORKFLOW[4]].count(": clean") == 2
    assert f"canary: {assignment}: the solution earns" in outputs[WORKFLOW[5]]
    summary = outputs[WORKFLOW[6]]
    assert "2 graded" in summary and "0 failed" in summary, summary
    similar = outputs[WORKFLOW[7]]  # Jane's answers are the model's, word for word
    assert "1001" in similar and "the model solution" in similar, similar
    assert (course / ".grading" / f"similarity-{assignment}.csv").is_file()
    listing = outputs[WORKFLOW[8]]
    assert "1001" in listing and "1002" in listing and "written_jacobian" in listing

    total = autograded_points(solution)
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        written = gb.find_grade("written_jacobian", assignment, assignment, "1001")
        assert written.manual_score == 2 and not written.needs_manual_grade
        scores = {s: gb.find_submission(assignment, s).score for s in ("1001", "1002")}
        max_score = gb.find_assignment(assignment).max_score
    assert scores == {"1001": pytest.approx(total + 2),
                      "1002": pytest.approx(points(group_one(solution)))}
    page = visible_text((course / "feedback" / "1001" / assignment
                         / f"{assignment}.html").read_text())
    assert "Clear and complete." in page
    assert f"(Score: {round(total + 2, 2)} / {round(float(max_score), 2)})" in page
    with open(course / "grades.csv", newline="") as fh:
        rows = {r["student_id"]: r for r in csv.DictReader(fh) if r["assignment"] == assignment}
    assert set(rows) == {"1001", "1002", "1003"}
    assert float(rows["1001"]["score"]) == pytest.approx(total + 2)
    assert float(rows["1003"]["score"]) == 0
