"""How a graded notebook runs for the self-check and the grader alike (bncore.runner): one rule
for a test cell's verdict, agreeing with nbgrader's scoring; hidden regions; the modules a
checked kernel may not import; warnings that cost nothing."""

from __future__ import annotations

import nbformat
import pytest
from nbgrader.utils import determine_grade

from bncore import runner
from tests.course import ASSIGNMENTS, ROOT


def graded_cell(outputs):
    cell = nbformat.v4.new_code_cell("pass")
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True,
                                 "grade_id": "t", "points": 3, "schema_version": 3}
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    return cell


STDOUT = {"output_type": "stream", "name": "stdout", "text": "checked\n"}
WARNING = {"output_type": "stream", "name": "stderr",
           "text": "DeprecationWarning: `row_stack` alias is deprecated\n"}
ERROR = {"output_type": "error", "ename": "AssertionError", "evalue": "dx is wrong",
         "traceback": []}
NUMBER = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
          "data": {"text/plain": "0.5"}}
TEXT = {"output_type": "execute_result", "execution_count": 1, "metadata": {},
        "data": {"text/plain": "'full marks'"}}


@pytest.mark.parametrize("outputs, passed", [
    ([], True), ([STDOUT], True), ([WARNING], True), ([STDOUT, WARNING, STDOUT], True),
    ([NUMBER], True), ([TEXT], True), ([ERROR], False), ([WARNING, ERROR], False),
    ([NUMBER, ERROR], False),
])
def test_nbgrader_scores_a_test_cell_as_the_course_rule_says(outputs, passed):
    cell = graded_cell(runner.scoring_outputs(outputs))
    assert runner.outcome(cell)[0] is passed
    score, max_score = determine_grade(cell)
    assert score == (max_score if passed else 0)


def test_warnings_written_as_stderr_would_cost_points_without_the_rule():
    assert determine_grade(graded_cell([WARNING]))[0] == 0  # nbgrader's own rule
    assert determine_grade(graded_cell(runner.scoring_outputs([WARNING])))[0] == 3


def test_split_hidden_keeps_the_lines_where_they_were():
    source = "a = 1\n### BEGIN HIDDEN TESTS\nb = 2\n### END HIDDEN TESTS\nc = 3"
    visible, hidden = runner.split_hidden(source)
    assert visible.split("\n") == ["a = 1", "", "", "", "c = 3"]
    assert hidden.split("\n") == ["", "", "b = 2", "", ""]


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_a_checked_kernel_cannot_import_the_reference(assignment):
    notebook = nbformat.read(ROOT / "exercises" / assignment / f"{assignment}.ipynb", 4)
    blocked = set(runner.blocked_modules(notebook))
    assert {"bncore.numpy", "bncore.torch", "bncore.optim", "bncore.tracking",
            "torch"} <= blocked
    assert "bncore.check" not in blocked
    if assignment.startswith("ch2"):
        assert not {"bncore.nets", "bncore.data"} & blocked  # the net the answers watch


def test_cell_names_count_code_cells_as_jupyterlab_numbers_them():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell("a = 1"),
        nbformat.v4.new_markdown_cell("text"), nbformat.v4.new_code_cell("b = 2")])
    nb.cells[3].metadata["nbgrader"] = {"grade_id": "test_b"}
    assert runner.cell_name(nb, 1) == "cell [1]"
    assert runner.cell_name(nb, 3) == "cell [2] (test_b)"


# The test cell's own warning is raised here, in the checker's process: not the notebook's.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_warnings_in_the_answer_and_in_the_test_cost_nothing(tmp_path):
    """A correct answer that warns (NumPy's deprecated row_stack, a batch-of-one variance), and
    a test whose own NumPy warns, pass; a failing assertion still fails."""
    from bncore.check import run_checks

    answer = ("import warnings\n\n"
              "def stack(rows):\n"
              "    warnings.warn('row_stack is deprecated', DeprecationWarning)\n"
              "    spread = np.array([1.0]).var(ddof=1)  # RuntimeWarning, result unused\n"
              "    return np.vstack(rows)\n")
    good = ("out = nb.stack([np.ones(2), np.zeros(2)])\nnp.log(np.zeros(1))\n"
            "assert out.shape == (2, 2)")
    bad = "assert nb.stack([np.ones(2)]).shape == (2, 2), 'two rows expected'"
    cells = [nbformat.v4.new_code_cell("import numpy as np\nfrom bncore.check import nb"),
             nbformat.v4.new_code_cell(answer), nbformat.v4.new_code_cell(good),
             nbformat.v4.new_code_cell(bad)]
    metas = [{"grade_id": "setup", "locked": True, "grade": False, "solution": False},
             {"grade_id": "answer", "locked": False, "grade": False, "solution": True},
             {"grade_id": "test_good", "locked": True, "grade": True, "solution": False,
              "points": 1},
             {"grade_id": "test_bad", "locked": True, "grade": True, "solution": False,
              "points": 1}]
    for cell, meta in zip(cells, metas, strict=True):
        cell.metadata["nbgrader"] = {"schema_version": 3, **meta}
    checks, errors, _ = run_checks(nbformat.v4.new_notebook(cells=cells), timeout=60)
    verdicts = {grade_id: (passed, message) for _, grade_id, _, passed, message in checks}
    assert verdicts["test_good"] == (True, "")
    assert verdicts["test_bad"] == (False, "AssertionError: two rows expected")
    assert not errors
    good_cell = cells[2]
    assert "DeprecationWarning" in "".join(o.get("text", "") for o in good_cell.outputs)
    assert determine_grade(good_cell)[0] == 1
