"""The hostile corpus: broken and malicious submissions of chapter 3's graded notebook.

Every case is one student of one class. ``Case.build`` writes the student's folder
``submitted/<student>/ch3-forward-backward/``, starting from the release that students get and
the model answers of the solution notebook (so the corpus follows the notebook when it
changes). ``Case.lose`` names the test cells whose points the submission must NOT get: the
points its honest part earns are the grade it must receive, read from the notebook's metadata.
tests/test_hostile.py grades all of them in one ``nbgrader autograde`` run, and runs the
students' self-check on them too: the two must agree.

The cases, by kind (README.md in this folder has the table):

* running out of control: an infinite loop, a loop that swallows the interrupt, a cell that
  raises, ``sys.exit()``, ``os._exit()``, a segfault, a memory bomb, a bounded fork bomb,
  hundreds of megabytes of output;
* a mangled notebook: an edited, deleted, reordered or retyped test cell, a deleted setup cell,
  a moved or duplicated answer cell, tampered nbgrader metadata (points, locks, an old schema
  version that makes plain nbgrader abort the whole class);
* forging a pass, one case per way that worked against a grader that checks inside the
  student's kernel: results that lie when compared (subclasses of int and ndarray), a lazy
  ``__array__``, a thread that patches NumPy and the helpers, the reference's code cloned or
  exec'd from its file, IPython's compiler and input transformers wrapping every cell in
  ``try``, fake modules in ``sys.modules`` and a one-shot ``builtins.__import__``, walking the
  stack and the garbage collector for the expected values; and against this grader: a patched
  channel server, a flood of output, PyTorch's batch norm, a fake result value;
* reaching outside: reading the solutions, the gradebook and another student's work, writing
  to the gradebook, to another student's folder and outside one's own, the network;
* broken files: malformed JSON, nbformat 3, a wrong file name, no notebook at all, extra
  files that would shadow numpy and bncore.

Good students (``good_1``, ``good_2`` and ``victim``, whose files the attacks aim at) sit in
the same class; their grades must be the full marks.
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ASSIGNMENT = "ch3-forward-backward"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
ALL = "all"  # Case.lose: every test cell


def meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def code(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


@dataclass
class Kit:
    """The release and the model answers, and ways to build a submission from them."""

    release: nbformat.NotebookNode
    solution: nbformat.NotebookNode
    answers: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.answers = {
            meta(c)["grade_id"]: "\n".join(
                line for line in c.source.split("\n")
                if "BEGIN SOLUTION" not in line and "END SOLUTION" not in line)
            for c in self.solution.cells if meta(c).get("solution")}

    def untouched(self):
        return copy.deepcopy(self.release)

    def full(self, **answers: str):
        """The release with every answer filled in, and ``answers`` (grade_id: source) instead
        of the model answer where given."""
        nb = self.untouched()
        for cell in nb.cells:
            grade_id = meta(cell).get("grade_id")
            if grade_id in answers:
                cell.source = answers[grade_id]
            elif meta(cell).get("solution"):
                cell.source = self.answers[grade_id]
        return nb

    def with_stub(self, grade_id: str, nb=None):
        """``nb`` (default: full) with the answer ``grade_id`` left as the release's stub."""
        nb = nb or self.full()
        stub = next(c.source for c in self.release.cells if meta(c).get("grade_id") == grade_id)
        index(nb, grade_id).source = stub
        return nb


def index(nb, grade_id: str):
    """The cell with this grade_id (the last, if duplicated)."""
    return [c for c in nb.cells if meta(c).get("grade_id") == grade_id][-1]


def position(nb, grade_id: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if meta(c).get("grade_id") == grade_id)


def add_cell(nb, after: str, source: str):
    """Insert a student's own code cell after the cell ``after``."""
    nb.cells.insert(position(nb, after) + 1, nbformat.v4.new_code_cell(source))
    return nb


def folder(course: Path, student: str) -> Path:
    path = course / "submitted" / student / ASSIGNMENT
    path.mkdir(parents=True, exist_ok=True)
    return path


def write(nb, course: Path, student: str, name: str = NOTEBOOK) -> Path:
    path = folder(course, student) / name
    nbformat.write(nb, path)
    return path


@dataclass
class Case:
    student: str
    what: str
    build: Callable[[Kit, Path, str], None]
    lose: tuple[str, ...] | str = ()  # test cells (grade_ids) that must score zero, or ALL
    graded: bool = True               # False: nbgrader cannot grade it (reported, no grade)
    needs_sandbox: bool = False       # only safe, or only meaningful, inside bubblewrap
    suspicious: bool = True           # scan_submission must flag it
    problems: tuple[str, ...] = ()    # words expected in grading_problems(autograded notebook)
    timed_out: bool = False


def notebook_case(student, what, make, **kw) -> Case:
    """A case whose submission is one notebook: ``make(kit) -> nb``."""
    return Case(student, what, lambda kit, course, s: write(make(kit), course, s), **kw)


# --- the snippets ------------------------------------------------------------------------------

INFINITE_LOOP = code("""
    def batchnorm_backward_alt(dout, cache):
        while True:
            pass
""")

STUBBORN_LOOP = code("""
    import time


    def batchnorm_backward_alt(dout, cache):
        while True:  # the grader's interrupt is caught and ignored
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:
                pass
""")

RAISES = code("""
    raise RuntimeError("this answer cell fails before it defines anything")
""")

SYS_EXIT = code("""
    import sys


    def batchnorm_backward_alt(dout, cache):
        sys.exit(3)
""")

OS_EXIT = code("""
    import os


    def batchnorm_backward(dout, cache):
        os._exit(0)
""")

SEGFAULT = code("""
    import ctypes


    def batchnorm_backward_alt(dout, cache):
        return ctypes.string_at(0)  # reads address 0: the kernel crashes
""")

MEMORY_BOMB = code("""
    def batchnorm_backward_alt(dout, cache):
        hog = []
        while True:
            hog.append(bytearray(64 * 2**20))
""")

# At most 200 processes, each gone after two seconds: bounded even without a sandbox.
FORK_BOMB = code("""
    import os
    import time

    children, refused = [], 0
    for _ in range(200):
        try:
            pid = os.fork()
        except OSError:
            refused += 1
            continue
        if pid == 0:
            time.sleep(2)
            os._exit(0)
        children.append(pid)
    print(f"forked {len(children)} processes, {refused} refused")
""")

BIG_OUTPUT = code("""
    import sys

    line = "x" * 99_999 + "\\n"
    for _ in range(2_000):  # 200 MB, sent 100 kB at a time
        sys.stdout.write(line)
        sys.stdout.flush()
""")

PATCH_NUMPY = code("""
    import numpy as np
    import numpy.testing

    # Every check that compares arrays now agrees.
    np.allclose = lambda *args, **kwargs: True
    np.isclose = lambda *args, **kwargs: False
    np.array_equal = lambda *args, **kwargs: True
    np.testing.assert_allclose = lambda *args, **kwargs: None
    np.testing.assert_array_equal = lambda *args, **kwargs: None


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return x * 1.0, (x, gamma, beta, eps)  # wrong: no normalization at all
""")

WRONG_BACKWARD = code("""
    def batchnorm_backward(dout, cache):
        return np.zeros_like(dout), np.zeros(dout.shape[1]), np.zeros(dout.shape[1])
""")

WRONG_BACKWARD_ALT = WRONG_BACKWARD.replace("batchnorm_backward(", "batchnorm_backward_alt(")

CALLS_REFERENCE = {
    "forward": code("""
        import bncore.numpy as bn


        def batchnorm_forward(x, gamma, beta, eps=1e-5):
            return bn.batch_norm_forward(x, gamma, beta, eps=eps)
    """),
    "backward": code("""
        from bncore.numpy import batch_norm_backward as my_backward


        def batchnorm_backward(dout, cache):
            return my_backward(dout, cache)
    """),
    "backward_alt": code("""
        def batchnorm_backward_alt(dout, cache):
            return bn.batch_norm_backward(dout, cache)
    """),
}

# The backward passes are 0.1 % off; the setup's rel_error is made to agree with them.
SCALED_BACKWARD = code("""
    def batchnorm_backward(dout, cache):
        xc, var, std, xhat, gamma, eps = cache
        dbeta = dout.sum(axis=0)
        dgamma = (dout * xhat).sum(axis=0)
        dx = gamma / std * (dout - dout.mean(axis=0) - xhat * (dout * xhat).mean(axis=0))
        return dx * 1.001, dgamma, dbeta


    rel_error = lambda a, b: 0.0  # the setup cell's helper: every gradient check passes
""")

SCALED_BACKWARD_ALT = SCALED_BACKWARD.replace("batchnorm_backward(", "batchnorm_backward_alt(")

PATCH_BUILTINS = code("""
    import builtins
    import contextlib
    import sys
    import types

    _real_import = builtins.__import__
    _fake = types.ModuleType("bngrade.asserts")
    _fake.assert_close = lambda *args, **kwargs: None
    sys.modules["bngrade"] = types.ModuleType("bngrade")
    sys.modules["bngrade.asserts"] = _fake


    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith(("bngrade", "bncore.check")):
            return _fake  # the tests' helpers would accept anything
        return _real_import(name, globals, locals, fromlist, level)


    builtins.__import__ = _import
""")

PATCH_IPYTHON = code("""
    ip = get_ipython()


    def _swallow(lines):
        body = "".join(lines)
        if not body.strip():
            return lines
        return (["try:\\n"] + ["    " + line + "\\n" for line in body.splitlines()]
                + ["except BaseException:\\n", "    pass\\n"])


    ip.input_transformers_post.append(_swallow)  # every later cell swallows its errors
    ip.set_custom_exc((BaseException,), lambda *args, **kwargs: None)
    _compile = ip.compile


    class _Forgiving(type(_compile)):
        def __call__(self, source, filename, symbol):
            wrapped = "try:\\n" + "\\n".join("    " + l for l in source.splitlines()) \\
                + "\\nexcept BaseException:\\n    pass\\n"
            return super().__call__(wrapped, filename, symbol)


    ip.compile.__class__ = _Forgiving  # IPython's compiler hook: every cell in a try
""")

FAKE_RESULT = {
    name: code(f"""
        import sys


        def {function}(*args, **kwargs):
            sys.displayhook("full marks")  # a result that nbgrader reads as full credit
            raise NotImplementedError()
    """)
    for name, function in [("forward", "batchnorm_forward"), ("backward", "batchnorm_backward"),
                           ("backward_alt", "batchnorm_backward_alt")]
}

# Results that compare equal to anything: int and ndarray subclasses that lie.
LYING_RESULTS = code("""
    class Yes(np.ndarray):
        def __eq__(self, other):
            return np.ones(np.shape(other), dtype=bool)

        __array_priority__ = 1e9

        def __array_function__(self, func, types, args, kwargs):
            return True  # np.allclose, np.array_equal, np.isclose...


    class Always(int):
        def __eq__(self, other):
            return True


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return np.zeros_like(x).view(Yes), Always(0)
""")

# A lazy result: the work (a call of the reference) happens when the checker converts it.
LAZY_ARRAY = code("""
    class Later:
        def __init__(self, args):
            self.args = args

        def __array__(self, dtype=None, copy=None):
            import bncore.numpy as bn
            return bn.batch_norm_forward(*self.args)[0]


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return Later((x, gamma, beta, eps)), None
""")

THREAD = code("""
    import threading
    import time

    import numpy


    def _keep_patching():
        while True:
            numpy.allclose = lambda *args, **kwargs: True
            numpy.isclose = lambda *args, **kwargs: True
            numpy.array_equal = lambda *args, **kwargs: True
            try:
                import bncore.numpy  # noqa: F401 -- and the reference, if it were there
            except ImportError:
                pass
            time.sleep(0.001)


    threading.Thread(target=_keep_patching, daemon=True).start()


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return x.copy(), None
""")

# The reference's code cloned under other names: the code objects of a module loaded from
# bncore's file (exec'd from its source read from disk).
CLONED_REFERENCE = code("""
    import importlib.util
    import types

    spec = importlib.util.find_spec("bncore")
    path = spec.submodule_search_locations[0] + "/numpy.py"
    source = open(path).read()
    clone = types.ModuleType("my_batchnorm")
    exec(compile(source, "my_batchnorm.py", "exec"), clone.__dict__)
    forward = types.FunctionType(clone.batch_norm_forward.__code__.replace(
        co_name="mine", co_firstlineno=1), clone.__dict__)


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        return forward(x, gamma, beta, eps=eps)
""")

STACK_AND_GC = code("""
    import gc
    import sys


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        # The expected value would be in the caller's frames or somewhere in memory.
        frame, found = sys._getframe(1), None
        while frame is not None and found is None:
            found = frame.f_locals.get("expected")
            frame = frame.f_back
        if found is None:
            arrays = [o for o in gc.get_objects()
                      if isinstance(o, np.ndarray) and o.shape == x.shape and o is not x]
            found = arrays[-1] if arrays else np.zeros_like(x)
        return np.array(found, dtype=x.dtype), None
""")

PATCH_SERVER = code("""
    import json

    real = __bncore_server__


    class Liar(type(real)):
        def answer(self, request):
            # Every call of the notebook's functions "returns" its first argument.
            if request.get("op") == "call" and request.get("args"):
                return {"kind": "result", "ok": request["args"][0]}
            return super().answer(request)


    real.__class__ = Liar
""")

FLOOD = code("""
    import sys


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        for _ in range(300):
            sys.stdout.write("y" * 100_000 + "\\n")
        raise NotImplementedError()
""")

TORCH_REFERENCE = code("""
    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        import torch
        import torch.nn.functional as F

        out = F.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma),
                           torch.from_numpy(beta), training=True, eps=eps)
        return out.numpy(), None
""")

# Where an attack looks for the course: three folders up from where the notebook runs (it is
# graded in submitted/<student>/<assignment>/ when it runs where it lies), and the course's
# path as the instructor has it (COURSE), which a student could learn or guess.
COURSE_ROOTS = code("""
    def course_roots(here):
        roots = [pathlib.Path(COURSE)]
        if len(here.parents) > 2 and here.parents[2] != roots[0]:
            roots.append(here.parents[2])
        return roots
""")


def attack(source: str, course: Path, marker: str = "MARKER", port: int = 0) -> str:
    """An attack's code, its placeholders filled in: ``course_roots`` defined after its
    imports, COURSE the course's path, MARKER a file name, PORT a port on the loopback."""
    imports, _, rest = source.partition("\n\n")
    return (f"{imports}\n\nCOURSE = {str(course)!r}\nPORT = {port}\n\n\n{COURSE_ROOTS}"
            f"\n\n\n{rest}").replace("MARKER", marker)

READ_SOLUTIONS = code("""
    import json
    import pathlib

    here = pathlib.Path.cwd()
    stolen = [here / "ch3-forward-backward.ipynb"]  # the notebook graded, hidden tests included
    for root in course_roots(here):
        stolen += [
            root / "solutions" / "ch3-forward-backward" / "ch3-forward-backward.ipynb",
            root / "autograded" / "victim" / "ch3-forward-backward" / "ch3-forward-backward.ipynb",
            root / "submitted" / "victim" / "ch3-forward-backward" / "ch3-forward-backward.ipynb",
        ]
    for path in stolen:
        try:
            cells = json.loads(path.read_text())["cells"]
        except (OSError, ValueError) as error:
            print("cannot read", path, type(error).__name__)
            continue
        print("read", path)
        for cell in cells:
            source = "".join(cell["source"])
            if "BEGIN HIDDEN TESTS" in source:
                print(source)  # the hidden tests, into the feedback
            if "BEGIN SOLUTION" in source:
                exec(source, globals())  # the model answers
    for root in course_roots(here):
        try:
            print("read the gradebook:", len((root / "gradebook.db").read_bytes()), "bytes")
        except OSError as error:
            print("cannot read the gradebook", type(error).__name__)
""")

WRITE_ATTACK = code("""
    import pathlib
    import socket
    import sys

    here = pathlib.Path.cwd()
    targets = [
        here / "ch3-forward-backward.ipynb",
        pathlib.Path("/tmp") / "MARKER",
        # the kernel's connection folder (of the file after -f), the one host folder it sees
        *[pathlib.Path(sys.argv[i + 1]).parent / "junk" for i, arg in enumerate(sys.argv)
          if arg == "-f"],
    ]
    for root in course_roots(here):
        targets += [
            root / "gradebook.db",
            root / "submitted" / "victim" / "ch3-forward-backward" / "ch3-forward-backward.ipynb",
            root / "autograded" / "victim" / "ch3-forward-backward" / "pwned.txt",
            root / "feedback" / "pwned.txt",
            root / "solutions" / "pwned.txt",
            root / "pwned.txt",
            root.parent / "pwned.txt",
        ]
    for target in targets:
        try:
            with open(target, "ab") as handle:
                handle.write(b"PWNED")
            print("wrote", target)
        except OSError as error:
            print("blocked", target, type(error).__name__)
    try:  # a port the test listens on, on the machine's loopback
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
        print("network: reachable")
    except OSError as error:
        print("network: unreachable", type(error).__name__)
""")

LEAKY = code("""
    import linecache
    import sys

    ### BEGIN HIDDEN TESTS  (a student's own marker: the feedback must still be generated)
    SEEN = []


    def batchnorm_forward(x, gamma, beta, eps=1e-5):
        caller = sys._getframe(1).f_code.co_filename
        print("".join(linecache.getlines(caller)))  # the source of the test calling it
        SEEN.append(caller)
        mu = x.mean(axis=0)
        xc = x - mu
        var = (xc * xc).mean(axis=0)
        std = np.sqrt(var + eps)
        xhat = xc / std
        return gamma * xhat + beta, (xc, var, std, xhat, gamma, eps)
""")


# --- the cases -------------------------------------------------------------------------------


def _reordered(kit):
    nb = kit.full()
    test = nb.cells.pop(position(nb, "test_forward"))
    nb.cells.insert(position(nb, "forward"), test)  # the test now runs before the answer
    return nb


def _retyped(kit):
    nb = kit.with_stub("backward_alt")
    i = position(nb, "test_backward_alt")
    cell = nb.cells[i]
    nb.cells[i] = nbformat.v4.new_markdown_cell(cell.source, metadata=cell.metadata)
    return nb


def _moved_answer(kit):
    nb = kit.full()
    answer = nb.cells.pop(position(nb, "backward_alt"))
    nb.cells.insert(position(nb, "test_backward_alt") + 1, answer)
    return nb


def _duplicated_answer(kit):
    nb = kit.full()
    i = position(nb, "forward")
    first = copy.deepcopy(nb.cells[i])
    first["id"] = "forward-first-try"  # Jupyter gives a copied cell an id of its own
    first.source = code("""
        def batchnorm_forward(x, gamma, beta, eps=1e-5):
            return 0 * x, None  # a first attempt, overwritten by the next cell
    """)
    nb.cells.insert(i, first)
    return nb


def _tampered_metadata(kit):
    nb = kit.with_stub("backward_alt")
    for cell in nb.cells:
        if meta(cell).get("grade") and not meta(cell).get("solution"):
            meta(cell)["locked"] = False
    meta(index(nb, "test_forward"))["points"] = 100
    meta(index(nb, "forward"))["schema_version"] = 1  # plain nbgrader aborts the whole run
    test = index(nb, "test_backward_alt")
    meta(test)["grade"] = False
    test.source = "pass"
    return nb


def _deleted(grade_id, stub=None):
    def make(kit):
        nb = kit.with_stub(stub) if stub else kit.full()
        nb.cells.pop(position(nb, grade_id))
        return nb
    return make


def _edited_test(kit):
    nb = kit.with_stub("backward_alt")
    index(nb, "test_backward_alt").source = 'print("all checks passed")'
    return nb


def _malformed(kit, course, student):
    (folder(course, student) / NOTEBOOK).write_text('{"cells": [{"cell_type": "code", ')


def _old_format(kit, course, student):
    old = nbformat.convert(kit.full(), 3)
    (folder(course, student) / NOTEBOOK).write_text(nbformat.writes(old, version=3))


def _wrong_name(kit, course, student):
    write(kit.full(), course, student, name=f"{ASSIGNMENT} (1).ipynb")


def _missing(kit, course, student):
    (folder(course, student) / "notes.txt").write_text("I could not finish in time.\n")


def _extra_files(kit, course, student):
    write(kit.full(), course, student)
    here = folder(course, student)
    (here / "numpy.py").write_text('raise SystemExit("a fake numpy next to the notebook")\n')
    (here / "bncore").mkdir()
    (here / "bncore" / "__init__.py").write_text('raise ImportError("a fake bncore")\n')
    (here / "sitecustomize.py").write_text('raise SystemExit("sitecustomize")\n')


def cases(marker: str, course: Path = Path("/course"), port: int = 0) -> list[Case]:
    """The corpus. ``marker`` is a unique file name the write attack tries to create in the
    machine's /tmp (the test checks that it does not exist afterwards); the attacks look for
    the course at ``course`` too, and the write attack tries to connect to ``port`` on the
    loopback, where the test listens."""
    later = ("test_backward", "test_backward_alt")
    return [
        # good students, graded in the same class
        notebook_case("good_1", "full solution", lambda k: k.full(), suspicious=False),
        notebook_case("good_2", "full solution", lambda k: k.full(), suspicious=False),
        notebook_case("victim", "full solution; the target of the attacks",
                      lambda k: k.full(), suspicious=False),
        notebook_case("partial", "first answer only",
                      lambda k: k.with_stub("backward_alt", k.with_stub("backward")),
                      lose=later, suspicious=False),
        notebook_case("untouched", "the release as handed out", lambda k: k.untouched(),
                      lose=ALL, suspicious=False),
        # out of control
        notebook_case("infinite_loop", "while True: pass in backward_alt",
                      lambda k: k.full(backward_alt=INFINITE_LOOP), lose=("test_backward_alt",),
                      suspicious=False, timed_out=True, problems=("timed out",)),
        notebook_case("stubborn_loop", "a loop that catches the interrupt",
                      lambda k: k.full(backward_alt=STUBBORN_LOOP),
                      lose=("test_backward_alt",), timed_out=True,
                      problems=("timed out",)),
        notebook_case("raises", "an answer cell that raises",
                      lambda k: k.full(backward_alt=RAISES), lose=("test_backward_alt",),
                      suspicious=False),
        notebook_case("sys_exit", "sys.exit() in backward_alt",
                      lambda k: k.full(backward_alt=SYS_EXIT), lose=("test_backward_alt",)),
        notebook_case("os_exit", "os._exit() in backward: the kernel dies",
                      lambda k: k.full(backward=OS_EXIT), lose=later,
                      problems=("kernel died", "not run")),
        notebook_case("segfault", "a kernel crash (ctypes reads address 0)",
                      lambda k: k.full(backward_alt=SEGFAULT), lose=("test_backward_alt",),
                      problems=("kernel died",)),
        notebook_case("memory_bomb", "allocates until memory runs out",
                      lambda k: k.full(backward_alt=MEMORY_BOMB), lose=("test_backward_alt",),
                      suspicious=False),
        notebook_case("fork_bomb", "forks 200 processes",
                      lambda k: add_cell(k.full(), "setup", FORK_BOMB), needs_sandbox=True),
        notebook_case("big_output", "prints 200 MB",
                      lambda k: add_cell(k.full(), "setup", BIG_OUTPUT), suspicious=False,
                      problems=("output truncated",)),
        # a mangled notebook
        notebook_case("edited_test", "test cell replaced by a print", _edited_test,
                      lose=("test_backward_alt",)),
        notebook_case("deleted_test", "test cell deleted, answer left undone",
                      _deleted("test_backward_alt", stub="backward_alt"),
                      lose=("test_backward_alt",)),
        notebook_case("deleted_setup", "the setup cell deleted", _deleted("setup")),
        notebook_case("reordered", "test cell moved above its answer", _reordered,
                      lose=("test_forward",)),
        notebook_case("retyped", "test cell turned into markdown, answer undone", _retyped,
                      lose=("test_backward_alt",)),
        notebook_case("moved_answer", "answer cell moved below its test", _moved_answer,
                      lose=("test_backward_alt",)),
        notebook_case("duplicated_answer", "answer cell duplicated", _duplicated_answer),
        notebook_case("tampered_metadata", "points 100, unlocked tests, schema version 1, a "
                      "test marked ungraded", _tampered_metadata, lose=("test_backward_alt",)),
        # forging a pass: none of these has an honest answer, so none may earn a point
        notebook_case("patch_numpy", "np.allclose, np.isclose, numpy.testing patched; wrong "
                      "answers", lambda k: k.full(forward=PATCH_NUMPY, backward=WRONG_BACKWARD,
                                                  backward_alt=WRONG_BACKWARD_ALT), lose=ALL),
        notebook_case("lying_results", "results that compare equal to anything (int and "
                      "ndarray subclasses)", lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=LYING_RESULTS))), lose=ALL),
        notebook_case("lazy_array", "a lazy __array__ that calls the reference when the "
                      "checker converts it", lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=LAZY_ARRAY))), lose=ALL),
        notebook_case("thread", "a thread that keeps patching NumPy and imports the reference",
                      lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=THREAD))), lose=ALL),
        notebook_case("cloned_reference", "the reference's code objects cloned from bncore's "
                      "file, under another name", lambda k: k.with_stub(
                          "backward_alt", k.with_stub("backward",
                                                      k.full(forward=CLONED_REFERENCE))),
                      lose=ALL, needs_sandbox=True),
        notebook_case("patch_ipython", "IPython's compiler and input transformers wrap every "
                      "cell in try/except, an exception handler swallows the rest; no answers",
                      lambda k: add_cell(k.untouched(), "setup", PATCH_IPYTHON), lose=ALL,
                      problems=("could not reach the notebook",)),
        notebook_case("patch_builtins", "fake bngrade modules in sys.modules and a "
                      "builtins.__import__ that hands them out; answers call bncore",
                      lambda k: k.full(
                          forward=PATCH_BUILTINS + "\n\n\n" + CALLS_REFERENCE["forward"],
                          backward=CALLS_REFERENCE["backward"],
                          backward_alt=CALLS_REFERENCE["backward_alt"]), lose=ALL),
        notebook_case("stack_and_gc", "walks the caller's frames and the garbage collector "
                      "for the expected value", lambda k: k.with_stub("backward_alt",
                          k.with_stub("backward", k.full(forward=STACK_AND_GC))), lose=ALL),
        notebook_case("patch_channel", "replaces the notebook's end of the channel so that "
                      "every call returns its input; no answers",
                      lambda k: add_cell(k.untouched(), "setup", PATCH_SERVER), lose=ALL),
        notebook_case("patch_rel_error", "0.1 % wrong gradients, the setup's rel_error "
                      "patched to agree", lambda k: k.full(backward=SCALED_BACKWARD,
                                                           backward_alt=SCALED_BACKWARD_ALT),
                      lose=later),
        notebook_case("fake_result", "sys.displayhook('full marks') before failing: nbgrader "
                      "reads a result that is not a number as full credit",
                      lambda k: k.full(**FAKE_RESULT), lose=ALL),
        notebook_case("flood", "prints 30 MB from inside a test's call",
                      lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=FLOOD))), lose=ALL, suspicious=False),
        notebook_case("reference", "answers call bncore directly and through an alias",
                      lambda k: k.full(**CALLS_REFERENCE), lose=ALL),
        notebook_case("torch", "the forward pass calls PyTorch's batch norm",
                      lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=TORCH_REFERENCE))), lose=ALL),
        notebook_case("leaky", "prints the source of whatever calls it; writes BEGIN HIDDEN "
                      "TESTS in its answer", lambda k: k.full(forward=LEAKY)),
        # reaching outside
        notebook_case("read_solutions", "reads the solutions, its own graded notebook, the "
                      "victim's work and the gradebook",
                      lambda k: k.with_stub("backward_alt", k.with_stub(
                          "backward", k.full(forward=attack(READ_SOLUTIONS, course)))),
                      lose=ALL, needs_sandbox=True),
        notebook_case("write_attack", "writes to the gradebook, the victim's folders, the "
                      "solutions, outside its folder, /tmp; opens a socket",
                      lambda k: add_cell(k.full(), "setup",
                                         attack(WRITE_ATTACK, course, marker, port)),
                      needs_sandbox=True),
        # broken files
        Case("malformed_json", "truncated JSON", _malformed, lose=ALL, graded=False),
        Case("old_nbformat", "the full solution saved as nbformat 3", _old_format),
        Case("wrong_name", "full solution saved as 'ch3-forward-backward (1).ipynb'",
             _wrong_name, lose=ALL, graded=False),
        Case("missing", "no notebook, only a text file", _missing, lose=ALL, graded=False),
        Case("extra_files", "full solution with numpy.py, bncore/ and sitecustomize.py next "
             "to it", _extra_files),
    ]


# What plain nbgrader 0.9.6 did with these submissions, with the course's configuration before
# the sandbox (feedback already without hidden tests), measured once on this corpus; the cases
# not listed got the same grade as now. Documentation only (README.md): no test relies on it.
PLAIN_NBGRADER = {
    "stubborn_loop": "the whole submission fails (CellTimeoutError): 0",
    "os_exit": "the whole submission fails (DeadKernelError): 0",
    "segfault": "the whole submission fails (DeadKernelError): 0",
    "memory_bomb": "no memory limit: the machine's memory (not tried)",
    "fork_bomb": "no process limit (not tried)",
    "big_output": "50 MB in the autograded notebook (nbgrader cuts lines, not bytes)",
    "deleted_setup": "not put back: 0",
    "duplicated_answer": "the whole class stops (SchemaTooOldError): nobody after it is graded",
    "tampered_metadata": "the whole class stops (SchemaTooOldError)",
    "patch_numpy": "5 of 12",
    "patch_builtins": "12 of 12",
    "patch_ipython": "12 of 12",
    "fake_result": "12 of 12",
    "read_solutions": "runs the model answers it read: 5 of 12",
    "write_attack": "writes into the gradebook, the victim's submission and outside",
    "extra_files": "its numpy.py shadows numpy: 0",
}


def expected_score(case: Case, solution) -> float:
    """The autograded points the case must receive."""
    tests = {meta(c)["grade_id"]: float(meta(c).get("points", 0)) for c in solution.cells
             if meta(c).get("grade") and not meta(c).get("solution")}
    lost = tests if case.lose == ALL else case.lose
    unknown = set(lost) - set(tests)
    assert not unknown, f"{case.student}: no test cells {unknown}"
    return sum(tests.values()) - sum(tests[name] for name in lost)


# The cases of the corpus when plain nbgrader was measured; the others were added later.
MEASURED = {"good_1", "good_2", "victim", "partial", "untouched", "infinite_loop",
            "stubborn_loop", "raises", "sys_exit", "os_exit", "segfault", "memory_bomb",
            "fork_bomb", "big_output", "edited_test", "deleted_test", "deleted_setup",
            "reordered", "retyped", "moved_answer", "duplicated_answer", "tampered_metadata",
            "patch_numpy", "patch_builtins", "patch_ipython", "fake_result", "reference",
            "leaky", "read_solutions", "write_attack", "malformed_json", "old_nbformat",
            "wrong_name", "missing", "extra_files"}


def describe(corpus: list[Case]) -> str:
    """The corpus as a Markdown table (README.md shows it)."""
    rows = ["| student | submission | loses the points of | plain nbgrader 0.9.6 |",
            "| --- | --- | --- | --- |"]
    for case in corpus:
        loses = "every test" if case.lose == ALL else ", ".join(case.lose) or "nothing"
        if not case.graded:
            loses += " (not graded: named in the log)"
        plain = PLAIN_NBGRADER.get(case.student, "the same" if case.student in MEASURED
                                   else "not measured")
        rows.append(f"| `{case.student}` | {case.what} | {loses} | {plain} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/hostile/cases.py [--table]
    import sys

    if "--table" in sys.argv:
        print(describe(cases("MARKER")))
    else:
        print(json.dumps([c.student for c in cases("MARKER")]))
