"""Feedback without the hidden tests: the feedback preprocessor of ``nbgrader_config.py``.

nbgrader's default feedback shows the autograded notebook as it is, hidden tests included.
:class:`HideHiddenTests` removes the hidden test code from the cells that hold it (nbgrader's
ClearHiddenTests), keeps only the message of their errors, and removes any line of hidden test
code that appears in any output. The hidden tests run in the grader's process, so a student's
code never sees them; the last two steps are a second line of defence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nbgrader.preprocessors import ClearHiddenTests, GetGrades
from traitlets import Bool, List

from bncore.runner import BEGIN_HIDDEN, END_HIDDEN, is_test_cell, split_hidden

_ERROR_NOTE = "(The traceback is not shown: this test cell contains hidden tests.)"
_REDACTED = "[hidden test code removed]"


def hidden_code(source: str, begin: str = BEGIN_HIDDEN, end: str = END_HIDDEN) -> list[str]:
    """The lines of a cell's hidden test regions (stripped, at least 10 characters long)."""
    hidden = split_hidden(source, begin, end)[1]
    return [line.strip() for line in hidden.split("\n") if len(line.strip()) >= 10]


_MAX_MESSAGE = 2000  # characters of an error message shown in feedback


def hide_hidden_outputs(cell: Any, hidden: Sequence[str] = (), *,
                        cut_tracebacks: bool = True) -> None:
    """Make a cell's outputs safe to show a student.

    With ``cut_tracebacks`` (cells that hold hidden tests), error outputs are cut down to the
    exception's type and message: an IPython traceback quotes the lines around the failing
    one, which can be hidden test code, while the message (written by the test) is what the
    student should read. In every output, any line that contains one of the ``hidden`` code
    lines (an answer can print its caller's source) is replaced.
    """

    def redact(text: str) -> str:
        return "\n".join(_REDACTED if any(code in line for code in hidden) else line
                         for line in text.split("\n"))

    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "error":
            evalue = redact(str(output.get("evalue", "")))
            if len(evalue) > _MAX_MESSAGE:
                evalue = evalue[:_MAX_MESSAGE] + " [...]"
            output["evalue"] = evalue
            if cut_tracebacks:
                output["traceback"] = [f"{output.get('ename', 'Error')}: {evalue}", _ERROR_NOTE]
            else:
                output["traceback"] = [redact(line) for line in output.get("traceback", [])]
        elif kind == "stream":
            text = output.get("text", "")
            output["text"] = redact("".join(text) if isinstance(text, list) else text)
        elif kind in ("display_data", "execute_result"):
            for mime, value in output.get("data", {}).items():
                if isinstance(value, list):
                    value = "".join(value)
                if isinstance(value, str) and not mime.startswith("image/"):
                    output["data"][mime] = redact(value)


class HideHiddenTests(ClearHiddenTests):
    """nbgrader's ClearHiddenTests for feedback (see the module docstring)."""

    # Configurable, as in GetGrades: the HTML exporter's config sets it for every
    # preprocessor, and nbgrader's base class would warn that it is not.
    display_data_priority = List(GetGrades().display_data_priority).tag(config=True)
    # A submission may write "BEGIN HIDDEN TESTS" in its own cells: remove that region too,
    # rather than fail the student's feedback.
    enforce_metadata = Bool(False).tag(config=True)

    def preprocess(self, nb: Any, resources: Any) -> tuple[Any, Any]:
        begin, end = self.begin_test_delimeter, self.end_test_delimeter
        self._hidden = [begin, end]
        for cell in nb.cells:
            if is_test_cell(cell):
                self._hidden += hidden_code(cell.source, begin, end)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell: Any, resources: Any, cell_index: int
                        ) -> tuple[Any, Any]:
        test = is_test_cell(cell)
        had_hidden = test and self.begin_test_delimeter in cell.source
        if test:  # a student's own cells may say "BEGIN HIDDEN TESTS" without an end
            cell, resources = super().preprocess_cell(cell, resources, cell_index)
        hide_hidden_outputs(cell, self._hidden, cut_tracebacks=had_hidden)
        return cell, resources
