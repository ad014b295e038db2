"""Hostile, broken and valid-but-unusual submissions, graded in one class through the real
nbgrader commands, and checked with the students' self-check.

Two corpora, in one course: tests/hostile/cases.py (chapter 3: infinite loops, crashes, exits,
bombs, mangled notebooks, every known way to forge a pass, attacks on the gradebook and on other
students, broken files) and tests/hostile/alternatives.py (a valid answer unlike the model's for
every assignment, some of whose NumPy calls warn). One ``nbgrader autograde`` run grades all of
them next to good students, then ``nbgrader generate_feedback`` and ``nbgrader export`` run.

Checked: every hostile case gets the points of its honest part and no more; every alternative
gets full marks; the self-check (``python -m bncore.check``) gives every test cell of every
notebook the verdict the grader gave its visible part; the grader's record, the scan, the
gradebook, the other students' files, the feedback pages (no hidden test line) and the CSV.
The canary stops a class whose set-up is broken, before the first student.

The cases that need the bubblewrap sandbox (a fork bomb, reading and writing other people's
files, a reference read from disk) are left out, with the reason, where it is not available;
CI runs as root with bwrap installed (scripts/system-deps.sh), where everything runs
(test_ci_has_the_sandbox, which .ci/run makes run).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from bncore.runner import BEGIN_HIDDEN, is_test_cell, nbgrader_meta
from bngrade.course import nbgrader_command
from bngrade.report import grading_problems, timed_out
from bngrade.sandbox import sandbox_mode
from bngrade.scan import scan_submission
from bngrade.submissions import autograded_points, model_submission, submission
from tests.course import (
    ASSIGNMENTS,
    COURSE_ID,
    ROOT,
    hidden_lines,
    nbgrader,
    notebooks,
    released_course,
    submit,
    visible_text,
)
from tests.hostile.alternatives import ALTERNATIVES
from tests.hostile.cases import ALL, ASSIGNMENT, NOTEBOOK, Kit, cases, expected_score

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

TIMEOUT = 10  # seconds per cell: the infinite loops cost this much each
MEMORY = 2**30  # the kernels' address space for this class


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts.append(output.get("text", "") if isinstance(output.get("text"), str) else "")
            parts.append(str(output.get("evalue", "")))
    return "\n".join(parts)


def self_check(path: Path) -> dict:
    """``python -m bncore.check --json`` on a notebook: {grade_id: passed}."""
    done = subprocess.run([sys.executable, "-m", "bncore.check", str(path), "--json",
                           "--timeout", str(TIMEOUT)], capture_output=True, text=True,
                          timeout=600)
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"the self-check of {path} printed no JSON:\n{done.stdout}\n"
                             f"{done.stderr}") from None
    return {check["grade_id"]: check["passed"] for check in found["checks"]}


def test_ci_has_the_sandbox():
    """Where CI runs (.ci/run sets CI; as root, bwrap installed by scripts/system-deps.sh) the
    sandbox works, so no hostile case is skipped there."""
    if not os.environ.get("CI"):
        pytest.skip("not CI: the hostile test leaves out the cases that need bwrap if missing")
    assert sandbox_mode("auto")[0] == "bwrap", sandbox_mode("auto")[1]


# Cases the self-check is not compared on: they test the grader's machine (sandbox, limits,
# timeouts, the kernel's death) or files it cannot read; everything else is compared.
NOT_SELF_CHECKED = {"infinite_loop", "stubborn_loop", "os_exit", "segfault", "memory_bomb",
                    "fork_bomb", "big_output", "read_solutions", "write_attack",
                    "cloned_reference", "extra_files"}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """The whole corpus and the alternatives in one course, autograded in one run, with
    feedback, a grade export and the self-check of every comparable notebook."""
    mode, why = sandbox_mode("auto")
    marker = f"bncore-pwned-{uuid.uuid4().hex[:10]}"
    # The write attack tries to connect to this port on the loopback: reachable from a kernel
    # that shares the machine's network, not from one in a network namespace of its own.
    listener = socket.create_server(("127.0.0.1", 0))
    course_path = tmp_path_factory.mktemp("hostile") / "course"
    corpus = cases(marker, course_path, listener.getsockname()[1])
    left_out = [c for c in corpus if c.needs_sandbox and mode != "bwrap"]
    corpus = [c for c in corpus if c not in left_out]

    course = released_course(course_path)
    kit = Kit(*notebooks(course, ASSIGNMENT))
    for case in corpus:
        case.build(kit, course, case.student)
    alternatives = {}
    for assignment, students in ALTERNATIVES.items():
        release, solution = notebooks(course, assignment)
        for student, answers in students.items():
            notebook = submission(model_submission(release, solution), solution,
                                  answers=answers)
            alternatives[(student, assignment)] = submit(course, student, assignment, notebook)
    roster = course / "students.csv"
    roster.write_text("id,first_name,last_name,email\n" + "".join(
        f"{s},,,\n" for s in sorted({c.student for c in corpus} | {s for s, _ in alternatives})))
    nbgrader("db", "student", "import", str(roster), cwd=course)
    victim_files = {p: sha(p) for p in (course / "submitted" / "victim").rglob("*")
                    if p.is_file()}

    start = time.perf_counter()
    with listener:
        done = subprocess.run(
            [*nbgrader_command(), "autograde", "*", f"--Execute.timeout={TIMEOUT}",
             f"--SandboxedKernelManager.memory_limit={MEMORY}"], cwd=course,
            capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    feedback = [subprocess.run([*nbgrader_command(), "generate_feedback", a], cwd=course,
                               capture_output=True, text=True, timeout=900)
                for a in ASSIGNMENTS]
    nbgrader("export", cwd=course)

    from nbgrader.api import Gradebook, MissingEntry

    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for key in [(c.student, ASSIGNMENT) for c in corpus] + list(alternatives):
            try:
                scores[key] = gb.find_submission(key[1], key[0]).score
            except MissingEntry:
                scores[key] = None

    compared = {(c.student, ASSIGNMENT): course / "submitted" / c.student / ASSIGNMENT / NOTEBOOK
                for c in corpus if c.graded and c.student not in NOT_SELF_CHECKED}
    compared.update(alternatives)
    start_check = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        checked = dict(zip(compared, pool.map(self_check, compared.values()), strict=True))
    check_seconds = time.perf_counter() - start_check

    table = [f"{'student':20s} {'grade':>6s} {'expected':>8s}  problems"]
    for case in corpus:
        autograded = course / "autograded" / case.student / ASSIGNMENT / NOTEBOOK
        problems = grading_problems(autograded) if autograded.exists() else []
        want = expected_score(case, kit.solution) if case.graded else "failed"
        table.append(f"{case.student:20s} {scores[(case.student, ASSIGNMENT)]!s:>6s} "
                     f"{want!s:>8s}  {'; '.join(problems)[:110]}")
    print(f"\nsandbox: {mode} {why}\n" + "\n".join(table))
    print(f"autograde of {len(corpus) + len(alternatives)} submissions: {seconds:.1f} s "
          f"(per-cell timeout {TIMEOUT} s); self-check of {len(compared)}: {check_seconds:.1f} s")
    if left_out:
        print(f"left out without bwrap ({why}): {', '.join(c.student for c in left_out)}")

    class Graded:
        pass

    graded = Graded()
    graded.__dict__.update(course=course, corpus=corpus, kit=kit, scores=scores, log=done,
                           feedback=feedback, seconds=seconds, marker=marker, mode=mode,
                           victim_files=victim_files, alternatives=alternatives,
                           checked=checked)
    return graded


def autograded(g, student: str, assignment: str = ASSIGNMENT) -> Path:
    return g.course / "autograded" / student / assignment / f"{assignment}.ipynb"


@pytest.mark.slow
def test_every_hostile_submission_gets_the_points_of_its_honest_part(graded_class):
    g = graded_class
    wrong = []
    for case in g.corpus:
        score = g.scores[(case.student, ASSIGNMENT)]
        if case.graded:
            want = expected_score(case, g.kit.solution)
            if score != pytest.approx(want):
                wrong.append(f"{case.student}: {score} instead of {want} ({case.what})")
        elif score not in (None, 0.0):
            wrong.append(f"{case.student} could not be graded but scored {score}")
    assert not wrong, "\n".join(wrong)
    total = expected_score(next(c for c in g.corpus if c.student == "good_1"), g.kit.solution)
    assert total > 0 and all(g.scores[(s, ASSIGNMENT)] == total
                             for s in ("good_1", "good_2", "victim"))


@pytest.mark.slow
def test_every_valid_alternative_gets_full_marks(graded_class):
    g = graded_class
    for student, assignment in g.alternatives:
        solution = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", 4)
        full = autograded_points(solution)
        graded = nbformat.read(autograded(g, student, assignment), as_version=4)
        failing = [f"{nbgrader_meta(c)['grade_id']}: {o.get('ename')}: {o.get('evalue')}"
                   for c in graded.cells if is_test_cell(c) for o in c.outputs
                   if o.get("output_type") == "error"]
        assert g.scores[(student, assignment)] == full, (student, assignment, failing)
    warned = outputs_text(nbformat.read(autograded(g, "alt_float64", "ch3-forward-backward"),
                                        as_version=4))
    assert "DeprecationWarning" in warned  # the warning was shown, and cost nothing


@pytest.mark.slow
def test_the_self_check_agrees_with_the_grader_on_every_notebook(graded_class):
    """For every test cell of every compared notebook, the self-check's verdict is the one the
    grader gave the cell's visible part; where the grader gave the points, the self-check
    passed the cell too."""
    g = graded_class
    disagreements = []
    for (student, assignment), verdicts in g.checked.items():
        graded = nbformat.read(autograded(g, student, assignment), as_version=4)
        record = graded.metadata.get("bncore", {}).get("grading", {})
        visible_failed = {name.split("(")[-1].rstrip(")")
                          for name in record.get("visible_failed", [])}
        for cell in graded.cells:
            if not is_test_cell(cell):
                continue
            grade_id = nbgrader_meta(cell)["grade_id"]
            scored = not any(o.get("output_type") == "error" for o in cell.outputs)
            grader_visible = grade_id not in visible_failed and not (
                not scored and cell.outputs and cell.outputs[-1].get("ename") in
                ("NotRun", "KernelDied", "CellTimeoutError"))
            if verdicts.get(grade_id) != grader_visible or (scored and not verdicts[grade_id]):
                disagreements.append(f"{student}/{assignment}/{grade_id}: self-check "
                                     f"{verdicts.get(grade_id)}, grader visible "
                                     f"{grader_visible}, scored {scored}")
    assert len(g.checked) >= 30
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.slow
def test_the_run_goes_on_past_submissions_that_break_nbgrader(graded_class):
    g = graded_class
    log = g.log.stdout + g.log.stderr
    broken = [c.student for c in g.corpus if not c.graded]
    for case in g.corpus:
        assert autograded(g, case.student).exists() == case.graded, case.student
    assert g.log.returncode != 0  # nbgrader says so in its exit status
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
        if not case.graded:
            continue
        path = autograded(g, case.student)
        problems = " | ".join(grading_problems(path))
        assert timed_out(path) == case.timed_out, (case.student, problems)
        for word in case.problems:
            assert word in problems, f"{case.student}: {word!r} not in {problems!r}"
        if not case.problems:
            assert not problems, f"{case.student}: unexpected grading problems: {problems}"


@pytest.mark.slow
def test_scan_flags_the_suspicious_submissions(graded_class):
    g = graded_class
    wrong = []
    for case in g.corpus:
        found = scan_submission(g.course / "submitted" / case.student / ASSIGNMENT / NOTEBOOK)
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
        nbformat.validate(nbformat.read(autograded(g, student), as_version=4))
    for proc in Path("/proc").iterdir():  # every kernel is gone
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
        return outputs_text(nbformat.read(autograded(g, student), as_version=4))

    forks = re.search(r"forked (\d+) processes, (\d+) refused", printed("fork_bomb"))
    assert forks and int(forks.group(2)) > 0 and int(forks.group(1)) < 200, forks
    reads = printed("read_solutions")
    # its own notebook, and the solutions and the victim's two notebooks in the course
    assert len(re.findall(r"cannot read \S+\.ipynb", reads)) >= 4, reads
    assert not re.search(r"^read ", reads, re.MULTILINE), reads
    assert "cannot read the gradebook" in reads, reads
    writes = printed("write_attack")
    assert "network: unreachable" in writes
    assert "bncore-kernel-" in writes, "the attack did not find the connection folder"
    for target in ("gradebook.db", "victim", "feedback", "solutions", "course/pwned.txt",
                   "/junk"):
        assert not re.search(rf"wrote \S*{re.escape(target)}", writes), writes
    cloned = printed("cloned_reference")
    assert "cannot be imported while this notebook is graded" in cloned, cloned


@pytest.mark.slow
def test_output_is_capped(graded_class):
    g = graded_class
    path = autograded(g, "big_output")
    assert path.stat().st_size < 4 * 2**20
    assert "[output truncated by the grader" in path.read_text()
    assert autograded(g, "flood").stat().st_size < 4 * 2**20


@pytest.mark.slow
def test_feedback_never_shows_hidden_tests(graded_class):
    """Search every feedback page of the class for every line of hidden test code."""
    g = graded_class
    assert all(f.returncode == 0 for f in g.feedback), [f.stderr[-2000:] for f in g.feedback]
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
        assert BEGIN_HIDDEN.lstrip("# ") not in text or BEGIN_HIDDEN.lstrip("# ") in submitted
        assert page.stat().st_size < 4 * 2**20
        score = g.scores[(case.student, ASSIGNMENT)]
        assert f"(Score: {round(float(score), 2)} /" in text, case.student
    assert pages == sum(c.graded for c in g.corpus)


@pytest.mark.slow
def test_export_lists_every_student(graded_class):
    g = graded_class
    with open(g.course / "grades.csv", newline="") as handle:
        rows = {r["student_id"]: r for r in csv.DictReader(handle)
                if r["assignment"] == ASSIGNMENT}
    assert {c.student for c in g.corpus} <= set(rows)
    for case in g.corpus:
        want = g.scores[(case.student, ASSIGNMENT)] or 0.0
        assert float(rows[case.student]["score"]) == pytest.approx(want), case.student
    assert all(float(rows[c.student]["score"]) == 0 for c in g.corpus if c.lose == ALL)


@pytest.mark.slow
def test_the_canary_stops_a_class_whose_set_up_is_broken(tmp_path):
    """A kernel without NumPy (a broken environment): the runner grades the model solution
    first, says what failed and why, and grades no student."""
    broken = ('c.Execute.extra_arguments = ["--IPKernelApp.exec_lines='
              'import sys; sys.modules[\'numpy\'] = None"]')
    course = released_course(tmp_path / "course", names=[ASSIGNMENT], config_extra=broken)
    release, solution = notebooks(course, ASSIGNMENT)
    for student in ("ann", "bob"):
        submit(course, student, ASSIGNMENT, model_submission(release, solution))
    done = subprocess.run([sys.executable, "-m", "bngrade.autograde", ASSIGNMENT, "--jobs", "1"],
                          cwd=course, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "CANARY FAILED" in out and "earns only 0 of" in out, out
    assert "(setup): ModuleNotFoundError" in out, out
    assert "[student" not in out and not (course / "autograded").exists(), out


@pytest.mark.slow
def test_without_bwrap_the_limits_still_hold(tmp_path):
    """The fallback of a machine without bubblewrap (or not root): resource limits only, with a
    warning. Memory bombs, dying kernels and shadowing files are still handled."""
    course = released_course(tmp_path / "course", names=[ASSIGNMENT])
    kit = Kit(*notebooks(course, ASSIGNMENT))
    chosen = [c for c in cases("unused") if c.student in
              ("good_1", "memory_bomb", "os_exit", "extra_files", "reference")]
    for case in chosen:
        case.build(kit, course, case.student)
    out = nbgrader("autograde", ASSIGNMENT, "--SandboxedKernelManager.sandbox=rlimits",
                   f"--SandboxedKernelManager.memory_limit={MEMORY}", cwd=course)
    assert out.count("Grading sandbox: rlimits") == 1

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for case in chosen:
            score = gb.find_submission(ASSIGNMENT, case.student).score
            assert score == pytest.approx(expected_score(case, kit.solution)), case.student


def test_every_assignment_has_a_valid_alternative_answer():
    """A graded notebook is added with a valid answer unlike its model's (alternatives.py), so
    that the full-marks test above grades it."""
    assert set(ALTERNATIVES) == set(ASSIGNMENTS), set(ASSIGNMENTS) ^ set(ALTERNATIVES)
    for assignment, students in ALTERNATIVES.items():
        assert students and all(answers for answers in students.values()), assignment


def test_corpus_readme_lists_every_case():
    readme = (Path(__file__).parent / "hostile" / "README.md").read_text()
    table = readme.split("<!-- table: generated by cases.py -->\n")[1].split("\n<!-- end")[0]
    from tests.hostile.cases import describe

    assert table == describe(cases("MARKER")), "regenerate the table in tests/hostile/README.md"


def test_sandbox_reaches_a_python_installed_under_a_hidden_folder(tmp_path, monkeypatch,
                                                                   request):
    """A clone under /tmp puts the venv under a folder the sandbox hides; the folders bwrap makes
    on the way to the re-exposed venv must let the kernel's unprivileged user through."""
    if sandbox_mode("auto")[0] != "bwrap":
        pytest.skip(sandbox_mode("auto")[1])
    from bngrade import sandbox

    # pytest's own temporary folders are 0700; a clone's folders are world-readable.
    base = Path(tempfile.mkdtemp(prefix="bngrade-sandbox-"))
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


def test_the_sandbox_check_probes_only_a_listener_of_its_own(tmp_path):
    """``python -m bngrade.sandbox check`` connects nowhere but 127.0.0.1, to a port it opened
    itself, and reports what the kernel could reach."""
    source = (ROOT / "grading" / "bngrade" / "sandbox.py").read_text()
    addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", source))
    assert addresses == {"127.0.0.1"}, addresses
    done = subprocess.run([sys.executable, "-m", "bngrade.sandbox", "check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = "unreachable" if sandbox_mode("auto")[0] == "bwrap" else "reachable"
    assert f"network: {expected}" in done.stdout, done.stdout
    if sandbox_mode("auto")[0] == "bwrap":
        assert "bncore.numpy importable: False" in done.stdout, done.stdout
