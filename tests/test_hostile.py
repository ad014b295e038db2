"""Hostile and broken submissions, graded in one class through the real nbgrader commands.

The corpus is tests/hostile/cases.py: infinite loops, crashes, exits, bombs, mangled notebooks,
monkeypatched checks, calls into bncore, attacks on the gradebook and on other students, broken
files. One ``nbgrader autograde`` run grades all of them next to good students, then
``nbgrader generate_feedback`` and ``nbgrader export`` run. The test checks, per student, the
grade in the gradebook against the one the case must get (computed from the notebook's points),
what the grader recorded (timeouts, a dead kernel, tampering undone), what the static scan
flags, and for the class: the run went on past the submissions that break nbgrader, the
gradebook and the other students' files are intact, nothing was written outside, no hidden test
line reaches any feedback page, and the CSV agrees with the gradebook.

The cases that need the bubblewrap sandbox (a fork bomb, reading and writing other people's
files) are left out, with the reason, where it is not available; CI runs as root with bwrap
installed (scripts/system-deps.sh), where everything runs (test_ci_has_the_sandbox).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import nbformat
import pytest
from hostile.cases import ALL, ASSIGNMENT, NOTEBOOK, Kit, cases, expected_score
from test_grading import hidden_lines, visible_text

from bncore import grading
from bncore.sandbox import sandbox_mode

ROOT = Path(__file__).resolve().parents[1]
COURSE_ID = "batchnorm-course"
TIMEOUT = 10  # seconds per cell: the infinite loops cost this much each
MEMORY = 2**30  # the kernels' address space for this class


def run(*args, cwd, check=True):
    done = subprocess.run([*grading.nbgrader_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(output.get("text", "") if isinstance(output.get("text"), str) else "")
            parts.append(str(output.get("evalue", "")))
    return "\n".join(parts)


def released_course(course: Path) -> Kit:
    """A course folder with the corpus's assignment released by nbgrader, and the kit that
    builds submissions from that release and its solution."""
    (course / "solutions").mkdir(parents=True)
    shutil.copytree(ROOT / "solutions" / ASSIGNMENT, course / "solutions" / ASSIGNMENT)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    run("generate_assignment", ASSIGNMENT, "--force", cwd=course)
    return Kit(nbformat.read(course / "exercises" / ASSIGNMENT / NOTEBOOK, as_version=4),
               nbformat.read(course / "solutions" / ASSIGNMENT / NOTEBOOK, as_version=4))


def test_ci_has_the_sandbox():
    """Where CI runs (as root, bwrap installed by scripts/system-deps.sh) the sandbox works, so
    no hostile case is skipped there."""
    if not os.environ.get("CI"):
        pytest.skip("not CI: the hostile test leaves out the cases that need bwrap if missing")
    assert sandbox_mode("auto")[0] == "bwrap", sandbox_mode("auto")[1]


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """A course with the whole corpus submitted, autograded in one run, with feedback and a
    grade export. Returns a namespace of what the tests below check."""
    mode, why = sandbox_mode("auto")
    marker = f"bncore-pwned-{uuid.uuid4().hex[:10]}"
    corpus = cases(marker)
    left_out = [c for c in corpus if c.needs_sandbox and mode != "bwrap"]
    corpus = [c for c in corpus if c not in left_out]

    course = tmp_path_factory.mktemp("hostile") / "course"
    kit = released_course(course)
    for case in corpus:
        case.build(kit, course, case.student)
    # The class list, as an instructor imports it: students who hand in nothing still get a row.
    roster = course / "students.csv"
    roster.write_text("id,first_name,last_name,email\n"
                      + "".join(f"{c.student},,,\n" for c in corpus))
    run("db", "student", "import", str(roster), cwd=course)
    victim_files = {p: sha(p) for p in (course / "submitted" / "victim").rglob("*")
                    if p.is_file()}

    start = time.perf_counter()
    done = run("autograde", ASSIGNMENT, f"--Execute.timeout={TIMEOUT}",
               f"--SandboxedKernelManager.memory_limit={MEMORY}", cwd=course, check=False)
    seconds = time.perf_counter() - start
    feedback = run("generate_feedback", ASSIGNMENT, cwd=course, check=False)
    run("export", cwd=course)

    from nbgrader.api import Gradebook, MissingEntry

    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for case in corpus:
            try:
                scores[case.student] = gb.find_submission(ASSIGNMENT, case.student).score
            except MissingEntry:
                scores[case.student] = None
    table = [f"{'student':20s} {'grade':>6s} {'expected':>8s}  problems"]
    for case in corpus:
        autograded = course / "autograded" / case.student / ASSIGNMENT / NOTEBOOK
        problems = grading.grading_problems(autograded) if autograded.exists() else []
        want = expected_score(case, kit.solution) if case.graded else "failed"
        table.append(f"{case.student:20s} {scores[case.student]!s:>6s} {want!s:>8s}  "
                     f"{'; '.join(problems)[:110]}")
    print(f"\nsandbox: {mode} {why}\n" + "\n".join(table))
    print(f"autograde of {len(corpus)} submissions in one class: {seconds:.1f} s "
          f"(per-cell timeout {TIMEOUT} s)")
    if left_out:
        print(f"left out without bwrap ({why}): {', '.join(c.student for c in left_out)}")

    class Graded:
        pass

    graded = Graded()
    graded.__dict__.update(course=course, corpus=corpus, kit=kit, scores=scores, log=done,
                           feedback=feedback, seconds=seconds, marker=marker, mode=mode,
                           victim_files=victim_files)
    return graded


@pytest.mark.slow
def test_every_submission_gets_the_right_grade(graded_class):
    g = graded_class
    wrong = []
    for case in g.corpus:
        if case.graded:
            want = expected_score(case, g.kit.solution)
            if g.scores[case.student] != pytest.approx(want):
                wrong.append(f"{case.student}: {g.scores[case.student]} instead of {want} "
                             f"({case.what})")
        elif g.scores[case.student] not in (None, 0.0):
            wrong.append(f"{case.student} could not be graded but scored "
                         f"{g.scores[case.student]}")
    assert not wrong, "\n".join(wrong)
    total = expected_score(next(c for c in g.corpus if c.student == "good_1"), g.kit.solution)
    assert total > 0 and all(g.scores[s] == total for s in ("good_1", "good_2", "victim"))


@pytest.mark.slow
def test_the_run_goes_on_past_submissions_that_break_nbgrader(graded_class):
    g = graded_class
    log = g.log.stdout + g.log.stderr
    broken = [c.student for c in g.corpus if not c.graded]
    for case in g.corpus:
        autograded = g.course / "autograded" / case.student / ASSIGNMENT / NOTEBOOK
        assert autograded.exists() == case.graded, f"{case.student}: autograded={autograded}"
    # nbgrader names each broken submission, and says so in its exit status.
    assert g.log.returncode != 0
    for student in broken:
        if student != "missing":
            assert f"for student '{student}'" in log, f"no error reported for {student}"
    assert "submitted/missing/" in log  # "No notebooks were matched"
    # Our hook names what is wrong before nbgrader's generic error.
    assert "wrong_name/ch3-forward-backward: wrong file name" in log


@pytest.mark.slow
def test_the_grader_records_what_happened(graded_class):
    g = graded_class
    for case in g.corpus:
        autograded = g.course / "autograded" / case.student / ASSIGNMENT / NOTEBOOK
        if not case.graded:
            continue
        problems = " | ".join(grading.grading_problems(autograded))
        assert grading.timed_out(autograded) == case.timed_out, (case.student, problems)
        if case.problems:
            for word in case.problems:
                assert word in problems, f"{case.student}: {word!r} not in {problems!r}"
        else:
            assert not problems, f"{case.student}: unexpected grading problems: {problems}"


@pytest.mark.slow
def test_scan_flags_the_suspicious_submissions(graded_class):
    g = graded_class
    wrong = []
    for case in g.corpus:
        found = grading.scan_submission(g.course / "submitted" / case.student / ASSIGNMENT
                                        / NOTEBOOK)
        if bool(found) != case.suspicious:
            wrong.append(f"{case.student}: {found or 'clean'}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_gradebook_and_other_students_are_intact(graded_class):
    g = graded_class
    db = g.course / "gradebook.db"
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert b"PWNED" not in db.read_bytes()
    for path, digest in g.victim_files.items():
        assert sha(path) == digest, f"{path} was changed"
    assert not list(g.course.parent.rglob("pwned*")), "a submission wrote outside its folder"
    assert not Path("/tmp", g.marker).exists()
    for student in ("victim", "good_1"):
        graded = g.course / "autograded" / student / ASSIGNMENT / NOTEBOOK
        nbformat.validate(nbformat.read(graded, as_version=4))
    # Every kernel is gone: nothing runs in the class's folders any more.
    for proc in Path("/proc").iterdir():
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        assert not cwd.startswith(str(g.course)), f"process {proc.name} still runs in {cwd}"


@pytest.mark.slow
def test_sandbox_stops_reads_writes_and_forks(graded_class):
    g = graded_class
    if g.mode != "bwrap":
        pytest.skip("needs the bubblewrap sandbox (root and bwrap)")

    def printed(student):
        path = g.course / "autograded" / student / ASSIGNMENT / NOTEBOOK
        return outputs_text(nbformat.read(path, as_version=4))

    forks = re.search(r"forked (\d+) processes, (\d+) refused", printed("fork_bomb"))
    assert forks and int(forks.group(2)) > 0 and int(forks.group(1)) < 200, forks
    reads = printed("read_solutions")
    assert len(re.findall(r"cannot read \S+\.ipynb", reads)) == 4, reads
    assert "cannot read the gradebook" in reads, reads
    writes = printed("write_attack")
    assert "network: unreachable" in writes
    assert "bncore-kernel-" in writes, "the attack did not find the connection folder"
    for target in ("gradebook.db", "victim", "feedback", "solutions", "course/pwned.txt",
                   "/junk"):
        assert not re.search(rf"wrote \S*{re.escape(target)}", writes), writes


@pytest.mark.slow
def test_output_is_capped(graded_class):
    g = graded_class
    path = g.course / "autograded" / "big_output" / ASSIGNMENT / NOTEBOOK
    assert path.stat().st_size < 4 * 2**20
    assert "[output truncated by the grader" in path.read_text()


@pytest.mark.slow
def test_feedback_never_shows_hidden_tests(graded_class):
    """Search every feedback page of the class for every line of hidden test code."""
    g = graded_class
    assert g.feedback.returncode == 0, g.feedback.stderr[-3000:]
    secret = hidden_lines(g.kit.solution, g.kit.release)
    assert len(secret) > 20
    pages = 0
    for case in g.corpus:
        page = g.course / "feedback" / case.student / ASSIGNMENT / f"{ASSIGNMENT}.html"
        if not case.graded:
            assert not page.exists()
            continue
        text = visible_text(page.read_text())
        pages += 1
        leaked = sorted(line for line in secret if line in text)
        assert not leaked, f"{case.student}'s feedback shows hidden tests: {leaked[:3]}"
        submitted = (g.course / "submitted" / case.student / ASSIGNMENT / NOTEBOOK).read_text()
        assert grading.BEGIN_HIDDEN not in text or grading.BEGIN_HIDDEN in submitted
        assert page.stat().st_size < 4 * 2**20
        score = g.scores[case.student]
        assert f"(Score: {round(float(score), 2)} /" in text, case.student
    assert pages == sum(c.graded for c in g.corpus)
    leaky = (g.course / "feedback" / "leaky" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "hidden test code removed" in leaky  # its prints were redacted, not dropped


@pytest.mark.slow
def test_export_lists_every_student(graded_class):
    g = graded_class
    with open(g.course / "grades.csv", newline="") as handle:
        rows = {r["student_id"]: r for r in csv.DictReader(handle) if r["assignment"] == ASSIGNMENT}
    assert set(rows) == {c.student for c in g.corpus}
    for case in g.corpus:
        want = g.scores[case.student] or 0.0
        assert float(rows[case.student]["score"]) == pytest.approx(want), case.student
    assert all(float(rows[c.student]["score"]) == 0 for c in g.corpus if c.lose == ALL)


@pytest.mark.slow
def test_without_bwrap_the_limits_still_hold(tmp_path):
    """The fallback of a machine without bubblewrap (or not root): resource limits only, with a
    warning. Memory bombs, dying kernels and shadowing files are still handled."""
    course = tmp_path / "course"
    kit = released_course(course)
    chosen = [c for c in cases("unused") if c.student in
              ("good_1", "memory_bomb", "os_exit", "extra_files", "patch_builtins")]
    for case in chosen:
        case.build(kit, course, case.student)
    done = run("autograde", ASSIGNMENT, "--SandboxedKernelManager.sandbox=rlimits",
               f"--SandboxedKernelManager.memory_limit={MEMORY}", cwd=course)
    assert (done.stdout + done.stderr).count("Grading sandbox: rlimits") == 1

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for case in chosen:
            score = gb.find_submission(ASSIGNMENT, case.student).score
            assert score == pytest.approx(expected_score(case, kit.solution)), case.student


def test_corpus_readme_lists_every_case():
    readme = (Path(__file__).parent / "hostile" / "README.md").read_text()
    table = readme.split("<!-- table: generated by cases.py -->\n")[1].split("\n<!-- end")[0]
    from hostile.cases import describe

    assert table == describe(cases("MARKER")), "regenerate the table in tests/hostile/README.md"


def test_sandbox_reaches_a_python_installed_under_a_hidden_folder(tmp_path, monkeypatch,
                                                                   request):
    """A clone under /tmp puts the venv under a folder the sandbox hides; the folders bwrap makes
    on the way to the re-exposed venv must let the kernel's unprivileged user through."""
    if sandbox_mode("auto")[0] != "bwrap":
        pytest.skip(sandbox_mode("auto")[1])
    from bncore import sandbox

    # pytest's own temporary folders are 0700; a clone's folders are world-readable.
    base = Path(tempfile.mkdtemp(prefix="bncore-sandbox-"))
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    hidden = base / "hidden"
    venv = hidden / "clone" / ".venv"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    monkeypatch.setattr(sandbox, "_python_installation", lambda: [venv])
    cwd, rundir = tmp_path / "work", tmp_path / "run"
    cwd.mkdir()
    rundir.mkdir()
    args = sandbox.bwrap_arguments(cwd=cwd, rundir=rundir, hidden=[hidden], scratch_size=2**20,
                                   uid=1_234_567, env={"PATH": "/usr/bin:/bin"})
    done = subprocess.run([*args, "cat", str(venv / "pyvenv.cfg")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "home" in done.stdout, done.stderr
