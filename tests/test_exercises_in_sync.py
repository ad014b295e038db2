"""exercises/ is what `nbgrader generate_assignment` makes of solutions/, byte for byte, and
bncore/releases.json holds its test cells.

The release is regenerated into a temporary folder with the same command as `make exercises`
(python -m bngrade release) and compared with the committed one. Generation is deterministic,
so nothing needs to be ignored. The solutions' set-up cells install the current bncore.
"""

from __future__ import annotations

import difflib
import json
import subprocess
from pathlib import Path

import nbformat
import pytest

from bncore import bootstrap
from bngrade import release
from tests.course import ASSIGNMENTS, ROOT

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading


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
        release.release(root=ROOT, release_directory=folder)
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
        release.release([assignment], root=ROOT, release_directory=fresh_release)
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


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_set_up_cell_installs_this_bncore(assignment):
    """A version bump without `make exercises` would leave notebooks installing an old bncore."""
    notebook = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", 4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code[0].metadata["nbgrader"]["grade_id"] == release.BOOTSTRAP_ID
    assert code[0].source == bootstrap.cell_source().rstrip("\n"), "run `make exercises`"


def test_releases_json_holds_the_released_tests():
    stored = json.loads((ROOT / "bncore" / "releases.json").read_text())
    assert set(stored) == set(ASSIGNMENTS)
    for assignment in ASSIGNMENTS:
        notebook = nbformat.read(ROOT / "exercises" / assignment / f"{assignment}.ipynb", 4)
        assert stored[assignment] == release.released_tests(notebook), "run `make exercises`"
