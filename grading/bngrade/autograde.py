"""Grade a whole class on every core: the real ``nbgrader autograde``, sharded by student.

``nbgrader autograde`` grades one notebook after another. This runner starts ``--jobs`` worker
processes (default: one more than the cores). Each worker loads the course's nbgrader
configuration once and then runs nbgrader's own ``Autograde`` converter -- the code behind
``nbgrader autograde ASSIGNMENT --student S --force`` -- for one student at a time, so every
notebook is graded exactly as nbgrader grades it: sanitized, executed in a fresh kernel of its
own, its test cells restored from the gradebook, its grades written to the gradebook.

Run it from the course root, where ``nbgrader_config.py`` is::

    python -m bngrade.autograde ch3-forward-backward           # every submission, all cores
    python -m bngrade.autograde --all                           # every assignment
    python -m bngrade.autograde ch3-forward-backward --student alice --student bob --jobs 2
    python -m bngrade.autograde ch3-forward-backward --force    # regrade what is already graded

The standard ``nbgrader autograde``, ``generate_feedback`` and ``export`` work alongside: the
runner writes nothing that nbgrader does not write itself, except its ledger in
``.grading/autograde/`` (which submissions it graded) and the workers' logs beside it.

How it stays correct
--------------------
- **Sharded by student.** The parent deals out one student at a time to whichever worker is
  free; a student's submissions are graded by one worker only, so no two processes ever write
  the same rows of the gradebook.
- **One gradebook, nbgrader's own code writing it.** All workers write the course's gradebook
  through nbgrader. SQLite lets one writer in at a time; each connection waits up to
  ``BUSY_TIMEOUT`` seconds for the lock (the ``timeout`` of Python's sqlite3, set in the
  database URL) instead of failing after the default 5 s. The rows that several students
  share (the course and the students themselves, which nbgrader creates with a read-then-insert
  that two processes could race on) are created by the parent before any worker starts. A
  grading that still meets a locked database is retried once.
- **A worker that dies loses one submission, at most.** The parent watches every worker. When
  one dies (killed, out of memory, or taken down by the code it was grading), the submission it
  was grading is reported as failed, the student's other submissions go back to the queue, and
  a new worker takes its place. SQLite rolls back the dead worker's unfinished transaction.
- **Resumable.** The parent records in a ledger (``.grading/autograde/ledger.jsonl``) when each
  submission starts and how it ended. A run skips what an earlier run graded, unless the
  submission changed since (its files are hashed), its autograded notebook is gone, or
  ``--force`` is given; a submission whose grading never finished (its last entry is "started")
  is graded again. So after a crash, running the same command again grades what is missing.
- **A submission that breaks the grader is reported and the run goes on.** Every outcome is one
  of: ``graded``; ``suspicious`` (graded, but ``bngrade.scan.scan_submission`` found something
  to look at); ``timed out`` (graded,
  but a cell ran past ``Execute.timeout`` and was stopped);
  ``failed`` (nbgrader could not grade it: the reason is in the notes, the details in the
  worker's log). The notes also carry what ``bngrade.report.grading_problems`` read from the
  grader's record (a kernel that died, output cut off...). The exit status is 0 when every
  submission was graded (whatever the scores), 1 when any failed.

Before the first student, the canary grades the model solution of each assignment with the same
set-up (``bngrade.canary``) and stops the run if it loses points; after the last, the
similarity report (``bngrade.similarity``) lists answers that match bncore, the solution or
each other.

Isolation comes first: every notebook still gets a fresh kernel (nbgrader's default), never a
kernel that ran another student's code. What the runner saves is nbgrader's start-up per
student, the wait for a kernel's graceful shutdown (kernels are stopped at once when their
notebook is done: ``Execute.shutdown_kernel = "immediate"``, unless the course config says
otherwise), and idle cores.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bngrade.report import grading_record, problems_in
from bngrade.scan import scan_submission

#: Seconds a worker's database connection waits for another worker's write to finish.
BUSY_TIMEOUT = 120
#: The folder, under the course root, that holds the ledger and the workers' logs.
STATE_DIR = Path(".grading") / "autograde"
#: Testing hook: a worker kills itself (SIGKILL) in the middle of grading this student.
KILL_ENV = "BNGRADE_AUTOGRADE_KILL"

GRADED, SUSPICIOUS, TIMED_OUT, FAILED = "graded", "suspicious", "timed out", "failed"
# Grading problems (bngrade.report.grading_problems) that mean the submission fought the grader.
_TAMPERING = ("tampering", "could not check the environment", "result value in the test")
STATUSES = (GRADED, SUSPICIOUS, TIMED_OUT, FAILED)


@dataclass
class Result:
    """How grading one student's submission of one assignment ended."""

    student: str
    assignment: str
    status: str = FAILED
    score: float | None = None
    max_score: float | None = None
    notebooks: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the grader's own (this process)
    kernel_cpu_seconds: float | None = None  # the notebooks' kernels', where measured
    notes: list[str] = field(default_factory=list)
    needs_manual_grade: bool = False
    digest: str = ""

    @property
    def graded(self) -> bool:
        return self.status != FAILED


# --- the course ---------------------------------------------------------------------------------


def nbgrader_app(argv: list[str] | None = None) -> Any:
    """nbgrader's AutogradeApp with the course configuration of the current folder loaded."""
    from nbgrader.apps import AutogradeApp

    app = AutogradeApp()
    app.initialize(["--log-level=WARN", *(argv or [])])
    return app


def with_busy_timeout(db_url: str, seconds: float = BUSY_TIMEOUT) -> str:
    """The SQLite URL with a lock timeout (Python's sqlite3 ``timeout``); others unchanged."""
    if not db_url.startswith("sqlite:") or "timeout=" in db_url:
        return db_url
    return f"{db_url}{'&' if '?' in db_url else '?'}timeout={seconds:g}"


def submissions(coursedir: Any, assignments: Sequence[str], students: Sequence[str] | None = None
                ) -> dict[tuple[str, str], list[str]]:
    """{(student, assignment): submitted notebooks} for the submissions on disk."""
    found = {}
    for assignment in assignments:
        pattern = coursedir.format_path(coursedir.submitted_directory, "*", assignment)
        for folder in sorted(glob.glob(pattern)):
            student = Path(folder).parent.name
            notebooks = sorted(glob.glob(os.path.join(folder, "*.ipynb")))
            if os.path.isdir(folder) and (not students or student in students):
                found[(student, assignment)] = notebooks  # [] when it holds no notebook
    return found


def submitted_assignments(coursedir: Any) -> list[str]:
    pattern = coursedir.format_path(coursedir.submitted_directory, "*", "*")
    return sorted({Path(p).name for p in glob.glob(pattern) if glob.glob(f"{p}/*.ipynb")})


def digest(folder: str | Path) -> str:
    """A hash of every file of a submitted folder (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# --- the worker -----------------------------------------------------------------------------


class _Records(logging.Handler):
    """Keeps the warnings and errors nbgrader logs while one submission is graded."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _error_note(records: Sequence[logging.LogRecord]) -> str:
    """The most telling line of the errors nbgrader logged: an exception's last line."""
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    for message in errors:
        lines = [line for line in message.strip().splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Traceback"):
            return lines[-1][:300]
    for message in errors:
        if "There was an error processing" not in message and "Please see" not in message:
            return message.strip().splitlines()[0][:300]
    return errors[0].strip().splitlines()[0][:300] if errors else "nbgrader failed"


def _records(paths: Sequence[str]) -> tuple[list[str], bool, float | None]:
    """What went wrong while the autograded notebooks ran (a kernel that died, output cut
    off...), as ``bngrade.report.problems_in`` reads it from the grader's record; whether a
    cell timed out; and the CPU seconds of their kernels (where the sandbox measured them)."""
    found, late, kernel_cpu = [], False, None
    for path in paths:
        try:
            record = grading_record(path)
        except Exception as error:  # reported, never fatal
            found.append(f"could not read the grading record: {type(error).__name__}: {error}")
            continue
        found += problems_in(record)
        late = late or bool(record.get("timed_out"))
        if record.get("kernel_cpu_seconds") is not None:
            kernel_cpu = (kernel_cpu or 0.0) + float(record["kernel_cpu_seconds"])
    return list(dict.fromkeys(found)), late, kernel_cpu


def _scan(paths: Sequence[str]) -> list[str]:
    reasons = []
    for path in paths:
        try:
            reasons += [str(r) for r in scan_submission(path)]
        except Exception as error:  # a scan that breaks must not stop grading
            reasons.append(f"the submission scan failed: {type(error).__name__}: {error}")
    return reasons


_grading = ""  # the student whose submission this worker is grading


def _kill_hook(cell_index: int = 0, **_: Any) -> None:
    """Testing hook (KILL_ENV): the worker dies in the middle of grading that student's
    submission, after a few cells, as if killed from outside."""
    if _grading == os.environ.get(KILL_ENV) and cell_index >= 3:
        os.kill(os.getpid(), signal.SIGKILL)


def share_engines() -> None:
    """nbgrader opens a new SQLAlchemy engine for each ``Gradebook`` (about eleven per
    notebook), and an engine compiles each query anew: 0.1 CPU seconds per notebook. In a
    worker, every ``Gradebook`` of the same database shares one engine, which keeps its
    compiled queries; ``Gradebook.close`` still returns its connections (an engine that is
    disposed of opens new ones when asked)."""
    import nbgrader.api as api

    make = api.create_engine
    if getattr(make, "shared", False):
        return
    engines: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}

    def shared_engine(url: Any, **kw: Any) -> Any:
        key = (str(url), tuple(sorted(kw.items())))
        if key not in engines:
            engines[key] = make(url, **kw)
        return engines[key]

    shared_engine.shared = True  # type: ignore[attr-defined]
    api.create_engine = shared_engine


class Grader:
    """nbgrader's Autograde converter, set up once, applied to one submission at a time."""

    def __init__(self, log_path: str | None = None):
        import warnings

        from sqlalchemy.exc import SAWarning

        # nbgrader's own SQLAlchemy warnings on every submission are noise here.
        warnings.filterwarnings("ignore", category=SAWarning)
        share_engines()
        self.app = nbgrader_app()
        coursedir = self.app.coursedir
        coursedir.db_url = with_busy_timeout(coursedir.db_url)
        config = self.app.config
        if "shutdown_kernel" not in config.Execute:
            config.Execute.shutdown_kernel = "immediate"
        if os.environ.get(KILL_ENV):
            config.Execute.on_cell_complete = _kill_hook
        self.records = _Records()
        self.app.log.addHandler(self.records)
        self.log_path = log_path

    def grade(self, student: str, assignment: str, notebooks: list[str]) -> Result:
        from nbgrader.api import Gradebook
        from nbgrader.converters import Autograde

        start, cpu_start = time.perf_counter(), time.process_time()
        result = Result(student, assignment, notebooks=len(notebooks))
        reasons = _scan(notebooks)
        coursedir = self.app.coursedir
        coursedir.assignment_id, coursedir.student_id = assignment, student
        global _grading
        _grading = student
        for attempt in range(2):
            self.records.records = []
            try:
                converter = Autograde(coursedir=coursedir, parent=self.app)
                converter.force = True
                converter.start()
                ok = True
            except (Exception, SystemExit):
                ok = False
                if not any(r.levelno >= logging.ERROR for r in self.records.records):
                    self.app.log.error("%s", traceback.format_exc())
            locked = any("database is locked" in r.getMessage() for r in self.records.records)
            if ok or not locked or attempt:
                break
        if not ok:
            result.notes.append(_error_note(self.records.records))
            if self.log_path:
                result.notes.append(f"details in {self.log_path}")
        else:
            with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
                submission = gb.find_submission(assignment, student)
                result.score, result.max_score = submission.score, submission.max_score
                result.needs_manual_grade = bool(submission.needs_manual_grade)
            graded = [os.path.join(coursedir.format_path(coursedir.autograded_directory,
                                                         student, assignment), Path(nb).name)
                      for nb in notebooks]
            graded = [path for path in graded if os.path.exists(path)]
            problems, late, result.kernel_cpu_seconds = _records(graded)
            result.notes += problems
            if late:
                result.status = TIMED_OUT
                if not any("timed out" in note for note in result.notes):
                    result.notes.append("a cell ran past the time limit and was stopped")
            elif reasons:
                result.status = SUSPICIOUS
            else:
                result.status = GRADED
        result.notes = reasons + result.notes
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - cpu_start
        return result


def _worker(conn: Any, log_path: str) -> None:
    """A worker process: grade the submissions the parent sends, one student at a time."""
    os.setpgrp()  # its own process group: Ctrl-C in the terminal is the parent's to handle
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # nbgrader's log and the kernels' messages go to the worker's log
    os.dup2(log, 2)
    try:
        grader = Grader(log_path)
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        student, jobs = task
        for assignment, notebooks in jobs:
            print(f"--- {student} {assignment}", flush=True)
            conn.send(("start", student, assignment))
            conn.send(("done", asdict(grader.grade(student, assignment, notebooks))))
        conn.send(("idle",))


# --- the parent -----------------------------------------------------------------------------


class Ledger:
    """Which submissions were graded, one JSON line per event; the last line per submission
    wins. Written by the parent only, flushed to disk line by line."""

    def __init__(self, path: Path):
        self.path = path
        self.last: dict[tuple[str, str], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.last[(entry["student"], entry["assignment"])] = entry
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")

    def write(self, entry: dict) -> None:
        self.last[(entry["student"], entry["assignment"])] = entry
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def done(self, key: tuple[str, str], current_digest: str) -> bool:
        entry = self.last.get(key)
        return bool(entry and entry.get("status") in (GRADED, SUSPICIOUS, TIMED_OUT)
                    and entry.get("digest") == current_digest)


def _prepare_gradebook(coursedir: Any, assignments: Sequence[str], students: Iterable[str]
                       ) -> None:
    """Fail early on an unknown assignment; create the rows that workers would race on."""
    from nbgrader.api import Gradebook, MissingEntry

    url = with_busy_timeout(coursedir.db_url)
    with Gradebook(url):  # nbgrader's SaveAutoGrades opens it with the default course
        pass
    with Gradebook(url, coursedir.course_id) as gb:
        for assignment in assignments:
            try:
                gb.find_assignment(assignment)
            except MissingEntry:
                raise SystemExit(f"error: assignment {assignment!r} is not in the gradebook; "
                                 f"run `nbgrader generate_assignment {assignment}` first") from None
        for student in sorted(students):
            gb.update_or_create_student(student)


def _graded_in_gradebook(coursedir: Any, assignments: Sequence[str]) -> set[tuple[str, str]]:
    from nbgrader.api import Gradebook

    with Gradebook(with_busy_timeout(coursedir.db_url), coursedir.course_id) as gb:
        return {(s.student.id, a) for a in assignments
                for s in gb.find_assignment(a).submissions}


def default_jobs() -> int:
    """One worker more than the cores this process may use: a worker waits for its kernel's
    replies a good part of the time (on two cores, -j 3 kept them 77 % busy against 65 % for
    -j 2, and graded a class in three quarters of the time)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores) + 1


class Pool:
    """Worker processes fed one student at a time; a worker that dies is replaced."""

    def __init__(self, jobs: int, log_dir: Path):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.jobs, self.log_dir = jobs, log_dir
        self.workers: dict[int, dict] = {}  # by id: process, conn, current task
        self.started = 0

    def spawn(self) -> int:
        self.started += 1
        wid = self.started
        parent, child = self.ctx.Pipe()
        log = str(self.log_dir / f"worker-{wid}.log")
        process = self.ctx.Process(target=_worker, args=(child, log), daemon=True,
                                   name=f"autograde-worker-{wid}")
        process.start()
        child.close()
        self.workers[wid] = {"process": process, "conn": parent, "ready": False,
                             "unit": None, "current": None, "log": log,
                             "since": time.monotonic()}
        return wid

    def stop(self, wid: int) -> None:
        worker = self.workers.pop(wid)
        process = worker["process"]
        if process.is_alive():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
        process.join(5)
        worker["conn"].close()

    def close(self) -> None:
        for wid, worker in list(self.workers.items()):
            try:
                worker["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            worker["process"].join(10)
            self.stop(wid)


def _describe_death(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def run(assignments: Sequence[str], students: Sequence[str] | None = None,
        jobs: int | None = None, force: bool = False, timeout: float = 1800.0,
        canary: bool = True, out: TextIO = sys.stdout) -> list[Result]:
    """Grade the submissions of ``assignments`` (of ``students``, or of everyone) on ``jobs``
    workers; print progress and a summary to ``out``; return the results of this run. With
    ``canary``, the model solution of each assignment is graded first, and nothing is graded
    when it loses points (SystemExit with the reason)."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if not Path("nbgrader_config.py").is_file():
        raise SystemExit("error: no nbgrader_config.py here: run this from the course root")
    app = nbgrader_app()
    coursedir = app.coursedir
    root = Path(coursedir.root)
    assignments = assignments or submitted_assignments(coursedir)
    found = submissions(coursedir, assignments, students)
    for student in students or []:
        for assignment in assignments:
            if (student, assignment) not in found:
                say(f"No submission of {assignment} from {student}.")
    if not found:
        say("No submissions to grade under "
            f"{coursedir.format_path(coursedir.submitted_directory, '*', '*')}.")
        return []
    _prepare_gradebook(coursedir, assignments, {s for s, _ in found})
    state = root / STATE_DIR
    (state / "logs").mkdir(parents=True, exist_ok=True)
    ledger = Ledger(state / "ledger.jsonl")
    plan = _plan(coursedir, found, ledger, force)
    if not plan.total:
        say(f"Nothing to grade: {plan.already}.")
        return []
    if canary:
        from bngrade.canary import check

        if not check(sorted({a for _, a in plan.keys()}), root, out=out):
            raise SystemExit("error: the model solution does not get full marks with this "
                             "set-up (see above), so students would be marked down; fix the "
                             "set-up and run again (--no-canary skips this check)")
    jobs = max(1, min(jobs or default_jobs(), len(plan.todo) or 1))
    say(f"Grading {plan.total} submission(s) of {plan.students} student(s) "
        f"({', '.join(assignments)}) on {jobs if plan.todo else 0} worker(s)"
        + (f"; {plan.already}" if plan.skipped else "") + ".")
    start = time.perf_counter()
    try:
        results = _grade(plan, coursedir, jobs, timeout, state, ledger, say)
    finally:
        ledger.file.close()
    summary(results, time.perf_counter() - start, out=out)
    _similarity(assignments, root, results, out)
    return results


@dataclass
class _Plan:
    """What a run grades: per student, its (assignment, notebooks); and the empty folders."""

    todo: dict[str, list] = field(default_factory=dict)
    empty: list[tuple[str, str]] = field(default_factory=list)
    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    skipped: int = 0

    @property
    def total(self) -> int:
        return sum(len(units) for units in self.todo.values()) + len(self.empty)

    @property
    def students(self) -> int:
        return len(set(self.todo) | {s for s, _ in self.empty})

    @property
    def already(self) -> str:
        return f"{self.skipped} submission(s) already graded (--force regrades them)"

    def keys(self) -> list[tuple[str, str]]:
        return [(s, a) for s, units in self.todo.items() for a, _ in units] + self.empty


def _plan(coursedir: Any, found: dict[tuple[str, str], list[str]], ledger: Ledger,
          force: bool) -> _Plan:
    in_gradebook = _graded_in_gradebook(coursedir, sorted({a for _, a in found}))
    plan = _Plan()
    for (student, assignment), notebooks in found.items():
        key = (student, assignment)
        plan.digests[key] = digest(coursedir.format_path(coursedir.submitted_directory,
                                                         student, assignment))
        autograded = coursedir.format_path(coursedir.autograded_directory, student, assignment)
        fresh = all(os.path.exists(os.path.join(autograded, Path(nb).name)) for nb in notebooks)
        if not force and notebooks and fresh and key in in_gradebook and \
                ledger.done(key, plan.digests[key]):
            plan.skipped += 1
        elif notebooks:
            plan.todo.setdefault(student, []).append((assignment, notebooks))
        else:
            plan.empty.append(key)  # nothing for nbgrader to grade
    return plan


def _grade(plan: _Plan, coursedir: Any, jobs: int, timeout: float, state: Path,
           ledger: Ledger, say: Callable[[str], None]) -> list[Result]:
    """Deal the plan's students out to ``jobs`` workers and collect their results."""
    results: list[Result] = []
    pool = Pool(jobs, state / "logs")
    width = len(str(plan.total))
    sw = max(len(s) for s, _ in plan.keys())
    aw = max(len(a) for _, a in plan.keys())
    startup_failures = 0

    def record(result: Result) -> None:
        result.digest = plan.digests[(result.student, result.assignment)]
        results.append(result)
        ledger.write({**asdict(result), "time": time.time()})
        score = ("-" if result.score is None
                 else f"{result.score:g}/{result.max_score:g}")
        note = f"  {result.notes[0]}" if result.notes and result.status != GRADED else ""
        say(f"[student {len(results):>{width}} of {plan.total}] {result.student:<{sw}}  "
            f"{result.assignment:<{aw}}  {score:>9}  {result.status:<10} "
            f"{result.seconds:5.1f} s{note}")

    def give_work(wid: int) -> None:
        worker = pool.workers[wid]
        if queue:
            worker["unit"] = queue.popleft()
            worker["conn"].send(worker["unit"])
        else:
            worker["unit"] = None

    def lost(wid: int, why: str) -> None:
        """A worker is gone: fail what it was grading, requeue the rest of its student."""
        nonlocal startup_failures
        worker = pool.workers[wid]
        current, unit = worker["current"], worker["unit"]
        if not worker["ready"]:
            startup_failures += 1
        pool.stop(wid)
        if current:
            student, assignment = current
            notebooks = dict(unit[1])[assignment] if unit else []
            record(Result(student, assignment, FAILED, notebooks=len(notebooks),
                          seconds=time.monotonic() - worker["since"],
                          notes=[f"the grading worker {why} while grading this submission; "
                                 f"run the same command again to retry "
                                 f"(worker log: {worker['log']})"]))
        if unit:
            rest = [job for job in unit[1] if not current or job[0] != current[1]]
            finished = {(r.student, r.assignment) for r in results}
            rest = [job for job in rest if (unit[0], job[0]) not in finished]
            if rest:
                queue.appendleft((unit[0], rest))

    for student, assignment in plan.empty:
        folder = coursedir.format_path(coursedir.submitted_directory, student, assignment)
        files = sorted(p.name for p in Path(folder).iterdir())
        record(Result(student, assignment, FAILED, notes=[
            f"no notebook (.ipynb) in {folder}: "
            + (", ".join(files[:5]) if files else "the folder is empty")]))
    queue = deque(sorted(plan.todo.items()))
    try:
        for _ in range(jobs if queue else 0):
            pool.spawn()
        from multiprocessing.connection import wait

        while queue or any(w["unit"] for w in pool.workers.values()):
            if startup_failures > jobs + 2:
                raise SystemExit("error: the grading workers fail to start; see "
                                 f"{state / 'logs'}")
            # Keep `jobs` workers while there is work.
            busy = sum(1 for w in pool.workers.values() if w["unit"])
            while len(pool.workers) < jobs and len(queue) > len(pool.workers) - busy:
                pool.spawn()
            waitables = {}
            for wid, worker in pool.workers.items():
                waitables[worker["conn"]] = wid
                waitables[worker["process"].sentinel] = wid
            ready = wait(list(waitables), timeout=5)
            now = time.monotonic()
            for handle in ready:
                wid = waitables[handle]
                if wid not in pool.workers:
                    continue
                worker = pool.workers[wid]
                conn = worker["conn"]
                try:
                    while conn.poll():
                        message = conn.recv()
                        kind = message[0]
                        if kind == "ready":
                            worker["ready"] = True
                            give_work(wid)
                        elif kind == "fatal":
                            say(f"A grading worker could not start:\n{message[1]}")
                            startup_failures = jobs + 3
                        elif kind == "start":
                            worker["current"] = (message[1], message[2])
                            worker["since"] = now
                            ledger.write({"student": message[1], "assignment": message[2],
                                          "status": "started", "time": time.time()})
                        elif kind == "done":
                            worker["current"] = None
                            record(Result(**message[1]))
                        elif kind == "idle":
                            give_work(wid)
                except (EOFError, OSError):
                    worker["process"].join(5)  # the pipe closed: the worker is exiting
                if not worker["process"].is_alive() and wid in pool.workers:
                    if worker["unit"] or not worker["ready"]:
                        lost(wid, _describe_death(worker["process"]))
                    else:
                        pool.stop(wid)
            # The watchdog: a submission that takes far too long stops its worker.
            for wid, worker in list(pool.workers.items()):
                if worker["current"] and now - worker["since"] > timeout:
                    lost(wid, f"was stopped after {timeout:g} s without a result")
    except KeyboardInterrupt:
        say("\nInterrupted: the submissions being graded are left ungraded; "
            "run the same command again to finish.")
        for wid in list(pool.workers):
            pool.stop(wid)
        raise
    finally:
        pool.close()
    return results


def _similarity(assignments: Sequence[str], root: Path, results: list[Result], out: TextIO
                ) -> None:
    """The similarity report of every assignment graded in this run (bngrade.similarity)."""
    from bngrade.similarity import report

    for assignment in sorted({r.assignment for r in results if r.graded}):
        print(f"\nSimilar answers in {assignment} (bncore, the solution, other students):",
              file=out)
        try:
            report(assignment, root, out=out)
        except Exception as error:  # the grades stand without the report
            print(f"  the similarity report failed: {type(error).__name__}: {error}", file=out)


def summary(results: list[Result], elapsed: float, out: TextIO = sys.stdout) -> None:
    """The table of this run's submissions, then the totals."""
    rows = [("student", "assignment", "score", "max", "status", "notes")]
    for r in sorted(results, key=lambda r: (r.student, r.assignment)):
        rows.append((r.student, r.assignment, "-" if r.score is None else f"{r.score:g}",
                     "-" if r.max_score is None else f"{r.max_score:g}", r.status,
                     "; ".join(r.notes)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print(file=out)
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True))
              + "  " + row[5], file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  -----", file=out)
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    notebooks = sum(r.notebooks for r in results)
    manual = sum(r.needs_manual_grade for r in results)
    print(f"\n{len(results)} submission(s): " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
          + f".\n{notebooks} notebook(s) in {elapsed:.1f} s"
          + (f" ({elapsed / notebooks:.2f} s per notebook)." if notebooks else "."), file=out)
    if manual:
        print(f"{manual} submission(s) have answers to grade by hand (nbgrader formgrader).",
              file=out)
    if counts[FAILED]:
        print("Failed submissions were not graded: see the notes, fix what is needed, and run "
              "the same command again (it grades only what is missing).", file=out)
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bngrade.autograde",
        description="Autograde a class with nbgrader, in parallel (one worker more than the "
        "cores).",
        epilog="Run from the course root (where nbgrader_config.py is).")
    parser.add_argument("assignments", nargs="*", metavar="ASSIGNMENT")
    parser.add_argument("--all", action="store_true",
                        help="every assignment that has submissions")
    parser.add_argument("--student", action="append", metavar="ID",
                        help="grade only this student (repeatable)")
    parser.add_argument("--jobs", "-j", type=int, default=None,
                        help="worker processes (default: one more than the cores, "
                        f"{default_jobs()})")
    parser.add_argument("--force", action="store_true",
                        help="regrade submissions that an earlier run graded")
    parser.add_argument("--no-canary", action="store_true",
                        help="do not grade the model solution first")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds after which a submission's worker is stopped "
                             "(default 1800; nbgrader's Execute.timeout limits each cell)")
    args = parser.parse_args(argv)
    if bool(args.assignments) == args.all:
        parser.error("name the assignment(s) to grade, or give --all")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        results = run(args.assignments, students=args.student, jobs=args.jobs,
                      force=args.force, timeout=args.timeout, canary=not args.no_canary)
    except KeyboardInterrupt:
        return 130
    return 1 if any(not r.graded for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
