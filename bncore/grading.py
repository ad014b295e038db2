"""Grading: helpers for the graded notebooks' hidden tests, and the course's nbgrader tooling.

In a graded notebook (``solutions/<assignment>/<assignment>.ipynb``) the hidden tests compute the
expected values with bncore, then call the student's function inside :func:`reference_forbidden`,
so that an answer which merely calls bncore's own implementation (directly, through an alias, or
through a copy of the module object) fails. :func:`assert_close` compares a result with the
expected one and, when they differ, says which common mistake the result matches.

For instructors (run from the repository root)::

    python -m bncore.grading release     # = make exercises: solutions/ -> exercises/

:class:`HideHiddenTests` is the feedback preprocessor configured in ``nbgrader_config.py``: it
removes the hidden tests from the feedback, code and tracebacks alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The repository (the nbgrader course root) when bncore is installed editable from it.
ROOT = _PACKAGE_DIR.parent
# The implementation modules an answer must not call while it is being graded (optim.py:
# chapter 1's gradient descent).
REFERENCE_FILES = frozenset(
    str(_PACKAGE_DIR / name) for name in ("numpy.py", "torch.py", "optim.py")
)
_is_reference_file: dict[str, bool] = {}

BEGIN_HIDDEN = "BEGIN HIDDEN TESTS"


class ReferenceCalled(AssertionError):
    """Raised when graded code calls bncore's reference implementation."""


def _calls_reference(filename: str) -> bool:
    known = _is_reference_file.get(filename)
    if known is None:
        known = _is_reference_file[filename] = os.path.realpath(filename) in REFERENCE_FILES
    return known


@contextlib.contextmanager
def reference_forbidden(what: str = "your answer"):
    """Fail if any function defined in bncore.numpy or bncore.torch runs inside the block.

    Calls are watched with a profile hook (``sys.setprofile``, and ``threading.setprofile`` for
    threads started in the block); an answer that removes the hook fails as well.

    >>> with reference_forbidden("batchnorm_forward"):
    ...     out = batchnorm_forward(x, gamma, beta)
    """
    called: list[str] = []

    def profiler(frame, event, arg):
        if event == "call" and _calls_reference(frame.f_code.co_filename):
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    previous_threads = threading.getprofile()
    sys.setprofile(profiler)
    threading.setprofile(profiler)
    try:
        yield
    finally:
        hook_kept = sys.getprofile() is profiler
        sys.setprofile(previous)
        threading.setprofile(previous_threads)
    if not hook_kept:
        raise ReferenceCalled(
            f"{what} replaced the profile hook (sys.setprofile) that the grader uses to check "
            "for calls into bncore; leave it alone."
        )
    if called:
        raise ReferenceCalled(
            f"{what} calls bncore's reference implementation ({called[0]}); "
            "write the computation yourself with NumPy."
        )


def assert_close(
    name: str,
    actual,
    expected,
    *,
    mistakes: Iterable[tuple[str, object]] = (),
    rtol: float = 1e-7,
    atol: float = 1e-9,
    hint: str = "",
) -> None:
    """Fail with a message that says what is wrong when ``actual`` does not match ``expected``.

    Checks, in this order: a float array at all, the shape, the dtype (it must be the expected
    one, so float32 in gives float32 out), then the values (``np.allclose(actual, expected,
    rtol, atol)``). When the shape or the values are wrong, ``mistakes`` -- pairs of
    ``(message, wrong_result)``, where ``wrong_result`` is computed the way the mistake would
    compute it -- are tried in order, and the first one that ``actual`` matches (with the same
    tolerances) names the error. ``hint`` is appended to every message.

    >>> assert_close("dgamma", dgamma, expected, mistakes=[
    ...     ("dgamma is summed over the features; sum over the batch (axis 0)", wrong)])
    """
    suffix = f" {hint}" if hint else ""
    expected = np.asarray(expected)
    if actual is None:
        raise AssertionError(f"{name} is None: did you forget to return it?{suffix}")
    try:
        actual = np.asarray(actual)
    except ValueError as error:
        raise AssertionError(f"{name} is not an array ({error}).{suffix}") from None
    if actual.dtype.kind not in "fc":
        raise AssertionError(f"{name} should be a float array, got dtype {actual.dtype}.{suffix}")

    mistakes = list(mistakes)

    def named_mistake() -> str | None:
        for message, wrong in mistakes:
            wrong = np.asarray(wrong)
            if wrong.shape == actual.shape and np.allclose(actual, wrong, rtol=rtol, atol=atol):
                return message
        return None

    if actual.shape != expected.shape:
        message = named_mistake() or "check which axis you reduce over"
        raise AssertionError(
            f"{name} has shape {actual.shape}, expected {expected.shape}: {message}.{suffix}"
        )
    if actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name} is {actual.dtype}, expected {expected.dtype} (the input's dtype): keep "
            f"the computation in the input's dtype; don't create float64 arrays, e.g. "
            f"np.zeros(D) without dtype=x.dtype.{suffix}"
        )
    if np.allclose(actual, expected, rtol=rtol, atol=atol):
        return
    message = named_mistake()
    if message is None and not np.all(np.isfinite(actual)):
        message = "it contains NaN or inf"
    if message is None:
        scale = np.maximum(np.abs(expected), np.abs(actual)).max()
        error = np.abs(actual - expected).max() / max(float(scale), 1e-300)
        message = f"largest error {error:.1e} relative to the largest value"
    raise AssertionError(f"{name} is wrong: {message}.{suffix}")


# --- chapter 3: common mistakes in batch norm's forward and backward passes --------------------


def forward_mistakes(x, gamma, beta, eps):
    """(message, wrong output) for the usual mistakes in the forward pass of an (N, D) batch."""
    mu, var = x.mean(axis=0), x.var(axis=0)
    xc = x - mu
    xhat = xc / np.sqrt(var + eps)
    mu_f, var_f = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    return [
        ("the variance is the unbiased one (divides by N - 1); batch norm normalizes with the "
         "biased batch variance (divide by N)",
         gamma * xc / np.sqrt(x.var(axis=0, ddof=1) + eps) + beta),
        ("eps is added outside the square root; divide by sqrt(var + eps)",
         gamma * xc / (np.sqrt(var) + eps) + beta),
        ("eps is missing; divide by sqrt(var + eps)", gamma * xc / np.sqrt(var) + beta),
        ("the square root is missing; divide by sqrt(var + eps), not by var + eps",
         gamma * xc / (var + eps) + beta),
        ("the statistics are taken over the features (axis 1); batch norm averages over the "
         "batch (axis 0), one mean and variance per feature",
         gamma * (x - mu_f) / np.sqrt(var_f + eps) + beta),
        ("gamma and beta are not applied: out = gamma * xhat + beta", xhat),
        ("gamma and beta are swapped: out = gamma * xhat + beta", beta * xhat + gamma),
        ("beta is not added: out = gamma * xhat + beta", gamma * xhat),
        ("gamma is not applied: out = gamma * xhat + beta", xhat + beta),
    ]


def backward_mistakes(dout, x, gamma, eps):
    """The usual mistakes in the backward pass, as ``{"dx": [...], "dgamma": [...],
    "dbeta": [...]}`` lists of (message, wrong gradient) for :func:`assert_close`."""
    n = x.shape[0]
    xc = x - x.mean(axis=0)
    std = np.sqrt(x.var(axis=0) + eps)
    xhat = xc / std
    mean_dy, mean_dy_xhat = dout.mean(axis=0), (dout * xhat).mean(axis=0)
    std_u = np.sqrt(x.var(axis=0, ddof=1) + eps)
    xhat_u = xc / std_u
    dx_unbiased = gamma / std_u * (dout - mean_dy - xhat_u * (dout * xhat_u).sum(axis=0) / (n - 1))
    return {
        "dx": [
            ("the term -mean(dy) is missing: every x_k moves the batch mean, so the path "
             "through mu contributes to dx",
             gamma / std * (dout - xhat * mean_dy_xhat)),
            ("the term -xhat * mean(dy * xhat) is missing: every x_k moves the batch variance, "
             "so the path through the variance contributes to dx",
             gamma / std * (dout - mean_dy)),
            ("dx treats the batch mean and variance as constants (dx = gamma / sigma * dy); "
             "they depend on every x_k too",
             gamma / std * dout),
            ("the variance term has the wrong sign",
             gamma / std * (dout - mean_dy + xhat * mean_dy_xhat)),
            ("the factor gamma is missing: out = gamma * xhat + beta, so d(xhat) = gamma * dy",
             (dout - mean_dy - xhat * mean_dy_xhat) / std),
            ("dx is the gradient for the unbiased variance (N - 1); batch norm uses the biased "
             "batch variance (N)",
             dx_unbiased),
        ],
        "dgamma": [
            ("dgamma is summed over the features (axis 1); gamma is shared by the N rows of the "
             "batch, so sum over the batch (axis 0)",
             (dout * xhat).sum(axis=1)),
            ("dgamma is not summed over the batch; gamma is shared by the N rows, so add up "
             "their contributions (sum over axis 0)",
             dout * xhat),
            ("dgamma averages over the batch; add up (sum) the contributions of the N rows",
             (dout * xhat).mean(axis=0)),
            ("dgamma uses x instead of xhat: out = gamma * xhat + beta",
             (dout * x).sum(axis=0)),
        ],
        "dbeta": [
            ("dbeta is summed over the features (axis 1); beta is shared by the N rows of the "
             "batch, so sum over the batch (axis 0)",
             dout.sum(axis=1)),
            ("dbeta is not summed over the batch; beta is shared by the N rows, so add up their "
             "contributions (sum over axis 0)",
             dout),
            ("dbeta averages over the batch; add up (sum) the contributions of the N rows",
             dout.mean(axis=0)),
        ],
    }


# --- nbgrader tooling --------------------------------------------------------------------------


def assignments(root: Path | str = ROOT) -> list[str]:
    """The course's assignments: the folders under solutions/ that hold a notebook."""
    source = Path(root) / "solutions"
    return sorted(
        folder.name
        for folder in source.iterdir()
        if folder.is_dir() and not folder.name.startswith(".") and any(folder.glob("*.ipynb"))
    ) if source.is_dir() else []


def nbgrader_command() -> list[str]:
    """The nbgrader command of this Python environment."""
    script = Path(sys.executable).with_name("nbgrader")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nbgrader"]


def release(
    names: Sequence[str] | None = None,
    *,
    root: Path | str = ROOT,
    release_directory: Path | str | None = None,
) -> list[str]:
    """Regenerate the student release with ``nbgrader generate_assignment --force``.

    Releases the assignments ``names``, or all of them (in one nbgrader run), to
    ``exercises/`` (the course's release directory), or to ``release_directory`` when given.
    Nothing is written to a gradebook (``--no-db``), so no gradebook.db is left behind.
    Returns the assignments released.
    """
    extra = ["--force", "--no-db", "--log-level=WARN"]
    if release_directory is not None:
        extra.append(f"--CourseDirectory.release_directory={Path(release_directory).resolve()}")
    for name in names or ["*"]:
        subprocess.run([*nbgrader_command(), "generate_assignment", name, *extra],
                       cwd=root, check=True)
    return list(names) if names else assignments(root)


# --- feedback ----------------------------------------------------------------------------------

_ERROR_NOTE = "(The traceback is not shown: this test cell contains hidden tests.)"
_REDACTED = "[hidden test code removed]"


def hidden_code(source: str, begin: str = BEGIN_HIDDEN, end: str = "END HIDDEN TESTS") -> list[str]:
    """The lines of a cell's hidden test regions (stripped, at least 10 characters long)."""
    lines, inside = [], False
    for line in source.split("\n"):
        if begin in line:
            inside = True
        elif end in line:
            inside = False
        elif inside and len(line.strip()) >= 10:
            lines.append(line.strip())
    return lines


def hide_hidden_outputs(cell, hidden: Sequence[str] = ()) -> None:
    """Make a test cell's outputs safe to show when the cell holds hidden tests.

    Error outputs are cut down to the exception's type and message: an IPython traceback
    quotes the lines around the failing one, which can be hidden test code, while the message
    (written by the test) is what the student should read. Any output line that contains one
    of the ``hidden`` code lines (an answer can print its caller's source) is replaced.
    """

    def redact(text: str) -> str:
        return "\n".join(_REDACTED if any(code in line for code in hidden) else line
                         for line in text.split("\n"))

    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "error":
            evalue = redact(str(output.get("evalue", "")))
            output["evalue"] = evalue
            output["traceback"] = [f"{output.get('ename', 'Error')}: {evalue}", _ERROR_NOTE]
        elif kind == "stream":
            text = output.get("text", "")
            output["text"] = redact("".join(text) if isinstance(text, list) else text)
        elif kind in ("display_data", "execute_result"):
            for mime, value in output.get("data", {}).items():
                if isinstance(value, list):
                    value = "".join(value)
                if isinstance(value, str) and not mime.startswith("image/"):
                    output["data"][mime] = redact(value)


def _hide_hidden_tests_class():
    from nbgrader.preprocessors import ClearHiddenTests, GetGrades
    from traitlets import List

    class HideHiddenTests(ClearHiddenTests):
        """nbgrader's ClearHiddenTests for feedback: in every cell that holds hidden tests,
        remove the hidden test code, from the source and from the outputs (tracebacks cut
        down to the exception's message)."""

        # Configurable, as in GetGrades: the HTML exporter's config sets it for every
        # preprocessor, and nbgrader's base class would warn that it is not.
        display_data_priority = List(GetGrades().display_data_priority).tag(config=True)

        def preprocess_cell(self, cell, resources, cell_index):
            had_hidden = self.begin_test_delimeter in cell.source
            begin, end = self.begin_test_delimeter, self.end_test_delimeter
            hidden = [begin, end, *hidden_code(cell.source, begin, end)]
            cell, resources = super().preprocess_cell(cell, resources, cell_index)
            if had_hidden:
                hide_hidden_outputs(cell, hidden)
            return cell, resources

    HideHiddenTests.__module__ = __name__
    HideHiddenTests.__qualname__ = "HideHiddenTests"
    return HideHiddenTests


def __getattr__(name: str):
    # HideHiddenTests subclasses an nbgrader class; nbgrader takes seconds to import, and the
    # hidden tests import this module in every graded notebook, so it is built on first use.
    if name == "HideHiddenTests":
        cls = globals()["HideHiddenTests"] = _hide_hidden_tests_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bncore.grading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rel = commands.add_parser("release", help="regenerate exercises/ from solutions/ (nbgrader)")
    rel.add_argument("assignments", nargs="*", help="default: every assignment under solutions/")
    rel.add_argument("--release-directory", help="write here instead of exercises/")
    args = parser.parse_args(argv)
    if args.command == "release":
        names = release(args.assignments, release_directory=args.release_directory)
        print(f"released {len(names)} assignment(s): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
