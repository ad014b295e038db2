"""The instructors' tools, in process and in milliseconds: the runner's ledger, the submission
repair, the static scan, the similarity report, the canary's verdict."""

from __future__ import annotations

import json

import nbformat
import pytest

from bngrade import scan, similarity
from bngrade.autograde import FAILED, GRADED, Ledger
from bngrade.canary import CanaryResult
from bngrade.submissions import is_code_answer, model_answer
from tests.course import ASSIGNMENTS, ROOT

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

# --- the ledger of python -m bngrade.autograde -----------------------------------------------


def test_the_ledger_keeps_the_last_entry_per_submission_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.write({"student": "a", "assignment": "x", "status": "started"})
    ledger.write({"student": "a", "assignment": "x", "status": GRADED, "digest": "d1"})
    ledger.write({"student": "b", "assignment": "x", "status": FAILED, "digest": "d2"})
    ledger.file.close()
    with path.open("a") as handle:
        handle.write('{"student": "c", "assign')  # the process died mid-line
    again = Ledger(path)
    assert again.done(("a", "x"), "d1")
    assert not again.done(("a", "x"), "changed since")  # the submission changed: regrade
    assert not again.done(("b", "x"), "d2")  # failed: graded again next time
    assert not again.done(("c", "x"), "")
    again.file.close()


# --- repairing a submission before nbgrader reads it ------------------------------------------


@pytest.fixture
def gradebook(tmp_path, monkeypatch):
    """A gradebook that knows a two-cell assignment, as generate_assignment leaves it."""
    import os
    import sys

    from nbgrader.api import Gradebook

    # nbgrader runs `alembic` by name (nbgrader_config.py puts this Python's bin on PATH too).
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable),
                                                os.environ["PATH"]]))
    url = f"sqlite:///{tmp_path / 'gradebook.db'}"
    with Gradebook(url) as gb:
        gb.add_assignment("a")
        gb.add_notebook("a", "a")
        gb.add_grade_cell("test_x", "a", "a", max_score=3, cell_type="code")
        gb.add_source_cell("setup", "a", "a", cell_type="code", locked=True,
                           source="import numpy as np", checksum="c0")
        gb.add_source_cell("test_x", "a", "a", cell_type="code", locked=True,
                           source="assert nb.x() == 1", checksum="c1")
    return url


def _cell(source, **meta):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["nbgrader"] = {"schema_version": 3, **meta}
    return cell


def test_sanitize_restores_metadata_and_puts_deleted_locked_cells_back(gradebook, tmp_path):
    from traitlets.config import Config

    from bngrade.sanitize import SanitizeSubmission

    config = Config()
    config.CourseDirectory.root = str(tmp_path)
    # The student deleted the setup cell, gave the test 100 points and an old schema version.
    tampered = _cell("print('all checks passed')", grade_id="test_x", grade=True, points=100,
                     locked=False, solution=False)
    tampered.metadata["nbgrader"]["schema_version"] = 1
    forged = _cell("x = 1", grade_id="no_such_cell", grade=True, points=5)
    nb = nbformat.v4.new_notebook(cells=[forged, tampered])
    resources = {"nbgrader": {"db_url": gradebook, "notebook": "a", "assignment": "a"}}
    nb, _ = SanitizeSubmission(config=config).preprocess(nb, resources)
    metas = [c.metadata.get("nbgrader") for c in nb.cells]
    assert metas[0]["grade_id"] == "setup" and metas[0]["locked"]  # put back, first
    assert nb.cells[0].source == "import numpy as np"
    assert "nbgrader" not in nb.cells[1].metadata  # an unknown id: the student's own cell
    test = metas[2]
    assert (test["points"], test["locked"], test["schema_version"]) == (3.0, True, 3)


# --- the static scan ----------------------------------------------------------------------------


@pytest.mark.parametrize("source, reason", [
    ("import os\nos._exit(0)", "exits the kernel"),
    ("import sys\nsys.exit()", "exits"),
    ("import bncore.numpy as bn", "reference implementation"),
    ("from torch.nn import functional", "PyTorch"),
    ("from sklearn.preprocessing import StandardScaler", "scikit-learn"),
    ("import builtins\nbuiltins.len = None", "builtins"),
    ("get_ipython().input_transformers_post.append(f)", "changes how cells run"),
    ("open('/etc/passwd').read()", "opens files"),
    ("exec(source)", "runs generated code"),
    ("import subprocess", "starts processes"),
    ("import ctypes", "ctypes"),
    ("!rm -rf ~", "shell command"),
    ("%run other.py", "magic %run"),
    ("try:\n    pass\nexcept KeyboardInterrupt:\n    pass", "catches KeyboardInterrupt"),
    ("def f(:\n    open('x')", "opens files"),  # a syntax error: still scanned
    ("class Yes(np.ndarray):\n    pass", "subclasses np.ndarray"),
    ("class Always:\n    def __eq__(self, other):\n        return True", "defines __eq__"),
    ("real = __bncore_server__", "touches __bncore_server__"),
    ("x.__class__ = Liar", "changes an object's class"),
])
def test_scan_flags_what_reaches_outside_an_answer(source, reason):
    found = scan.scan_code(source)
    assert any(reason in r for r in found), found


@pytest.mark.parametrize("source, flagged", [
    ("rel_error = lambda a, b: 0.0", True),
    ("if True:\n    def rel_error(a, b):\n        return 0.0", True),
    ("def f():\n    global rel_error\n    rel_error = None", True),
    ("def f(x):\n    rel_error = x.max()\n    return rel_error", False),  # a local name
    ("print(rel_error(a, b))", False),
])
def test_scan_flags_an_answer_that_redefines_a_locked_helper(source, flagged):
    found = scan.redefined_helpers(source, {"rel_error": "setup"})
    assert found == (["redefines rel_error, a helper of the locked cell setup"] if flagged
                     else []), found


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_scan_finds_nothing_in_the_model_answers(assignment):
    nb = nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", 4)
    for cell in nb.cells:
        if is_code_answer(cell):
            assert scan.scan_code(model_answer(cell.source)) == [], cell.source


# --- similarity ------------------------------------------------------------------------------

ANSWER = '''
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Mine."""
    mu = x.mean(axis=0)
    xc = x - mu
    var = (xc * xc).mean(axis=0)
    std = np.sqrt(var + eps)
    xhat = xc / std
    out = gamma * xhat + beta
    return out, (xc, var, std, xhat, gamma, eps)
'''

RENAMED = '''
def batchnorm_forward(inputs, g, b, eps=1e-5):
    # a copy with other names, other comments, other layout
    m = inputs.mean(axis=0); centred = inputs - m
    v = (centred * centred).mean(axis=0)
    s = np.sqrt(v + eps)
    normed = centred / s
    result = g * normed + b
    return result, (centred, v, s, normed, g, eps)
'''

OTHER = '''
def batchnorm_forward(x, gamma, beta, eps=1e-5):
    n = x.shape[0]
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        column = x[:, j]
        total = 0.0
        for value in column:
            total += value
        mean = total / n
        spread = sum((value - mean) ** 2 for value in column) / n
        out[:, j] = gamma[j] * (column - mean) / (spread + eps) ** 0.5 + beta[j]
    return out, (x, gamma, beta, eps)
'''


def test_renaming_and_reformatting_do_not_hide_a_copy():
    a, b, c = (similarity.shingles(similarity.normalized_tokens(s))
               for s in (ANSWER, RENAMED, OTHER))
    assert similarity.jaccard(a, b) == 1.0
    assert similarity.jaccard(a, c) < 0.3


def _submission(tmp_path, student, source):
    cell = _cell(source, grade_id="forward", solution=True, grade=False, locked=False)
    path = tmp_path / f"{student}.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    return path


def test_the_report_pairs_students_and_names_the_reference_they_copied(tmp_path):
    import inspect

    from bncore import numpy as reference

    copied = inspect.getsource(reference.batch_norm_forward)
    submissions = {"ann": _submission(tmp_path, "ann", ANSWER),
                   "bob": _submission(tmp_path, "bob", RENAMED),
                   "cat": _submission(tmp_path, "cat", OTHER),
                   "dan": _submission(tmp_path, "dan", copied)}
    found = similarity.compare("a", submissions, threshold=0.8)
    pairs = {(m.student, m.other) for m in found}
    assert ("ann", "bob") in pairs
    assert ("dan", "bncore.numpy.batch_norm_forward") in pairs
    assert not any("cat" in pair for pair in pairs)
    csv_path = tmp_path / "report.csv"
    similarity.write_csv(found, csv_path)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "similarity,assignment,cell,student,matches" and len(rows) == len(found) + 1


# --- the canary's verdict --------------------------------------------------------------------


def test_the_canary_says_which_test_failed_and_why():
    broken = CanaryResult("ch3", score=0.0, max_score=12.0,
                          failures=["cell [4] (test_forward): NameError: name 'np' is not "
                                    "defined"])
    assert not broken.ok
    assert "earns only 0 of 12" in broken.describe() and "test_forward" in broken.describe()
    assert CanaryResult("ch3", score=12.0, max_score=12.0).ok
    assert not CanaryResult("ch3", error="DeadKernelError: kernel died").ok


def test_every_notebook_names_its_assignment_in_its_metadata():
    for assignment in ASSIGNMENTS:
        for folder in ("solutions", "exercises"):
            path = ROOT / folder / assignment / f"{assignment}.ipynb"
            meta = json.loads(path.read_text())["metadata"]
            assert meta["bncore"]["assignment"] == assignment, path


def test_the_size_bound_skips_only_pairs_below_the_threshold():
    """``similar`` leaves out a pair without intersecting it only when the sizes alone rule
    the threshold out; every pair it keeps has the Jaccard index ``jaccard`` gives."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        a = frozenset(rng.sample(range(60), rng.randint(0, 40)))
        b = frozenset(rng.sample(range(60), rng.randint(0, 40)))
        threshold = rng.choice([0.3, 0.5, 0.8])
        kept = similarity.similar(a, b, threshold)
        exact = similarity.jaccard(a, b)
        assert kept == (exact if exact >= threshold else None), (len(a), len(b), threshold)
