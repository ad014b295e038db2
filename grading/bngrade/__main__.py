"""``python -m bngrade COMMAND``: the instructors' commands (see the package's docstring)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from bngrade import __doc__ as PACKAGE_DOC


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bngrade", description=PACKAGE_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rel = commands.add_parser("release", help="regenerate exercises/ from solutions/ (nbgrader)")
    rel.add_argument("assignments", nargs="*", help="default: every assignment under solutions/")
    rel.add_argument("--release-directory", help="write here instead of exercises/")
    can = commands.add_parser("canary", help="grade the model solution: exit 1 if it loses points")
    can.add_argument("assignments", nargs="+")
    scan = commands.add_parser("scan", help="list what is suspicious in submitted notebooks")
    scan.add_argument("notebooks", nargs="+")
    sim = commands.add_parser("similarity", help="answers that match bncore, the solution or "
                              "another student's (CSV)")
    sim.add_argument("assignment")
    sim.add_argument("--threshold", type=float, default=0.8, help="report pairs at or above "
                     "this similarity (0 to 1; default 0.8)")
    sim.add_argument("--csv", help="where to write the CSV (default .grading/similarity-A.csv)")
    written = commands.add_parser(
        "written", help="list the answers graded by hand, or --score one")
    written.add_argument("assignment")
    written.add_argument("--pending", action="store_true", help="only those not graded yet")
    written.add_argument("--score", nargs=3, metavar=("STUDENT", "CELL", "POINTS"))
    written.add_argument("--comment", help="with --score: a comment for the feedback")
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args)


def _release(args: argparse.Namespace) -> int:
    from bngrade.release import release

    names = release(args.assignments, release_directory=args.release_directory)
    print(f"released {len(names)} assignment(s): {', '.join(names)}")
    return 0


def _canary(args: argparse.Namespace) -> int:
    from bngrade.canary import check

    return 0 if check(args.assignments) else 1


def _scan(args: argparse.Namespace) -> int:
    from bngrade.scan import scan_submission

    suspicious = 0
    for notebook in args.notebooks:
        problems = scan_submission(notebook)
        suspicious += bool(problems)
        print(f"{notebook}: " + ("clean" if not problems else "\n  " + "\n  ".join(problems)))
    return 1 if suspicious else 0


def _similarity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bngrade.similarity import report

    report(args.assignment, csv_path=Path(args.csv) if args.csv else None,
           threshold=args.threshold)
    return 0


def _written(args: argparse.Namespace) -> int:
    from bngrade.written import set_written_score, written_answers

    if args.score:
        student, cell, points = args.score
        set_written_score(args.assignment, student, cell, float(points), args.comment)
        print(f"{student} {cell}: {float(points):g} points")
        return 0
    answers = written_answers(args.assignment, pending_only=args.pending)
    for item in answers:
        score = "not graded" if item["score"] is None else f"{item['score']:g}"
        print(f"--- {item['student']}  {item['cell']}  ({score} of {item['points']:g} points)")
        print(textwrap.indent(item["answer"].strip() or "(no answer)", "    "))
    print(f"{len(answers)} answer(s). Grade one: python -m bngrade written {args.assignment} "
          "--score STUDENT CELL POINTS [--comment TEXT]")
    return 0


COMMANDS = {"release": _release, "canary": _canary, "scan": _scan, "similarity": _similarity,
            "written": _written}


if __name__ == "__main__":
    sys.exit(main())
