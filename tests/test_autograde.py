"""The class runner (python -m bngrade.autograde): the same grades as nbgrader, in parallel.

A temporary course releases ch3-forward-backward and receives six submissions built by the rule
of bngrade.submissions (full, partial, untouched, two of each). Plain ``nbgrader autograde``
grades them one after another; the runner grades them on several workers; every grade and
comment in the two gradebooks must agree, and the scores must be the rule's (full marks,
group 1's points, zero). A worker killed in the middle of a submission must cost that one
submission only, reported as failed, and running the command again must grade it. Submissions
that break the grader (a kernel that dies, a cell that never ends, a file that is not a
notebook) are reported, and the run goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import nbformat
import pytest

from bngrade.scan import scan_submission
from bngrade.submissions import autograded_points, group_one, points, submission_kinds
from tests.course import COURSE_ID, nbgrader, released_course, submit

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

ASSIGNMENT = "ch3-forward-backward"
NAME = f"{ASSIGNMENT}.ipynb"
KINDS = {"ada": "full", "bob": "partial", "cyd": "untouched",
         "dan": "full", "eve": "partial", "fay": "untouched"}


def test_digits_load_without_importing_scikit_learn():
    """Graded notebooks load the digits; importing scikit-learn for that took 0.7 s each."""
    code = ("import sys, numpy as np\n"
            "from bncore.data import digits\n"
            "split = digits()\n"
            "assert 'sklearn' not in sys.modules, 'digits() imported scikit-learn'\n"
            "from sklearn.datasets import load_digits\n"
            "from bncore.data import _split\n"
            "bunch = load_digits()\n"
            "ref = _split(bunch.data / 16.0, bunch.target.astype(np.int64), split.feature_names,"
            " 0.25, 0)\n"
            "for f in ('X_train', 'y_train', 'X_test', 'y_test'):\n"
            "    a, b = getattr(split, f), getattr(ref, f)\n"
            "    assert a.dtype == b.dtype and np.array_equal(a, b), f\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- a small class ---------------------------------------------------------------------------


def runner(course, *args, env=None):
    """python -m bngrade.autograde, run from the course root as an instructor would (the
    canary is left out: test_hostile.py tests it)."""
    return subprocess.run([sys.executable, "-m", "bngrade.autograde", "--no-canary", *args],
                          cwd=course,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A course with ch3 released (in its gradebook) and nothing submitted yet."""
    return released_course(tmp_path_factory.mktemp("released") / "course", names=[ASSIGNMENT])


@pytest.fixture(scope="module")
def notebooks(released):
    """The three kinds of submission, and the score each must get."""
    release = nbformat.read(released / "exercises" / ASSIGNMENT / NAME, as_version=4)
    solution = nbformat.read(released / "solutions" / ASSIGNMENT / NAME, as_version=4)
    kinds = submission_kinds(release, solution)
    expected = {"full": autograded_points(solution), "partial": points(group_one(solution)),
                "untouched": 0.0}
    return kinds, expected


def make_class(released, tmp_path, notebooks, name="course"):
    course = tmp_path / name
    shutil.copytree(released, course)
    for student, kind in KINDS.items():
        submit(course, student, ASSIGNMENT, notebooks[0][kind])
    return course


def gradebook(course) -> dict:
    """Every grade and comment of the course's gradebook, by (student, cell)."""
    from nbgrader.api import Gradebook

    found = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for sub in gb.find_assignment(ASSIGNMENT).submissions:
            student = sub.student.id
            found[(student, "score")] = sub.score
            for nb in sub.notebooks:
                for grade in nb.grades:
                    found[(student, grade.name, "grade")] = (
                        grade.auto_score, grade.manual_score, grade.needs_manual_grade)
                for comment in nb.comments:
                    found[(student, comment.name, "comment")] = comment.auto_comment
    return found


def assert_sound(course):
    """SQLite's own check of the gradebook file after several processes wrote it."""
    with sqlite3.connect(course / "gradebook.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def ledger(course) -> dict:
    last = {}
    for line in (course / ".grading" / "autograde" / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        last[entry["student"]] = entry
    return last


@pytest.fixture(scope="module")
def sequential(released, notebooks, tmp_path_factory):
    """The class graded by plain `nbgrader autograde`: its gradebook."""
    course = make_class(released, tmp_path_factory.mktemp("sequential"), notebooks)
    nbgrader("autograde", ASSIGNMENT, "--log-level=ERROR", cwd=course)
    return gradebook(course)


def assert_same_grades(found, reference, students=KINDS):
    for key, value in reference.items():
        if key[0] in students:
            assert key in found, f"{key} is missing from the gradebook"
            assert found[key] == value, f"{key}: {found[key]} here, {value} with plain nbgrader"


def assert_rule(found, expected, students=KINDS):
    for student in students:
        wanted = expected[KINDS[student]]
        assert found[(student, "score")] == pytest.approx(wanted), (
            f"{student} ({KINDS[student]}) scored {found[(student, 'score')]}, expected {wanted}")


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_grades_equal_plain_nbgrader(released, notebooks, sequential, tmp_path):
    course = make_class(released, tmp_path, notebooks)
    done = runner(course, ASSIGNMENT, "--jobs", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_sound(course)
    found = gradebook(course)
    assert len(found) == len(sequential)
    assert_same_grades(found, sequential)
    assert_rule(found, notebooks[1])
    for student in KINDS:
        assert (course / "autograded" / student / ASSIGNMENT / NAME).is_file()
    # Progress lines, then the table and the totals.
    out = done.stdout
    for i in range(1, len(KINDS) + 1):
        assert f"[student {i} of {len(KINDS)}]" in out, out
    assert f"{len(KINDS)} submission(s): {len(KINDS)} graded, 0 suspicious, 0 timed out, " \
           "0 failed." in out, out
    # Run again: everything is graded already, nothing is redone.
    again = runner(course, ASSIGNMENT)
    assert again.returncode == 0 and "Nothing to grade" in again.stdout, again.stdout
    # The standard nbgrader commands work on what the runner graded.
    nbgrader("generate_feedback", ASSIGNMENT, "--log-level=ERROR", cwd=course)
    nbgrader("export", "--log-level=ERROR", cwd=course)
    assert all((course / "feedback" / s / ASSIGNMENT).is_dir() for s in KINDS)


@pytest.mark.slow
def test_a_killed_worker_costs_one_submission_and_a_rerun_grades_it(
        released, notebooks, sequential, tmp_path):
    course = make_class(released, tmp_path, notebooks)
    victim = "bob"
    done = runner(course, ASSIGNMENT, "--jobs", "2", env={"BNGRADE_AUTOGRADE_KILL": victim})
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    line = next(line for line in out.splitlines() if f"] {victim} " in line)
    assert "failed" in line and "killed by SIGKILL" in line, line
    assert f"{len(KINDS)} submission(s): {len(KINDS) - 1} graded, 0 suspicious, 0 timed out, " \
           "1 failed." in out, out
    others = [s for s in KINDS if s != victim]
    assert_sound(course)
    found = gradebook(course)
    assert_same_grades(found, sequential, others)
    assert_rule(found, notebooks[1], others)
    assert ledger(course)[victim]["status"] == "failed"

    # The same command again grades the missing submission only.
    again = runner(course, ASSIGNMENT, "--jobs", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Grading 1 submission(s)" in again.stdout, again.stdout
    assert f"{len(KINDS) - 1} submission(s) already graded" in again.stdout, again.stdout
    found = gradebook(course)
    assert_same_grades(found, sequential)
    assert_rule(found, notebooks[1])


BREAKERS = {
    "kim": "import os\nos._exit(3)\n",  # the kernel dies
    "lou": "while True:\n    pass\n",  # a cell that never ends: stopped at the time limit
}


@pytest.mark.slow
def test_submissions_that_break_the_grader_are_reported(released, notebooks, tmp_path):
    course = tmp_path / "course"
    shutil.copytree(released, course)
    with (course / "nbgrader_config.py").open("a") as fh:
        fh.write("\nc.Execute.timeout = 3\n")
    full = notebooks[0]["full"]
    for student, code in {**BREAKERS, "max": None, "ned": "garbage"}.items():
        folder = course / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        if code == "garbage":
            (folder / NAME).write_text("{ this is not a notebook")
            continue
        nb = nbformat.from_dict(json.loads(json.dumps(full)))
        if code:  # a cell of the student's own, after the last test
            nb.cells.append(nbformat.v4.new_code_cell(code))
        nbformat.write(nb, folder / NAME)
    done = runner(course, ASSIGNMENT, "--jobs", "2")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    entries = ledger(course)
    status = {s: e["status"] for s, e in entries.items()}
    notes = {s: " ".join(e["notes"]) for s, e in entries.items()}
    assert set(status) == {"kim", "lou", "max", "ned"}, out
    # The scan flags kim's os._exit and lou's endless loop is timed out; max is clean.
    assert scan_submission(course / "submitted" / "max" / ASSIGNMENT / NAME) == []
    assert status["ned"] == "failed" and notes["ned"], entries["ned"]
    assert status["lou"] == "timed out", entries["lou"]
    assert status["max"] == "graded", entries["max"]
    # The course's executor survives a dying kernel: the submission is graded (the cells before
    # it count), marked suspicious (the scan sees os._exit), and the notes say the kernel died.
    assert status["kim"] == "suspicious", entries["kim"]
    assert "the kernel died in" in notes["kim"] and "exits the kernel" in notes["kim"], \
        entries["kim"]
    failed = sum(s == "failed" for s in status.values())
    assert "4 submission(s): " in out and f"{failed} failed." in out, out
    for student in status:
        line = next(line for line in out.splitlines() if f"] {student} " in line)
        assert status[student] in line, line
    # The cells before the endless loop and the dying kernel are graded as usual.
    found = gradebook(course)
    for student in ("max", "lou", "kim"):
        assert found[(student, "score")] == pytest.approx(notebooks[1]["full"]), student
