"""Releasing the graded notebooks: ``python -m bngrade release`` (``make exercises``).

For every assignment under ``solutions/`` (or the ones named):

1. the instructor's notebook gets the current set-up cell (``bncore.bootstrap``: it installs
   bncore at this version where a student's Python lacks it) and its assignment name in its
   metadata (``metadata.bncore.assignment``, which finds the notebook whatever its file name);
2. ``nbgrader generate_assignment --force`` writes the student version to ``exercises/``:
   answers become stubs, hidden tests are removed;
3. the released test cells are stored in ``bncore/releases.json``, so that bncore's
   self-check can run them where a notebook is not a file (Colab).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nbformat

from bncore import bootstrap
from bncore.runner import grade_ids, is_setup_cell, is_test_cell, nbgrader_meta
from bngrade.course import assignments, nbgrader_command

BOOTSTRAP_ID = "bootstrap"


def prepare_source(path: Path, assignment: str) -> bool:
    """Bring an instructor notebook's set-up cell and metadata up to date; True if changed."""
    notebook = nbformat.read(path, as_version=4)
    before = nbformat.writes(notebook)
    cells = [c for c in notebook.cells if nbgrader_meta(c).get("grade_id") == BOOTSTRAP_ID]
    if not cells:
        raise ValueError(f"{path}: no locked code cell with grade_id {BOOTSTRAP_ID!r} (the "
                         "set-up cell that installs bncore must be the first code cell)")
    cells[0].source = bootstrap.cell_source().rstrip("\n")
    notebook.metadata.setdefault("bncore", {})["assignment"] = assignment
    after = nbformat.writes(notebook)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"), encoding="utf-8")
    return after != before


def released_tests(notebook: Any) -> dict[str, Any]:
    """What bncore's self-check needs of a released notebook: its set-up cell, its test cells
    (with their numbers among the code cells) and every locked cell in order (to put edited or
    deleted ones back, as grading does)."""
    tests, locked, number, setup = [], [], 0, ""
    for cell in notebook.cells:
        meta = nbgrader_meta(cell)
        if meta.get("locked") and meta.get("grade_id"):
            locked.append({"grade_id": meta["grade_id"], "cell_type": cell.cell_type,
                           "source": cell.source, "nbgrader": dict(meta),
                           "tags": list(cell.metadata.get("tags", []))})
        if cell.cell_type != "code":
            continue
        number += 1
        if is_setup_cell(cell):
            setup = cell.source
        elif is_test_cell(cell):
            tests.append({"grade_id": meta["grade_id"], "points": float(meta["points"]),
                          "source": cell.source, "number": number})
    return {"setup": setup, "tests": tests, "locked": locked, "order": grade_ids(notebook)}


def release(names: Sequence[str] | None = None, *, root: Path | str = ".",
            release_directory: Path | str | None = None) -> list[str]:
    """Release ``names`` (default: every assignment) as the module docstring says; nothing is
    written to a gradebook (``--no-db``). Returns the assignments released."""
    root = Path(root).resolve()
    names = list(names) if names else assignments(root)
    for name in names:
        for path in sorted((root / "solutions" / name).glob("*.ipynb")):
            prepare_source(path, name)
    extra = ["--force", "--no-db", "--log-level=WARN"]
    if release_directory is not None:
        extra.append(f"--CourseDirectory.release_directory={Path(release_directory).resolve()}")
    for name in names:
        subprocess.run([*nbgrader_command(), "generate_assignment", name, *extra],
                       cwd=root, check=True)
    if release_directory is None:
        write_releases(root)
    return names


def write_releases(root: Path) -> Path | None:
    """``bncore/releases.json`` from the course's ``exercises/`` (when bncore is in the course
    folder, as in the repository)."""
    target = root / "bncore" / "releases.json"
    if not target.parent.is_dir():
        return None
    found = {}
    for name in assignments(root):
        path = root / "exercises" / name / f"{name}.ipynb"
        if path.is_file():
            found[name] = released_tests(nbformat.read(path, as_version=4))
    target.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return target
