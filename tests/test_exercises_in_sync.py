"""exercises/ is what `nbgrader generate_assignment` makes of solutions/, byte for byte.

The release is regenerated into a temporary folder with the same command as `make exercises`
(python -m bncore.grading release) and compared with the committed one. Generation is
deterministic, so nothing needs to be ignored.
"""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

import pytest

from bncore import grading

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = grading.assignments(ROOT)


def files(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and ".ipynb_checkpoints" not in p.parts}


@pytest.fixture(scope="module")
def fresh_release(tmp_path_factory):
    """Every assignment released into a temporary folder, in one nbgrader run."""
    folder = tmp_path_factory.mktemp("exercises")
    try:
        grading.release(release_directory=folder)
    except subprocess.CalledProcessError:
        pass  # an assignment that fails to generate fails its own test below, with the error
    return folder


def test_every_release_has_a_source():
    released = {p.name for p in (ROOT / "exercises").iterdir() if p.is_dir()} \
        if (ROOT / "exercises").exists() else set()
    assert released == set(ASSIGNMENTS), (
        f"exercises/ holds {sorted(released)}, solutions/ {sorted(ASSIGNMENTS)}: run "
        "`make exercises` (and remove releases whose source is gone)")


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_exercises_in_sync(assignment, fresh_release):
    if not (fresh_release / assignment).exists():
        grading.release([assignment], release_directory=fresh_release)
    fresh, committed = fresh_release / assignment, ROOT / "exercises" / assignment
    assert files(fresh) == files(committed), (
        f"exercises/{assignment} differs from a fresh release: run `make exercises`")
    for name in sorted(files(fresh)):
        new, old = (fresh / name).read_bytes(), (committed / name).read_bytes()
        if new != old:
            diff = difflib.unified_diff(
                old.decode(errors="replace").splitlines(),
                new.decode(errors="replace").splitlines(),
                f"exercises/{assignment}/{name}", "fresh release", lineterm="", n=1)
            shown = "\n".join(list(diff)[:40])
            pytest.fail(f"exercises/{assignment}/{name} is out of date: run `make exercises`\n"
                        f"{shown}")
