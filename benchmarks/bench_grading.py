"""Autograde throughput: plain ``nbgrader autograde`` against ``python -m bngrade.autograde``.

    .venv/bin/python benchmarks/bench_grading.py                  # 100 students x 5 assignments
    .venv/bin/python benchmarks/bench_grading.py --students 20    # a smaller class
    .venv/bin/python benchmarks/bench_grading.py --profile        # where one notebook's time goes

A synthetic class is built in a temporary course (a copy of solutions/ and nbgrader_config.py,
released with ``nbgrader generate_assignment``): every student hands in all five assignments,
each submission one of three kinds, in turn, as bngrade.submissions builds them: ``full``
(every answer from the solution), ``partial`` (the first code answer only) and ``untouched``
(the release as is). Then, measured in this one run:

- ``nbgrader autograde``: the plain command, one assignment after another, on the first
  ``--baseline`` students (default 4, so 4 per assignment); its time per notebook is extrapolated
  to the class (its start-up, measured separately, is paid once per assignment);
- ``bngrade.autograde -j 1``: the runner with one worker on the same students (what a long-lived
  worker saves, without parallelism);
- ``bngrade.autograde -j N``: the runner on the whole class as an instructor runs it, the canary
  before and the similarity report after included (``--jobs``, default the runner's own: one
  more than the cores; the target is stated for two cores).

Both graders must give the same grades to the students they both graded (checked). Printed:
seconds per notebook (wall clock), the speed-up over plain nbgrader, and the time for 1000
notebooks, against the target of 10 minutes on two cores. How busy the machine's cores were
during each step (everybody's work) and the load average are printed too: on a shared machine
the wall clock includes waiting for other people's work.

``--profile`` grades one ``full`` submission of each assignment in this process and splits its
time: nbgrader's own steps (sanitizing, the gradebook, writing), the kernel's start and stop, and
every cell (the slowest are listed).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from bncore.runner import nbgrader_meta
from bngrade.autograde import default_jobs
from bngrade.course import assignments as course_assignments
from bngrade.course import nbgrader_command
from bngrade.submissions import submission_kinds

ROOT = Path(__file__).resolve().parents[1]

PYTHON = sys.executable
KINDS = ("full", "partial", "untouched")
TARGET_NOTEBOOKS, TARGET_SECONDS = 1000, 600


def make_course(course: Path, students: int, assignments: list[str]) -> dict:
    """A course with every student's submission of every assignment; {(student, a): kind}."""
    course.mkdir(parents=True)
    shutil.copytree(ROOT / "solutions", course / "solutions")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    subprocess.run([*nbgrader_command(), "generate_assignment", "*", "--force",
                    "--log-level=ERROR"], cwd=course, check=True, capture_output=True)
    kinds = {}
    for j, assignment in enumerate(assignments):
        name = f"{assignment}.ipynb"
        release = nbformat.read(course / "exercises" / assignment / name, as_version=4)
        solution = nbformat.read(course / "solutions" / assignment / name, as_version=4)
        notebooks = submission_kinds(release, solution)
        for i in range(students):
            student = f"s{i:03d}"
            kind = KINDS[(i + j) % len(KINDS)]
            folder = course / "submitted" / student / assignment
            folder.mkdir(parents=True)
            nbformat.write(notebooks[kind], folder / name)
            kinds[(student, assignment)] = kind
    return kinds


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every user's work included."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def timed(command: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds of a command, and how busy the machine's cores were meanwhile (0 to 1,
    everybody's work: on a shared machine, a number near 1 means the grader had to share)."""
    busy0, total0 = machine_cpu()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    busy1, total1 = machine_cpu()
    return wall, (busy1 - busy0) / max(total1 - total0, 1e-9), done


def scores(course: Path, assignments: list[str]) -> dict:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "batchnorm-course") as gb:
        return {(s.student.id, a): s.score for a in assignments
                for s in gb.find_assignment(a).submissions}


def per_submission(course: Path, what: str = "seconds") -> dict[str, list[float]]:
    """Per submission, by assignment, from the runner's ledger: ``seconds`` inside a worker
    (wall clock), the worker's ``cpu_seconds``, or its kernel's ``kernel_cpu_seconds``."""
    found: dict[str, list[float]] = {}
    for line in (course / ".grading" / "autograde" / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("status") not in (None, "started") and entry.get(what) is not None:
            found.setdefault(entry["assignment"], []).append(entry[what])
    return dict(sorted(found.items()))


def where_time_goes(course: Path) -> None:
    """Per assignment, the median submission: wall seconds in the worker, and the CPU
    seconds of the worker (nbgrader, the test cells) and of the notebook's kernel."""
    walls, graders = per_submission(course), per_submission(course, "cpu_seconds")
    kernels = per_submission(course, "kernel_cpu_seconds")
    med = statistics.median
    print(f"{'per submission (median)':<28}{'wall s':>8}{'grader CPU s':>14}{'kernel CPU s':>14}")
    for assignment, wall in walls.items():
        kernel = f"{med(kernels[assignment]):.2f}" if assignment in kernels else "-"
        print(f"{assignment:<28}{med(wall):>8.2f}{med(graders.get(assignment, [0])):>14.2f}"
              f"{kernel:>14}")
    every = [sum(v, []) for v in (list(walls.values()), list(graders.values()),
                                  list(kernels.values()))]
    print(f"{'all (mean)':<28}" + "".join(
        f"{statistics.mean(v):>{w}.2f}" if v else f"{'-':>{w}}"
        for v, w in zip(every, (8, 14, 14), strict=True)))


def throughput(args, assignments) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-grading-"))
    try:
        load0 = os.getloadavg()
        print(f"Building a class of {args.students} students x {len(assignments)} assignments "
              f"in {work} ...", flush=True)
        t0 = time.perf_counter()
        kinds = make_course(work / "class", args.students, assignments)
        print(f"  built in {time.perf_counter() - t0:.0f} s "
              f"({sum(k == 'full' for k in kinds.values())} full, "
              f"{sum(k == 'partial' for k in kinds.values())} partial, "
              f"{sum(k == 'untouched' for k in kinds.values())} untouched)", flush=True)
        nb_class = len(kinds)

        # The baseline course: the same course (already released), first few students only.
        base = work / "baseline"
        shutil.copytree(work / "class", base)
        for folder in (base / "submitted").iterdir():
            if int(folder.name[1:]) >= args.baseline:
                shutil.rmtree(folder)
        single = work / "single"
        shutil.copytree(base, single)
        nb_base = args.baseline * len(assignments)

        rows = []
        # nbgrader's start-up, paid once per `nbgrader autograde` command.
        start_wall = min(timed([*nbgrader_command(), "autograde", assignments[0],
                                "--student", "nobody", "--log-level=ERROR"], base)[0]
                         for _ in range(2))

        print(f"Plain nbgrader autograde, {nb_base} notebooks, one assignment after another ...",
              flush=True)
        wall, busy = 0.0, []
        for assignment in assignments:
            w, b, done = timed([*nbgrader_command(), "autograde", assignment,
                                "--log-level=ERROR"], base)
            if done.returncode:
                sys.exit(f"nbgrader autograde {assignment} failed:\n{done.stderr[-3000:]}")
            wall += w
            busy.append(b)
        # Per notebook without the start-up, then the start-up spread over a class this size.
        runs = len(assignments)
        seq_wall = (wall - runs * start_wall) / nb_base + runs * start_wall / nb_class
        rows.append(("nbgrader autograde (sequential)", nb_base, wall, wall / nb_base,
                     seq_wall, statistics.mean(busy)))

        print(f"bngrade.autograde -j 1, the same {nb_base} notebooks ...", flush=True)
        w1, b1, done = timed([PYTHON, "-m", "bngrade.autograde", "--all", "--jobs", "1",
                              "--no-canary"], single)
        if done.returncode:
            sys.exit(f"the runner failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        # Its start-up (the parent, a worker loading nbgrader) is what the worker's own
        # per-submission times do not cover; spread over the class as for nbgrader.
        inside = sum(per_submission(single).values(), [])
        fixed = max(w1 - sum(inside), 0.0)
        rows.append(("bngrade.autograde -j 1", nb_base, w1, w1 / nb_base,
                     (w1 - fixed) / nb_base + fixed / nb_class, b1))

        print(f"bngrade.autograde -j {args.jobs}, the whole class: {nb_class} notebooks ...",
              flush=True)
        # As an instructor runs it: the canary first, the similarity report last.
        wj, bj, done = timed([PYTHON, "-m", "bngrade.autograde", "--all", "--jobs",
                              str(args.jobs)], work / "class")
        if done.returncode:
            sys.exit(f"the runner failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append((f"bngrade.autograde -j {args.jobs}", nb_class, wj, wj / nb_class,
                     wj / nb_class, bj))
        print("  " + "\n  ".join(done.stdout.strip().splitlines()[-4:]))

        # Same grades from both graders, for the students both graded.
        plain, parallel = scores(base, assignments), scores(work / "class", assignments)
        single_scores = scores(single, assignments)
        differ = [k for k in plain if plain[k] != parallel.get(k) or plain[k] != single_scores[k]]
        load1 = os.getloadavg()

        print(f"\nAutograde throughput: {len(assignments)} assignments; load average "
              f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end, {os.cpu_count()} cores")
        print(f"{'grader':<34}{'notebooks':>10}{'wall s':>9}{'s/nb':>7}{'s/nb class':>12}"
              f"{'speed-up':>10}{'1000 nb':>10}{'cores busy':>12}")
        for name, n, w, per, per_class, busy in rows:
            print(f"{name:<34}{n:>10}{w:>9.1f}{per:>7.2f}{per_class:>12.2f}"
                  f"{seq_wall / per_class:>9.2f}x{per_class * TARGET_NOTEBOOKS / 60:>8.1f} min"
                  f"{busy:>12.0%}")
        print(f"(s/nb class: the start-up, {start_wall:.1f} s per nbgrader command, "
              f"{fixed:.1f} s for the runner, spread over the class; cores busy: the whole "
              "machine, everybody's work)")
        per_nb = rows[-1][4]
        projected = per_nb * TARGET_NOTEBOOKS
        print(f"\n{TARGET_NOTEBOOKS} notebooks with bngrade.autograde -j {args.jobs}: "
              f"{projected / 60:.1f} min at the measured rate. Target: under "
              f"{TARGET_SECONDS // 60} min on two cores: "
              f"{'met' if projected < TARGET_SECONDS else 'missed'}.")
        where_time_goes(work / "class")
        print(f"Grades: {'the same' if not differ else 'DIFFERENT'} for the {len(plain)} "
              "submissions graded by both (plain nbgrader, -j 1 and -j N)")
        if differ:
            sys.exit(f"grades differ: {differ[:5]}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def kernel_manager(config, course: Path):
    """The kernel manager the course's grader uses: sandboxed, warm where bwrap is used."""
    from bngrade.sandbox import SandboxedKernelManager

    km = SandboxedKernelManager(kernel_name="python3", config=config)
    km.course_root = str(course)
    return km


def profile(args, assignments) -> None:
    """Split the grading of one full submission of each assignment into its parts."""
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient

    from bngrade.autograde import Grader

    work = Path(tempfile.mkdtemp(prefix="bench-grading-"))
    try:
        kinds = make_course(work / "c", len(KINDS), assignments)
        course = work / "c"
        os.chdir(course)
        grader = Grader()
        print(f"\nOne full submission per assignment, median of {args.repeats} runs (wall s):")
        print(f"{'assignment':<26}{'autograde':>10}{'nbgrader':>10}{'execute':>9}{'k start':>9}"
              f"{'cells':>8}{'k stop':>8}{'rest':>7}   slowest cells")
        for assignment in assignments:
            student = next(s for (s, a), k in kinds.items() if a == assignment and k == "full")
            path = course / "submitted" / student / assignment / f"{assignment}.ipynb"
            totals, executes, starts, cells_t, stops, cells = [], [], [], [], [], {}
            for _ in range(args.repeats):
                prof = cProfile.Profile()
                prof.enable()
                t = time.perf_counter()
                result = grader.grade(student, assignment, [str(path)])
                totals.append(time.perf_counter() - t)
                prof.disable()
                assert result.graded, result
                # The Execute step: the outermost `preprocess` of an Execute class.
                executes.append(max(v[3] for k, v in pstats.Stats(prof).stats.items()
                                    if k[2] == "preprocess" and k[0].endswith(
                                        ("nbconvert/preprocessors/execute.py",
                                         "bngrade/execute.py"))))
                # The kernel and the cells alone, outside nbgrader (which sets this while it
                # grades, and removes it after).
                os.environ["NBGRADER_EXECUTION"] = "autograde"
                nb = nbformat.read(path, as_version=4)
                km = kernel_manager(grader.app.config, course)
                client = NotebookClient(nb, km=km, timeout=60, allow_errors=True,
                                        resources={"metadata": {"path": str(path.parent)}})
                t = time.perf_counter()
                with client.setup_kernel(cwd=str(path.parent)):
                    starts.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for i, cell in enumerate(nb.cells):
                        c0 = time.perf_counter()
                        client.execute_cell(cell, i)
                        if cell.cell_type == "code":
                            name = nbgrader_meta(cell).get("grade_id", f"cell {i}")
                            cells.setdefault(name, []).append(time.perf_counter() - c0)
                    cells_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                run_sync(km.shutdown_kernel)(now=False)
                stops.append(time.perf_counter() - t)
            med = statistics.median
            slow = sorted(((med(v), k) for k, v in cells.items()), reverse=True)[:3]
            rest = med(executes) - med(starts) - med(cells_t) - med(stops)
            print(f"{assignment:<26}{med(totals):>10.2f}{med(totals) - med(executes):>10.2f}"
                  f"{med(executes):>9.2f}{med(starts):>9.2f}{med(cells_t):>8.2f}"
                  f"{med(stops):>8.2f}{rest:>7.2f}   "
                  + ", ".join(f"{k} {s:.2f}" for s, k in slow))
        print("autograde: nbgrader's Autograde converter on the submission, in a warm worker; "
              "nbgrader: its time outside the Execute step (sanitizing, the gradebook, reading "
              "and writing); execute: the Execute step; k start / cells / k stop: the same "
              "notebook run by nbclient alone, in the course's kernel (sandboxed where the "
              "course sandboxes it), stopped gracefully; rest: execute minus those three (the "
              "course's Execute step's own work, e.g. checks between cells).")
    finally:
        os.environ.pop("NBGRADER_EXECUTION", None)
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=100, help="class size (default 100)")
    parser.add_argument("--baseline", type=int, default=4,
                        help="students graded by plain nbgrader (default 4)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help=f"runner workers (default the runner's, {default_jobs()})")
    parser.add_argument("--profile", action="store_true",
                        help="split one notebook's time into its parts instead")
    parser.add_argument("--repeats", type=int, default=3, help="runs per notebook (--profile)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary course")
    args = parser.parse_args()
    assignments = course_assignments(ROOT)
    if args.profile:
        profile(args, assignments)
    else:
        args.baseline = min(args.baseline, args.students)
        throughput(args, assignments)


if __name__ == "__main__":
    main()
