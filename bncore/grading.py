"""Grading: helpers for the graded notebooks' hidden tests, and the course's nbgrader tooling.

In a graded notebook (``solutions/<assignment>/<assignment>.ipynb``) the hidden tests compute the
expected values with bncore, then call the student's function inside :func:`reference_forbidden`,
so that an answer which merely calls bncore's own implementation (directly, through an alias, or
through a copy of the module object) fails. :func:`assert_close` compares a result with the
expected one and, when they differ, says which common mistake the result matches.

While a notebook is autograded (bncore/sandbox.py), :class:`GraderHooks` seals numpy, bncore,
builtins and IPython's hooks before the first cell and puts them back before every test cell;
:func:`reference_forbidden` and :func:`assert_close` fail a test whose graded code patched them.

For students::

    python -m bncore.grading check NOTEBOOK   # the self-check: exit 1 when a test fails
    self_check("NOTEBOOK")                    # the same, from the notebook's last cell

For instructors (run from the repository root; book/instructors.md has the whole round)::

    python -m bncore.grading release          # = make exercises: solutions/ -> exercises/
    python -m bncore.grading scan NOTEBOOK... # what is suspicious in submissions
    python -m bncore.grading written ASSIGNMENT [--score STUDENT CELL POINTS]

:class:`HideHiddenTests` is the feedback preprocessor configured in ``nbgrader_config.py``: it
removes the hidden tests from the feedback, code and tracebacks alike. For the class runner
(``python -m bncore.autograde``): :func:`scan_submission`, :func:`timed_out` and
:func:`grading_problems`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
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

BEGIN_HIDDEN = "BEGIN HIDDEN TESTS"


class ReferenceCalled(AssertionError):
    """Raised when graded code calls bncore's reference implementation."""


class GradingTampered(AssertionError):
    """Raised when graded code changed numpy, bncore or builtins while it was being graded."""


@functools.lru_cache(maxsize=4096)  # a cache that graded code cannot fill with wrong answers
def _calls_reference(filename: str, _reference_files=REFERENCE_FILES) -> bool:
    return os.path.realpath(filename) in _reference_files


@contextlib.contextmanager
def reference_forbidden(what: str = "your answer", functions: Sequence = ()):
    """Fail if any function defined in bncore.numpy or bncore.torch runs inside the block.

    functions: further reference answers (functions or code objects) that must not run, for a
    module that also holds code the answer may call (``bncore.tracking`` holds the net that
    chapter 2's answers train, so only its answers are forbidden, not the whole file).

    Calls are watched with a profile hook (``sys.setprofile``, and ``threading.setprofile`` for
    threads started in the block); an answer that removes the hook fails as well.

    >>> with reference_forbidden("batchnorm_forward"):
    ...     out = batchnorm_forward(x, gamma, beta)
    """
    called: list[str] = []
    forbidden_code = frozenset(getattr(f, "__code__", f) for f in functions)

    def profiler(frame, event, arg):
        if event == "call" and (frame.f_code in forbidden_code
                                or _calls_reference(frame.f_code.co_filename)):
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
    GraderHooks.verify(what)


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
    GraderHooks.verify(name)
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


# --- the grading environment: sealed by the grader, put back before every test cell -------------

_MISSING = object()
# Modules always sealed, with every loaded module under these packages.
_SEALED_PREFIXES = ("numpy", "bncore")
_SEALED_ALWAYS = ("builtins", "math", "numpy", "numpy.testing", "bncore", "bncore.grading",
                  "bncore.numpy")
# Builtins that change legitimately: IPython's output history, and the names that IPython and
# ipykernel swap in while a cell runs (the grader seals and restores between cells).
_BUILTINS_SKIPPED = re.compile(
    r"^(_(?!_(import|build_class)__$)|input|exit|quit|get_ipython|display|dreload)")


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - the kernel always has IPython
        return None
    return get_ipython()


class GraderHooks:
    """The grader's side of a graded kernel (see bncore.sandbox.GradingExecute).

    Before the first cell runs, the grader seals the environment: it imports the modules the
    tests and the locked cells use and records numpy's, bncore's and builtins' functions (and
    their code objects), ``sys.modules``, the import machinery, the trace and profile hooks,
    and IPython's input and AST transformers, exception handlers and event callbacks; after
    each locked cell (the setup), the names that cell defined. Before every test cell it calls
    :meth:`restore`, which puts all of that back, so a submission that patched
    ``np.allclose``, ``bncore.grading.assert_close``, ``builtins.__import__`` or the setup's
    ``rel_error`` is graded with the originals. :meth:`verify` (run by
    :func:`reference_forbidden` and :func:`assert_close`) fails a test whose graded code
    patched any of it while it ran. Outside grading nothing is sealed and both do nothing.

    The grader reaches this class by walking ``object.__subclasses__()`` inside a user
    expression: no name that a submission can rebind, and no input transformer, is involved.
    """

    _state: dict | None = None

    @classmethod
    def call(cls, action: str, arguments: str) -> str:
        args = json.loads(arguments)
        if action == "seal":
            result = cls.seal(*args)
        elif action == "seal_names":
            result = cls.seal_names(*args)
        elif action == "restore":
            result = {"restored": cls.restore()}
        else:
            raise ValueError(f"unknown grader action {action!r}")
        return json.dumps(result if result is not None else {})

    @classmethod
    def seal(cls, modules: Sequence[str] = ()) -> dict:
        import importlib

        for name in (*_SEALED_ALWAYS, *modules):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 -- a test's own import error shows in its cell
                pass
        names = {n for n in sys.modules if n in _SEALED_ALWAYS or n in modules
                 or n.split(".")[0] in _SEALED_PREFIXES}
        state: dict = {"modules": {}, "functions": [], "classes": [], "user": {}}
        for name in sorted(names):
            module = sys.modules.get(name)
            if module is None:
                continue
            own = name.split(".")[0] == "bncore"
            saved = {}
            for key, value in vars(module).items():
                if key.startswith("__") and key not in ("__import__", "__build_class__"):
                    continue
                if name == "builtins" and _BUILTINS_SKIPPED.match(key):
                    continue
                if callable(value) or isinstance(value, type(sys)):
                    saved[key] = value
                cls._seal_function(state, value, f"{name}.{key}")
                if own and isinstance(value, type) and value.__module__ == name:
                    methods = {k: v for k, v in vars(value).items() if callable(v)}
                    state["classes"].append((value, methods, f"{name}.{key}"))
                    for k, v in methods.items():
                        cls._seal_function(state, v, f"{name}.{key}.{k}")
            state["modules"][name] = (module, saved)
        state["sys"] = {"meta_path": list(sys.meta_path), "path_hooks": list(sys.path_hooks),
                        "excepthook": sys.excepthook, "trace": sys.gettrace(),
                        "profile": sys.getprofile()}
        shell = _shell()
        state["shell"] = shell
        if shell is not None:
            state["ipython"] = cls._ipython_state(shell)
        cls._state = state
        return {"modules": len(state["modules"]), "functions": len(state["functions"])}

    @staticmethod
    def _seal_function(state: dict, value, label: str) -> None:
        function = getattr(value, "_implementation", value)  # numpy's dispatchers
        code = getattr(function, "__code__", None)
        if code is not None and hasattr(function, "__defaults__"):
            state["functions"].append(
                (function, code, function.__defaults__, function.__kwdefaults__, label))

    @staticmethod
    def _ipython_state(shell) -> dict:
        manager = getattr(shell, "input_transformer_manager", None)
        lists = {"input_transformers_cleanup": shell.input_transformers_cleanup,
                 "input_transformers_post": shell.input_transformers_post,
                 "ast_transformers": shell.ast_transformers}
        for attr in ("cleanup_transforms", "line_transforms", "token_transformers"):
            if manager is not None and isinstance(getattr(manager, attr, None), list):
                lists[f"input_transformer_manager.{attr}"] = getattr(manager, attr)
        objects = [shell] + ([shell.kernel] if getattr(shell, "kernel", None) else [])
        classes = []
        for obj in objects:
            for klass in type(obj).__mro__:
                if klass.__module__.split(".")[0] in ("IPython", "ipykernel"):
                    classes.append((klass, {k: v for k, v in vars(klass).items()
                                            if callable(v)}))
        return {
            "lists": {name: (lst, list(lst)) for name, lst in lists.items()},
            "callbacks": {event: (lst, list(lst))
                          for event, lst in shell.events.callbacks.items()},
            "custom": (shell.custom_exceptions, shell.CustomTB),
            "instances": [(obj, set(vars(obj))) for obj in objects],
            "classes": classes,
        }

    @classmethod
    def seal_names(cls, names: Sequence[str]) -> dict:
        """Record the values of ``names`` in the user's namespace (a locked cell's names)."""
        state, shell = cls._state, _shell()
        if state is None or shell is None:
            return {}
        for name in names:
            if name in shell.user_ns:
                state["user"][name] = shell.user_ns[name]
        return {"names": sorted(state["user"])}

    @classmethod
    def _compare(cls, fix: bool, everything: bool) -> list[str]:
        state = cls._state
        if state is None:
            return []
        changed: list[str] = []
        for name, (module, saved) in state["modules"].items():
            if sys.modules.get(name) is not module:
                changed.append(f"sys.modules[{name!r}]")
                if fix:
                    sys.modules[name] = module
            current = vars(module)
            for key, value in saved.items():
                if current.get(key, _MISSING) is not value:
                    changed.append(f"{name}.{key}")
                    if fix:
                        current[key] = value
        for function, code, defaults, kwdefaults, label in state["functions"]:
            if (function.__code__ is not code or function.__defaults__ is not defaults
                    or function.__kwdefaults__ is not kwdefaults):
                changed.append(f"the code of {label}")
                if fix:
                    function.__code__ = code
                    function.__defaults__ = defaults
                    function.__kwdefaults__ = kwdefaults
        for klass, methods, label in state["classes"]:
            for key, value in methods.items():
                if vars(klass).get(key, _MISSING) is not value:
                    changed.append(f"{label}.{key}")
                    if fix:
                        setattr(klass, key, value)
        if not everything:
            return changed
        saved_sys = state["sys"]
        for attr in ("meta_path", "path_hooks"):
            if getattr(sys, attr) != saved_sys[attr]:
                changed.append(f"sys.{attr}")
                if fix:
                    getattr(sys, attr)[:] = saved_sys[attr]
        if sys.excepthook is not saved_sys["excepthook"]:
            changed.append("sys.excepthook")
            if fix:
                sys.excepthook = saved_sys["excepthook"]
        if sys.gettrace() is not saved_sys["trace"] or sys.getprofile() is not saved_sys["profile"]:
            changed.append("the trace or profile hook")
            if fix:
                sys.settrace(saved_sys["trace"])
                sys.setprofile(saved_sys["profile"])
        if threading.gettrace() is not None or threading.getprofile() is not None:
            changed.append("threading's trace or profile hook")
            if fix:
                threading.settrace(None)
                threading.setprofile(None)
        shell = state["shell"]
        if shell is not None:
            user = shell.user_ns
            for name, value in state["user"].items():
                if user.get(name, _MISSING) is not value:
                    changed.append(f"the setup's name {name!r}")
                    if fix:
                        user[name] = value
            changed += cls._compare_ipython(state["ipython"], shell, fix)
        return changed

    @staticmethod
    def _compare_ipython(saved: dict, shell, fix: bool) -> list[str]:
        changed = []
        for name, (lst, items) in saved["lists"].items():
            if lst != items:
                changed.append(f"IPython's {name}")
                if fix:
                    lst[:] = items
        for event, (lst, items) in saved["callbacks"].items():
            if lst != items:
                changed.append(f"IPython's {event} callbacks")
                if fix:
                    lst[:] = items
        exceptions, handler = saved["custom"]
        if shell.custom_exceptions != exceptions or shell.CustomTB != handler:
            changed.append("IPython's custom exception handler")
            if fix:
                shell.custom_exceptions, shell.CustomTB = exceptions, handler
        for obj, keys in saved["instances"]:
            for key in set(vars(obj)) - keys:
                if callable(getattr(type(obj), key, None)):
                    changed.append(f"{type(obj).__name__}.{key} (on the instance)")
                    if fix:
                        delattr(obj, key)
        for klass, methods in saved["classes"]:
            for key, value in methods.items():
                if vars(klass).get(key, _MISSING) is not value:
                    changed.append(f"{klass.__name__}.{key}")
                    if fix:
                        setattr(klass, key, value)
        return changed

    @classmethod
    def restore(cls) -> list[str]:
        """Put the sealed environment back; what had changed."""
        return cls._compare(fix=True, everything=True)

    @classmethod
    def verify(cls, what: str = "your code") -> None:
        """Fail when numpy, bncore or builtins differ from the sealed environment."""
        if cls._state is None:
            return
        changed = cls._compare(fix=False, everything=False)
        if changed:
            shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
            raise GradingTampered(
                f"{what} changed the grading environment while it was graded ({shown}): "
                "graded code must not modify numpy, bncore or Python's builtins.")


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


_MAX_MESSAGE = 2000  # characters of an error message shown in feedback


def hide_hidden_outputs(cell, hidden: Sequence[str] = (), *, cut_tracebacks: bool = True) -> None:
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


def _hide_hidden_tests_class():
    from nbgrader.preprocessors import ClearHiddenTests, GetGrades
    from traitlets import Bool, List

    class HideHiddenTests(ClearHiddenTests):
        """nbgrader's ClearHiddenTests for feedback: remove the hidden test code from the
        source of the cells that hold it, cut their tracebacks down to the exception's
        message, and remove any line of hidden test code from the outputs of every cell
        (graded code can print the source of the test that calls it, or keep it for later)."""

        # Configurable, as in GetGrades: the HTML exporter's config sets it for every
        # preprocessor, and nbgrader's base class would warn that it is not.
        display_data_priority = List(GetGrades().display_data_priority).tag(config=True)
        # A submission may write "BEGIN HIDDEN TESTS" in its own cells: remove that region
        # too, rather than fail the student's feedback.
        enforce_metadata = Bool(False).tag(config=True)

        def preprocess(self, nb, resources):
            begin, end = self.begin_test_delimeter, self.end_test_delimeter
            self._hidden = [begin, end]
            for cell in nb.cells:
                if _meta(cell).get("grade") and not _meta(cell).get("solution"):
                    self._hidden += hidden_code(cell.source, begin, end)
            return super().preprocess(nb, resources)

        def preprocess_cell(self, cell, resources, cell_index):
            meta = _meta(cell)
            test = bool(meta.get("grade")) and not meta.get("solution")
            had_hidden = test and self.begin_test_delimeter in cell.source
            hidden = getattr(self, "_hidden", None) or [
                self.begin_test_delimeter, self.end_test_delimeter,
                *hidden_code(cell.source, self.begin_test_delimeter, self.end_test_delimeter)]
            if test:  # a student's own cells may say "BEGIN HIDDEN TESTS" without an end
                cell, resources = super().preprocess_cell(cell, resources, cell_index)
            hide_hidden_outputs(cell, hidden, cut_tracebacks=had_hidden)
            return cell, resources

    HideHiddenTests.__module__ = __name__
    HideHiddenTests.__qualname__ = "HideHiddenTests"
    return HideHiddenTests


# --- what a submission does: static scan, and what happened when it was graded ----------------

# Modules a graded answer has no business importing, and why.
_RISKY_IMPORTS = {
    "bncore": "imports bncore (the course's reference implementation)",
    "builtins": "imports builtins", "ctypes": "uses ctypes", "cffi": "uses cffi",
    "subprocess": "starts processes", "multiprocessing": "starts processes",
    "pty": "starts processes", "signal": "handles signals (can ignore the timeout)",
    "resource": "changes resource limits", "socket": "uses the network",
    "urllib": "uses the network", "http": "uses the network", "requests": "uses the network",
    "shutil": "manipulates files", "tempfile": "manipulates files", "glob": "lists files",
    "pickle": "loads pickled code", "marshal": "loads code objects", "importlib": "imports "
    "code dynamically", "inspect": "inspects the running code", "linecache": "reads source "
    "code", "gc": "walks the garbage collector", "IPython": "changes IPython",
    "ipykernel": "changes the kernel", "nbformat": "reads notebooks", "nbgrader": "uses "
    "nbgrader", "base64": "decodes hidden code", "codecs": "decodes hidden code",
    "zlib": "decodes hidden code", "sqlite3": "opens a database",
}
_RISKY_CALLS = {
    "open": "opens files", "exec": "runs generated code", "eval": "runs generated code",
    "compile": "compiles generated code", "__import__": "imports dynamically",
    "setattr": "sets attributes dynamically", "delattr": "deletes attributes dynamically",
    "globals": "changes global names dynamically", "vars": "reads namespaces dynamically",
    "breakpoint": "starts a debugger", "get_ipython": "changes how the notebook runs",
    "exit": "exits the kernel", "quit": "exits the kernel",
}
# Attributes suspicious wherever they appear ...
_RISKY_ATTRIBUTES = {
    "_exit": "exits the kernel (os._exit)", "settrace": "changes the trace hook",
    "setprofile": "changes the profile hook the grader uses", "_getframe": "inspects the "
    "caller's frame", "f_back": "inspects the caller's frame", "f_globals": "inspects the "
    "caller's frame", "f_locals": "inspects the caller's frame", "tb_frame": "inspects frames",
    "__code__": "rewrites function code", "__globals__": "reaches a function's globals",
    "__closure__": "reaches a closure", "__defaults__": "rewrites function defaults",
    "__kwdefaults__": "rewrites function defaults", "__builtins__": "touches builtins",
    "__subclasses__": "walks the class hierarchy", "__bases__": "walks the class hierarchy",
    "__mro__": "walks the class hierarchy", "input_transformers_post": "changes how cells "
    "run", "input_transformers_cleanup": "changes how cells run", "ast_transformers":
    "changes how cells run", "set_custom_exc": "hides errors", "user_ns": "changes the "
    "notebook's namespace", "run_cell": "changes how cells run", "displayhook": "changes the "
    "display hook (fake results)", "excepthook": "changes the exception hook",
}
# ... and attributes of os and sys.
_RISKY_MODULE_ATTRIBUTES = {
    "os": {"system": "runs a shell command", "popen": "runs a shell command", "fork": "forks",
           "forkpty": "forks", "kill": "sends signals", "killpg": "sends signals",
           "execv": "replaces the kernel", "execvp": "replaces the kernel", "execl":
           "replaces the kernel", "spawnv": "starts processes", "remove": "deletes files",
           "unlink": "deletes files", "rmdir": "deletes folders", "chdir": "changes the "
           "working directory", "listdir": "lists files", "scandir": "lists files", "walk":
           "lists files", "environ": "reads the environment", "setsid": "leaves the kernel's "
           "session", "setpgid": "leaves the kernel's process group"},
    "sys": {"exit": "exits (sys.exit)", "modules": "changes loaded modules (sys.modules)",
            "meta_path": "changes the import system", "path_hooks": "changes the import "
            "system", "path": "changes the import path"},
}
_SAFE_MAGICS = {"matplotlib", "time", "timeit", "precision", "config", "load_ext", "autoreload",
                "who", "whos", "%time", "%timeit"}
_MAGIC = re.compile(r"^\s*(%{1,2})(\w+)|^\s*!")


def _strip_magics(source: str) -> tuple[str, list[str]]:
    """The cell's Python code (magics and shell escapes blanked) and the risky ones found."""
    found, lines = [], []
    for line in source.split("\n"):
        match = _MAGIC.match(line)
        if match:
            if match.group(2) is None:
                found.append(f"runs a shell command ({line.strip()[:60]})")
            elif match.group(2) not in _SAFE_MAGICS:
                found.append(f"uses the magic {match.group(1)}{match.group(2)}")
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines), found


def scan_code(source: str) -> list[str]:
    """Static reasons why a code cell's content is suspicious in a graded answer (empty when
    it only computes). It flags what could reach outside the answer: other modules' internals,
    files, processes, the network, the grader's hooks, generated code."""
    code, found = _strip_magics(source)
    try:
        tree = ast.parse(code)
    except SyntaxError:
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
        found += [f"{why} ({name})" for name, why in
                  {**_RISKY_CALLS, **_RISKY_ATTRIBUTES, **_RISKY_IMPORTS}.items()
                  if name in words and len(name) > 3]
        return list(dict.fromkeys(found))
    modules: dict[str, str] = {}  # alias -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[(alias.asname or alias.name).split(".")[0]] = alias.name
                root = alias.name.split(".")[0]
                if root in _RISKY_IMPORTS:
                    found.append(f"{_RISKY_IMPORTS[root]} (import {alias.name})")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if root in _RISKY_IMPORTS:
                found.append(f"{_RISKY_IMPORTS[root]} (from {node.module} import ...)")
            elif node.module in _RISKY_MODULE_ATTRIBUTES:
                risky = [a.name for a in node.names
                         if a.name in _RISKY_MODULE_ATTRIBUTES[node.module]
                         or a.name in _RISKY_ATTRIBUTES]
                if risky:
                    found.append(f"imports {', '.join(risky)} from {node.module}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in _RISKY_CALLS:
                found.append(f"{_RISKY_CALLS[node.func.id]} ({node.func.id}(...))")
        elif isinstance(node, ast.Attribute) and node.attr in _RISKY_ATTRIBUTES:
            found.append(f"{_RISKY_ATTRIBUTES[node.attr]} (.{node.attr})")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and modules.get(node.value.id) in _RISKY_MODULE_ATTRIBUTES):
            why = _RISKY_MODULE_ATTRIBUTES[modules[node.value.id]].get(node.attr)
            if why:
                found.append(f"{why} ({modules[node.value.id]}.{node.attr})")
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__loader__", "__spec__"):
            found.append(f"touches {node.id}")
        elif isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)]
            for name in ("KeyboardInterrupt", "SystemExit", "BaseException"):
                if name in caught:
                    found.append(f"catches {name} (can survive the grader's interrupt)")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete))
                       else [node.target])
            for target in targets:
                base = target
                while isinstance(base, (ast.Attribute, ast.Subscript)):
                    base = base.value
                if (isinstance(base, ast.Name) and base.id in modules
                        and isinstance(target, (ast.Attribute, ast.Subscript))):
                    found.append(f"changes the module {modules[base.id]} "
                                 f"({ast.unparse(target)[:60]} = ...)")
    return list(dict.fromkeys(found))


def _course_root_of(notebook: Path) -> Path:
    """submitted/<student>/<assignment>/<notebook>: the course root, three folders up (when it
    holds nbgrader_config.py), else the course this package belongs to."""
    candidate = notebook.resolve().parents[3] if len(notebook.resolve().parents) > 3 else None
    if candidate is not None and (candidate / "nbgrader_config.py").exists():
        return candidate
    return ROOT


def _meta(cell) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def scan_submission(notebook_path, *, release=None) -> list[str]:
    """Static reasons why a submitted notebook is suspicious; an empty list when it is clean.

    ``notebook_path`` is where the notebook should be, normally
    ``submitted/<student>/<assignment>/<assignment>.ipynb``. Reported: a missing notebook or a
    wrong file name, malformed JSON or an old notebook format, an oversized file, extra files
    next to it, cells that differ from the release (deleted, duplicated, moved, retyped or
    edited locked cells, changed nbgrader metadata), and, in the cells the student may edit,
    code that reaches outside the answer (see :func:`scan_code`). ``release`` is the student
    version of the notebook, by default ``exercises/<assignment>/<name>`` of the course.
    Nothing is executed. Used by ``python -m bncore.autograde`` for its "suspicious" column.
    """
    import nbformat

    path = Path(notebook_path)
    folder = path.parent
    found: list[str] = []
    if not path.is_file():
        others = sorted(p.name for p in folder.glob("*.ipynb")) if folder.is_dir() else []
        if others:
            return [f"wrong file name: {', '.join(others)} instead of {path.name}"]
        return [f"no notebook submitted: {path.name} is missing"]
    size = path.stat().st_size
    if size > 20 * 2**20:
        found.append(f"the notebook file is {size / 2**20:.0f} MiB")
    try:
        raw = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (ValueError, OSError) as error:
        return found + [f"not a notebook: malformed JSON ({str(error)[:80]})"]
    if not isinstance(raw, dict) or "cells" not in raw and "worksheets" not in raw:
        return found + ["not a notebook: no cells"]
    if raw.get("nbformat", 0) < 4:
        found.append(f"old notebook format (nbformat {raw.get('nbformat')})")
    try:
        nb = nbformat.reads(json.dumps(raw), as_version=4)
    except Exception as error:  # noqa: BLE001
        return found + [f"not a readable notebook ({str(error)[:80]})"]

    for entry in sorted(folder.iterdir()):
        if entry == path or entry.name in (".ipynb_checkpoints", ".DS_Store"):
            continue
        kind = "symbolic link" if entry.is_symlink() else "folder" if entry.is_dir() else "file"
        found.append(f"extra {kind} next to the notebook: {entry.name}")

    release_path = Path(release) if release else (
        _course_root_of(path) / "exercises" / folder.name / path.name)
    locked_sources: dict[str, str] = {}
    if release_path.is_file():
        found += _compare_structure(nb, nbformat.read(release_path, as_version=4))
        locked_sources = {_meta(c)["grade_id"]: c.source for c in
                          nbformat.read(release_path, as_version=4).cells
                          if _meta(c).get("locked") and _meta(c).get("grade_id")}
    for index, cell in enumerate(nb.cells):
        meta = _meta(cell)
        if cell.cell_type != "code":
            continue
        grade_id = meta.get("grade_id")
        if grade_id in locked_sources:  # a locked cell: nbgrader puts its source back
            continue
        where = f"cell {index}" + (f" (answer {grade_id})" if grade_id else " (added)")
        found += [f"{where}: {reason}" for reason in scan_code(cell.source)]
    return list(dict.fromkeys(found))


def _compare_structure(nb, release) -> list[str]:
    found = []
    wanted = [(_meta(c)["grade_id"], c) for c in release.cells if _meta(c).get("grade_id")]
    got: dict[str, list[int]] = {}
    for index, cell in enumerate(nb.cells):
        grade_id = _meta(cell).get("grade_id")
        if grade_id:
            got.setdefault(grade_id, []).append(index)
    known = {name for name, _ in wanted}
    for name in got:
        if name not in known:
            found.append(f"a cell claims the unknown nbgrader id {name!r}")
    order = []
    for name, cell in wanted:
        kind = "test cell" if _meta(cell).get("grade") and not _meta(cell).get("solution") \
            else "answer cell" if _meta(cell).get("solution") else "locked cell"
        if name not in got:
            found.append(f"deleted {kind} {name}")
            continue
        if len(got[name]) > 1:
            found.append(f"duplicated {kind} {name}")
        order.append(name)
        mine = nb.cells[got[name][-1]]
        if mine.cell_type != cell.cell_type:
            found.append(f"{kind} {name} changed from {cell.cell_type} to {mine.cell_type}")
        elif _meta(cell).get("locked") and mine.source != cell.source:
            found.append(f"edited {kind} {name}")
        for key in ("grade", "solution", "locked", "points", "schema_version"):
            if _meta(mine).get(key) != _meta(cell).get(key):
                found.append(f"changed the nbgrader metadata of {name} ({key}: "
                             f"{_meta(cell).get(key)!r} -> {_meta(mine).get(key)!r})")
    positions = [got[name][0] for name in order]
    for before, after, name in zip(positions[:-1], positions[1:], order[1:], strict=True):
        if after < before:
            found.append(f"moved cell {name} (the cells are out of order)")
    return found


def _autograded(path):
    import nbformat

    return nbformat.read(Path(path), as_version=4)


def timed_out(autograded_notebook_path) -> bool:
    """Whether a cell of an autograded notebook ran past the per-cell time limit."""
    nb = _autograded(autograded_notebook_path)
    report = nb.metadata.get("bncore", {}).get("grading", {})
    if report.get("timed_out"):
        return True
    return any(output.get("ename") == "CellTimeoutError"
               for cell in nb.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []) if output.get("output_type") == "error")


def grading_problems(autograded_notebook_path) -> list[str]:
    """What went wrong while an autograded notebook ran, from the grader's record
    (``metadata.bncore.grading``): cells that timed out, a kernel that died and the cells it
    left unrun, output cut off, what the grader had to put back before the tests (a patched
    numpy, bncore, builtins or setup name: a sign of tampering), test cells it could not
    check, and test cells that emitted a result value. Empty when nothing happened."""
    nb = _autograded(autograded_notebook_path)
    report = nb.metadata.get("bncore", {}).get("grading", {})
    problems = [f"timed out: {cell}" for cell in report.get("timed_out", [])]
    if report.get("kernel_died"):
        problems.append(f"the kernel died in {report['kernel_died']}")
    problems += [f"not run: {cell}" for cell in report.get("not_run", [])]
    problems += [f"output truncated: {cell}" for cell in report.get("output_truncated", [])]
    for item in report.get("restored", []):
        problems.append(f"tampering undone before {item['before']}: "
                        f"{', '.join(item['what'][:5])}")
    problems += [f"could not check the environment before {c}" for c in
                 report.get("unchecked", [])]
    problems += [f"result value in the test {c} (shown as a display)" for c in
                 report.get("result_outputs", [])]
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("ename") == "GradingTampered":
                problems.append(f"tampering detected in {_meta(cell).get('grade_id', 'a cell')}")
    return list(dict.fromkeys(problems))


def report_submission_problems(assignment=None, student=None, notebooks=()):
    """nbgrader's ``Autograde.pre_convert_hook``: before a submission is graded, log what
    :func:`scan_submission` finds in it (a wrong file name, suspicious code...), so that a
    plain ``nbgrader autograde`` names it. It never stops grading."""
    from traitlets.log import get_logger

    log = get_logger()
    for folder in sorted({Path(n).parent for n in notebooks}):
        expected = folder / f"{folder.name}.ipynb"
        targets = [expected] + [Path(n) for n in notebooks
                                if Path(n).parent == folder and Path(n) != expected
                                and expected.exists()]
        for target in targets:
            for problem in scan_submission(target):
                log.warning("%s/%s: %s", folder.parent.name, folder.name, problem)


# --- the written answers: graded by hand ------------------------------------------------------


def _course(root: Path | str = "."):
    """The CourseDirectory of the nbgrader_config.py in ``root`` (default: the current folder,
    where nbgrader commands run)."""
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    root = Path(root).resolve()
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    coursedir = CourseDirectory(config=config)
    if "root" not in config.get("CourseDirectory", {}):
        coursedir.root = str(root)
    return coursedir


def written_answers(assignment: str, *, root: Path | str = ".", pending_only: bool = False):
    """The answers of ``assignment`` graded by hand, one dict per student and cell: student,
    notebook, cell (grade_id), points, score (None until graded), answer (the student's text,
    from the autograded notebook)."""
    import nbformat
    from nbgrader.api import Gradebook

    coursedir = _course(root)
    found = []
    with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
        for submission in sorted(gb.assignment_submissions(assignment),
                                 key=lambda s: s.student.id):
            for notebook in submission.notebooks:
                path = Path(coursedir.format_path(coursedir.autograded_directory,
                                                  submission.student.id, assignment))
                path = path / f"{notebook.name}.ipynb"
                cells = ({_meta(c).get("grade_id"): c.source
                          for c in nbformat.read(path, as_version=4).cells}
                         if path.exists() else {})
                for grade in notebook.grades:
                    if grade.cell.cell_type != "markdown" and grade.auto_score is not None:
                        continue
                    if pending_only and not grade.needs_manual_grade:
                        continue
                    found.append({"student": submission.student.id, "notebook": notebook.name,
                                  "cell": grade.name, "points": grade.max_score,
                                  "score": grade.manual_score,
                                  "answer": cells.get(grade.name, "")})
    return found


def set_written_score(assignment: str, student: str, cell: str, points: float,
                      comment: str | None = None, *, notebook: str | None = None,
                      root: Path | str = ".") -> None:
    """Record a hand-given grade (and a comment for the student's feedback), as the formgrader
    does."""
    from nbgrader.api import Gradebook

    coursedir = _course(root)
    notebook = notebook or assignment
    with Gradebook(coursedir.db_url, coursedir.course_id) as gb:
        grade = gb.find_grade(cell, notebook, assignment, student)
        if not 0 <= points <= grade.max_score:
            raise ValueError(f"{cell} is worth 0 to {grade.max_score:g} points, not {points:g}")
        grade.manual_score = float(points)
        grade.needs_manual_grade = False
        if comment is not None:
            gb.find_comment(cell, notebook, assignment, student).manual_comment = comment
        gb.db.commit()


# --- the self-check: a student's one command --------------------------------------------------


_HINTS = {
    "NotImplementedError": "a function it checks is not written yet",
    "NameError": "a name is not defined: did a cell above fail, or is a function misnamed?",
    "CellTimeoutError": "it ran too long: an endless loop?",
}


def _first_error_line(output) -> str:
    ename = output.get("ename", "Error")
    evalue = str(output.get("evalue", "")).strip().split("\n")[0]
    line = f"{ename}: {evalue}" if evalue else ename
    if ename in _HINTS and (not evalue or ename == "NameError"):
        line += f" ({_HINTS[ename]})"
    return line if len(line) <= 200 else line[:197] + "..."


def run_checks(notebook_path, *, timeout: int = 120):
    """Execute a notebook in a fresh kernel, as the grader does, and return its results:
    ``(checks, errors, warnings)``: checks are ``(grade_id, points, passed, message)`` for
    each autograded test cell in order; errors are ``(where, message)`` for the other cells
    that raised; warnings name test cells that differ from the release."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    path = Path(notebook_path).resolve()
    nb = nbformat.read(path, as_version=4)
    warnings = []
    try:
        from nbgrader.utils import compute_checksum
    except ImportError:  # pragma: no cover
        compute_checksum = None
    for cell in nb.cells:
        meta = _meta(cell)
        if compute_checksum and meta.get("locked") and meta.get("checksum") and meta.get(
                "grade_id"):
            try:
                changed = compute_checksum(cell) != meta["checksum"]
            except Exception:  # noqa: BLE001
                changed = True
            if changed:
                warnings.append(f"{meta['grade_id']} differs from the release: grading runs "
                                "the original, so this check may not match your grade")
    previous = os.environ.get("BNCORE_SELF_CHECK")
    os.environ["BNCORE_SELF_CHECK"] = "1"  # the notebook's own self_check() cell stands aside
    client = NotebookClient(nb, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    died = None
    try:
        client.execute(stderr=subprocess.DEVNULL)  # the kernel's own log, not the cells'
    except (DeadKernelError, CellTimeoutError) as error:
        died = f"{type(error).__name__}: {error}"
    finally:
        if previous is None:
            os.environ.pop("BNCORE_SELF_CHECK", None)
        else:
            os.environ["BNCORE_SELF_CHECK"] = previous
    checks, errors = [], []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta = _meta(cell)
        failures = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        is_test = meta.get("grade") and not meta.get("solution")
        if is_test:
            ran = cell.get("execution_count") is not None or cell.get("outputs")
            message = (_first_error_line(failures[0]) if failures
                       else "" if ran else (died or "not run"))
            checks.append((meta.get("grade_id", f"cell {index}"), float(meta.get("points", 0)),
                           bool(ran) and not failures, message))
        elif failures:
            where = (f"cell {index} (your answer {meta['grade_id']})" if meta.get("solution")
                     else f"cell {index}")
            errors.append((where, _first_error_line(failures[0])))
    if died:
        errors.append(("the kernel", died))
    return checks, errors, warnings


def check_notebook(notebook_path, *, timeout: int = 120, out=None) -> int:
    """Run the visible tests of a notebook and print a summary; 0 when every check passed and
    no cell raised, else 1."""
    out = out or sys.stdout
    path = Path(notebook_path)
    if not path.is_file():
        print(f"{path}: no such notebook", file=out)
        return 2
    print(f"Checking {path.name}: every cell in a fresh kernel, with the visible tests "
          "(grading adds hidden tests).", file=out)
    checks, errors, warnings = run_checks(path, timeout=timeout)
    width = max([len(name) for name, *_ in checks] + [4])
    for name, points, passed, message in checks:
        status = "passed" if passed else "FAILED"
        line = f"  {status}  {name:<{width}}  {points:g} point{'s' if points != 1 else ''}"
        print(line + (f"  {message}" if message and not passed else ""), file=out)
    for where, message in errors:
        print(f"  ERROR   {where}: {message}", file=out)
    for warning in warnings:
        print(f"  warning: {warning}", file=out)
    passed = sum(1 for *_, ok, _ in checks if ok)
    earned = sum(points for _, points, ok, _ in checks if ok)
    total = sum(points for _, points, _, _ in checks)
    print(f"{passed} of {len(checks)} checks passed ({earned:g} of {total:g} points from the "
          "visible tests)" + (f"; {len(errors)} cell(s) raised an error" if errors else "")
          + ".", file=out)
    ok = bool(checks) and passed == len(checks) and not errors
    if not ok:
        print("Fix the first failure first: later checks often depend on it.", file=out)
    return 0 if ok else 1


def self_check(notebook: str | os.PathLike | None = None, *, timeout: int = 120) -> bool:
    """The self-check from inside a notebook: ``self_check("ch3-forward-backward.ipynb")``.

    Runs ``python -m bncore.grading check`` on the notebook as saved on disk (save first), in
    a fresh kernel, prints the summary and raises an AssertionError when a check fails, so the
    cell turns red. The default notebook is the single course notebook in the working folder.
    While the notebook is being graded or checked, it does nothing.
    """
    if os.environ.get("BNCORE_SELF_CHECK") or os.environ.get("NBGRADER_EXECUTION"):
        print("(self-check skipped: this notebook is being checked or graded right now)")
        return True
    if notebook is None:
        names = set(assignments())
        found = [p for p in Path.cwd().glob("*.ipynb") if p.stem in names]
        if len(found) != 1:
            raise ValueError("self_check() could not tell which notebook to check: pass its "
                             'file name, e.g. self_check("ch3-forward-backward.ipynb")')
        notebook = found[0]
    path = Path(notebook)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the notebook's file name, relative to "
                                f"{Path.cwd()}")
    print("Checking the notebook as last saved: save it first (Ctrl-S) to check your latest "
          "work.", flush=True)
    done = subprocess.run([sys.executable, "-m", "bncore.grading", "check", str(path),
                           "--timeout", str(timeout)], capture_output=True, text=True)
    print(done.stdout + done.stderr, end="")
    if done.returncode != 0:
        raise AssertionError("the self-check failed: see the list above")
    return True


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
    chk = commands.add_parser("check", help="run a notebook's visible tests; exit 1 on failure")
    chk.add_argument("notebook")
    chk.add_argument("--timeout", type=int, default=120, help="seconds per cell (120)")
    scan = commands.add_parser("scan", help="list what is suspicious in submitted notebooks")
    scan.add_argument("notebooks", nargs="+")
    written = commands.add_parser(
        "written", help="list the answers graded by hand, or --score one (run in the course)")
    written.add_argument("assignment")
    written.add_argument("--pending", action="store_true", help="only those not graded yet")
    written.add_argument("--score", nargs=3, metavar=("STUDENT", "CELL", "POINTS"))
    written.add_argument("--comment", help="with --score: a comment for the feedback")
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 1 and argv[0].endswith(".ipynb"):  # python -m bncore.grading NOTEBOOK
        argv = ["check", *argv]
    args = parser.parse_args(argv)
    if args.command == "release":
        names = release(args.assignments, release_directory=args.release_directory)
        print(f"released {len(names)} assignment(s): {', '.join(names)}")
    elif args.command == "check":
        return check_notebook(args.notebook, timeout=args.timeout)
    elif args.command == "written":
        if args.score:
            student, cell, points = args.score
            set_written_score(args.assignment, student, cell, float(points), args.comment)
            print(f"{student} {cell}: {float(points):g} points")
            return 0
        answers = written_answers(args.assignment, pending_only=args.pending)
        for item in answers:
            score = "not graded" if item["score"] is None else f"{item['score']:g}"
            print(f"--- {item['student']}  {item['cell']}  ({score} of {item['points']:g} "
                  "points)")
            print(textwrap.indent(item["answer"].strip() or "(no answer)", "    "))
        print(f"{len(answers)} answer(s). Grade one: python -m bncore.grading written "
              f"{args.assignment} --score STUDENT CELL POINTS [--comment TEXT]")
    elif args.command == "scan":
        suspicious = 0
        for notebook in args.notebooks:
            problems = scan_submission(notebook)
            suspicious += bool(problems)
            print(f"{notebook}: " + ("clean" if not problems else "\n  " + "\n  ".join(problems)))
        return 1 if suspicious else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
