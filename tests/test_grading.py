"""Grading: the nbgrader round trip for every assignment, through the real nbgrader commands.

For each assignment under solutions/, a temporary copy of the course gets four submissions:

- ``full``: the release with every answer filled in from the solution: full autograded marks;
- ``untouched``: the release as students get it: zero;
- ``partial``: only the first code answer filled in (the generic rule of the course's graded
  notebooks): exactly the points of group 1, the test cells between the first and the second
  code answer, read from the notebook's metadata;
- ``cheater`` (where ``CHEATS`` has answers for the assignment): answers that call bncore's
  reference implementation: no points from any test cell that holds hidden tests.

Then the feedback (HTML with the score, without hidden test code) and the grade CSV are
checked against the gradebook, and the honest submissions must leave the grader nothing to
report (``bncore.grading.grading_problems``) and the scan nothing to flag. The helpers at the
top of this file are the rule itself.

``test_instructor_workflow`` runs every command of book/instructors.md on a small class, from a
Canvas download to the grade CSV. The hostile submissions are in test_hostile.py, the students'
self-check in test_selfcheck.py.
"""

from __future__ import annotations

import copy
import csv
import html
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

from bncore import grading
from bncore.grading import BEGIN_HIDDEN, assert_close, reference_forbidden

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = grading.assignments(ROOT)
COURSE_ID = "batchnorm-course"

# Answers that call bncore instead of computing, by assignment and answer cell (grade_id):
# directly, through an alias, and through a second copy of the module loaded from its file.
# Other assignments can add theirs; without an entry, the round trip has three submissions.
CHEATS = {
    "ch3-forward-backward": {
        # ... and prints the code that calls it, hidden tests included (feedback must not).
        "forward": (
            "import linecache\nimport sys\n\nimport bncore.numpy as bn\n\n\n"
            "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
            "    print(''.join(linecache.getlines(sys._getframe(1).f_code.co_filename)))\n"
            "    return bn.batch_norm_forward(x, gamma, beta, eps=eps)\n"
        ),
        "backward": (
            "from bncore.numpy import batch_norm_backward as reference_backward\n\n\n"
            "def batchnorm_backward(dout, cache):\n"
            "    return reference_backward(dout, cache)\n"
        ),
        "backward_alt": (
            "import importlib.util\n\nimport bncore.numpy\n\n"
            "spec = importlib.util.spec_from_file_location('my_bn', bncore.numpy.__file__)\n"
            "my_bn = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(my_bn)\n\n\n"
            "def batchnorm_backward_alt(dout, cache):\n"
            "    return my_bn.batch_norm_backward(dout, cache)\n"
        ),
    },
}


# --- the rule, read from a notebook's nbgrader metadata --------------------------------------


def nbgrader_meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def is_code_answer(cell) -> bool:
    return cell.cell_type == "code" and nbgrader_meta(cell).get("solution", False)


def is_test(cell) -> bool:
    """An autograded test cell: graded, not an answer."""
    meta = nbgrader_meta(cell)
    return meta.get("grade", False) and not meta.get("solution", False)


def autograded_points(nb) -> float:
    return sum(float(nbgrader_meta(c).get("points", 0)) for c in nb.cells if is_test(c))


def group_one(nb) -> list:
    """The test cells after the first code answer and before the second one (or the end)."""
    answers = [i for i, cell in enumerate(nb.cells) if is_code_answer(cell)]
    assert answers, "the notebook has no code answer cell"
    end = answers[1] if len(answers) > 1 else len(nb.cells)
    return [cell for cell in nb.cells[answers[0] + 1:end] if is_test(cell)]


def points(cells) -> float:
    return sum(float(nbgrader_meta(c).get("points", 0)) for c in cells)


def model_answer(source: str) -> str:
    """The answer a student would write: the solution cell without nbgrader's markers."""
    return "\n".join(line for line in source.split("\n")
                     if "BEGIN SOLUTION" not in line and "END SOLUTION" not in line)


def submission(release, solution, fill=(), answers=None):
    """The release with the answer cells in ``fill`` (grade_ids) taken from the solution, and
    the cells in ``answers`` ({grade_id: source}) replaced by that source."""
    model = {nbgrader_meta(c)["grade_id"]: model_answer(c.source)
             for c in solution.cells if nbgrader_meta(c).get("solution")}
    nb = copy.deepcopy(release)
    for cell in nb.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if answers and grade_id in answers:
            cell.source = answers[grade_id]
        elif nbgrader_meta(cell).get("solution") and grade_id in fill:
            cell.source = model[grade_id]
    return nb


def submission_kinds(release, solution) -> dict:
    """The three submissions every assignment is graded on: ``full`` (every answer from the
    solution), ``untouched`` (the release) and ``partial`` (only the first code answer, the
    course's generic partial-credit rule)."""
    first = [nbgrader_meta(c)["grade_id"] for c in solution.cells if is_code_answer(c)][:1]
    every = [nbgrader_meta(c)["grade_id"] for c in solution.cells
             if nbgrader_meta(c).get("solution")]
    return {"full": submission(release, solution, fill=every),
            "untouched": release,
            "partial": submission(release, solution, fill=first)}


def hidden_lines(solution, release) -> set[str]:
    """Lines of hidden test code that appear nowhere in the release, and so must never appear
    in feedback. String-literal lines are left out: a test's message is meant to be shown."""
    shown = "\n".join(cell.source for cell in release.cells)
    found = set()
    for cell in solution.cells:
        inside = False
        for line in cell.source.split("\n"):
            if BEGIN_HIDDEN in line:
                inside = True
            elif "END HIDDEN TESTS" in line:
                inside = False
            elif inside:
                text = line.strip()
                literal = re.match(r"^[rbf]*['\"]", text)
                if len(text) >= 12 and not literal and text not in shown:
                    found.add(text)
    return found


def visible_text(page: str) -> str:
    """The text of an HTML page, tags removed (syntax highlighting splits code into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def nbgrader(*args, cwd):
    command = [*grading.nbgrader_command(), *args]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    print(f"nbgrader {args[0]}: {time.perf_counter() - t0:.1f} s")
    return done.stdout + done.stderr


# --- fast checks of the notebooks' structure and of bncore.grading ---------------------------


def test_every_assignment_follows_the_conventions():
    assert "ch3-forward-backward" in ASSIGNMENTS
    for assignment in ASSIGNMENTS:
        path = ROOT / "solutions" / assignment / f"{assignment}.ipynb"
        assert path.exists(), f"solutions/{assignment}/ must hold {assignment}.ipynb"
        nb = nbformat.read(path, as_version=4)
        group = group_one(nb)
        assert points(group) > 0, f"{assignment}: group 1 (first answer's tests) has no points"
        assert points(group) < autograded_points(nb), f"{assignment}: nothing after group 1"
        first = nb.cells[0]
        assert first.cell_type == "markdown" and nbgrader_meta(first).get("locked"), (
            f"{assignment}: the first cell must be a locked markdown cell (title, points, how "
            "to check)")


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


def test_reference_forbidden_catches_calls_into_bncore():
    import bncore.numpy as bn

    x, gamma, beta = np.random.default_rng(0).normal(size=(4, 3)), np.ones(3), np.zeros(3)
    with reference_forbidden("mine"):
        (x - x.mean(axis=0)) / x.std(axis=0)  # plain NumPy is fine
    with pytest.raises(grading.ReferenceCalled, match="mine calls bncore"):
        with reference_forbidden("mine"):
            bn.batch_norm_forward(x, gamma, beta)

    def disarm():
        sys.setprofile(None)
        return bn.batch_norm_forward(x, gamma, beta)

    with pytest.raises(grading.ReferenceCalled, match="profile hook"):
        with reference_forbidden("mine"):
            disarm()
    assert sys.getprofile() is None


def test_hide_hidden_tests_removes_code_and_tracebacks():
    cell = nbformat.v4.new_code_cell(
        "assert f(1) == 1\n### BEGIN HIDDEN TESTS\nassert f(2) == 4, 'f(2) is wrong'\n"
        "### END HIDDEN TESTS",
        metadata={"nbgrader": {"grade": True, "solution": False, "locked": True,
                               "grade_id": "t", "points": 1, "schema_version": 3}})
    cell.outputs = [
        # an answer that prints the source of its caller
        nbformat.v4.new_output("stream", name="stdout",
                               text="called from:\nassert f(2) == 4, 'f(2) is wrong'\n"),
        nbformat.v4.new_output(
            "error", ename="AssertionError", evalue="f(2) is wrong",
            traceback=["----> 3 assert f(2) == 4, 'f(2) is wrong'",
                       "AssertionError: f(2) is wrong"]),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb, _ = grading.HideHiddenTests().preprocess(nb, {})
    assert nb.cells[0].source == "assert f(1) == 1"
    printed, error = nb.cells[0].outputs
    assert "called from:" in printed.text and "assert f(2)" not in printed.text
    shown = "\n".join(error.traceback)
    assert "f(2) is wrong" in shown and "assert f(2)" not in shown


def test_scan_code_flags_what_reaches_outside():
    flagged = {
        "import os\nos._exit(0)": "exits the kernel",
        "import sys\nsys.exit()": "exits",
        "import bncore.numpy as bn": "reference implementation",
        "from bncore.numpy import batch_norm_forward as f": "reference implementation",
        "import numpy as np\nnp.allclose = lambda *a, **k: True": "changes the module numpy",
        "import numpy.testing as npt\nnpt.assert_allclose = print": "changes the module",
        "import builtins\nbuiltins.len = None": "builtins",
        "get_ipython().input_transformers_post.append(f)": "changes how cells run",
        "import sys\nsys.settrace(None)": "trace hook",
        "f.__code__ = g.__code__": "rewrites function code",
        "open('/etc/passwd').read()": "opens files",
        "exec(source)": "runs generated code",
        "import subprocess": "starts processes",
        "import ctypes": "ctypes",
        "!rm -rf ~": "shell command",
        "%run other.py": "magic %run",
        "try:\n    pass\nexcept KeyboardInterrupt:\n    pass": "catches KeyboardInterrupt",
        "def f(:\n    open('x')": "opens files",  # a syntax error: still scanned
    }
    for source, reason in flagged.items():
        found = grading.scan_code(source)
        assert any(reason in r for r in found), f"{source!r}: {found}"
    for assignment in ASSIGNMENTS:  # every model answer is clean
        nb = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", 4)
        for cell in nb.cells:
            if is_code_answer(cell):
                assert grading.scan_code(model_answer(cell.source)) == [], (
                    assignment, nbgrader_meta(cell)["grade_id"],
                    grading.scan_code(model_answer(cell.source)))


def test_grader_hooks_undo_and_detect_patches():
    import bncore.numpy as bn

    hooks = grading.GraderHooks
    assert hooks._state is None  # outside grading, nothing is sealed and verify does nothing
    hooks.verify("x")
    hooks.seal(["bncore.numpy"])
    try:
        allclose, code = np.allclose, bn.batch_norm_forward.__code__
        np.allclose = lambda *args, **kwargs: True
        with pytest.raises(grading.GradingTampered, match="numpy.allclose"):
            hooks.verify("your answer")
        with pytest.raises(grading.GradingTampered):  # assert_close checks first
            assert_close("y", np.zeros(2), np.ones(2))
        assert "numpy.allclose" in hooks.restore() and np.allclose is allclose
        hooks.verify("x")
        bn.batch_norm_forward.__code__ = (lambda x, gamma, beta, eps=1e-5: None).__code__
        with pytest.raises(grading.GradingTampered, match="batch_norm_forward"):
            with reference_forbidden("mine"):  # verified on the way out
                pass
        assert any("batch_norm_forward" in r for r in hooks.restore())
        assert bn.batch_norm_forward.__code__ is code
        assert hooks.restore() == []
    finally:
        hooks.restore()
        hooks._state = None


# --- the round trip ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_round_trip(assignment, tmp_path, capsys):
    from nbgrader.api import Gradebook

    course = tmp_path / "course"
    course.mkdir()
    shutil.copytree(ROOT / "solutions", course / "solutions")
    if (ROOT / "exercises").exists():
        shutil.copytree(ROOT / "exercises", course / "exercises")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    name = f"{assignment}.ipynb"

    # The release as students get it: the committed one (test_exercises_in_sync.py checks that
    # it is what nbgrader generates). generate_assignment also records the assignment's cells
    # in the gradebook, which autograde needs.
    committed = ROOT / "exercises" / assignment / name
    nbgrader("generate_assignment", assignment, "--force", cwd=course)
    release = nbformat.read(committed if committed.exists()
                            else course / "exercises" / assignment / name, as_version=4)
    solution = nbformat.read(course / "solutions" / assignment / name, as_version=4)
    students = submission_kinds(release, solution)
    if assignment in CHEATS:
        students["cheater"] = submission(release, solution, answers=CHEATS[assignment])
    for student, nb in students.items():
        folder = course / "submitted" / student / assignment
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / name)

    start = time.perf_counter()
    nbgrader("autograde", assignment, cwd=course)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{assignment}: autograde of {len(students)} notebooks took {seconds:.1f} s "
              f"({seconds / len(students):.1f} s per notebook)")

    total = autograded_points(solution)
    expected = {"full": total, "untouched": 0.0, "partial": points(group_one(solution))}
    hidden_cells = [nbgrader_meta(c)["grade_id"] for c in solution.cells
                    if is_test(c) and BEGIN_HIDDEN in c.source]
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
        problems = grading.grading_problems(graded)
        assert problems == [], (student, problems)
        assert not grading.timed_out(graded)
        submitted = course / "submitted" / student / assignment / name
        found = grading.scan_submission(submitted)
        assert found == [], (student, found)
    if cheat_grades:
        assert not any(cheat_grades.values()), (
            f"{assignment}: answers calling bncore earned hidden-test points: {cheat_grades}")
        # ... and it is the hidden tests that refused them, not some unrelated error.
        graded = nbformat.read(course / "autograded" / "cheater" / assignment / name, 4)
        for cell in graded.cells:
            if nbgrader_meta(cell).get("grade_id") in hidden_cells:
                errors = [o for o in cell.outputs if o.output_type == "error"]
                assert errors and errors[0].ename == "ReferenceCalled", (
                    f"{assignment}: cheater's {nbgrader_meta(cell)['grade_id']} failed with "
                    f"{[(o.ename, o.evalue) for o in errors]}, not with ReferenceCalled")

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


# --- the instructor's workflow, as book/instructors.md gives it ------------------------------

WORKFLOW_ASSIGNMENT = "ch3-forward-backward"
# Every command of the instructors' page, in its order; the test runs each one.
WORKFLOW = [
    "python -m bncore.sandbox check",
    "nbgrader generate_assignment ch3-forward-backward --force",
    "nbgrader db student import students.csv",
    "nbgrader zip_collect ch3-forward-backward",
    "python -m bncore.grading scan submitted/*/ch3-forward-backward/ch3-forward-backward.ipynb",
    "python -m bncore.autograde ch3-forward-backward --jobs 2",
    "python -m bncore.grading written ch3-forward-backward",
    "python -m bncore.grading written ch3-forward-backward --score 1001 written_jacobian 2 "
    '--comment "Clear and complete."',
    "nbgrader generate_feedback ch3-forward-backward",
    "nbgrader export",
]


def test_instructors_page_gives_the_tested_commands():
    page = (ROOT / "book" / "instructors.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", page, flags=re.S))
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
            args = [*grading.nbgrader_command(), *args[1:]]
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
    summary = outputs[WORKFLOW[5]]
    assert "2 graded" in summary and "0 failed" in summary, summary
    listing = outputs[WORKFLOW[6]]
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
