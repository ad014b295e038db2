"""What a submission does, read without running it: ``python -m bngrade scan NOTEBOOK...``.

The grade never depends on this scan: tests run in the grader's process and judge only the
values an answer returns. The scan tells an instructor what deserves a look: a missing or
misnamed notebook, cells deleted, moved, edited or retyped, extra files, and answer code that
reaches outside the answer (files, processes, the network, the course's reference package,
other libraries' implementations, the kernel's internals). ``python -m bngrade.autograde``
shows its findings in the "suspicious" column, and ``nbgrader autograde`` logs them
(:func:`report_submission_problems`, the ``Autograde.pre_convert_hook``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bncore.runner import is_test_cell, nbgrader_meta

# Modules a graded answer has no business importing, and why.
_RISKY_IMPORTS = {
    "bncore": "imports bncore (the course's reference implementation)",
    "torch": "uses PyTorch (the exercises ask for NumPy)",
    "sklearn": "uses scikit-learn (the exercises ask for NumPy)",
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
# A result object that pretends: a subclass of an array or a number, or a class that answers
# comparisons and NumPy's conversions itself, can make a wrong answer compare equal.
_PRETENDING_BASES = {"ndarray", "generic", "int", "float", "complex", "bool", "Number"}
_PRETENDING_METHODS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__",
                       "__float__", "__index__", "__array__", "__array_function__",
                       "__array_ufunc__", "__array_priority__", "__array_interface__"}
# Dunder names a notebook may read ...
_PLAIN_DUNDERS = {"__name__", "__doc__"}
# ... and those whose every use is suspicious (a class body may set other dunders).
_KERNEL_DUNDERS = {"__builtins__", "__loader__", "__spec__"}
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
        elif (isinstance(node, ast.Name) and node.id.startswith("__")
              and node.id.endswith("__") and node.id not in _PLAIN_DUNDERS
              and (isinstance(node.ctx, ast.Load) or node.id in _KERNEL_DUNDERS)):
            found.append(f"touches {node.id} (the kernel's internals)")
        elif isinstance(node, ast.ClassDef):
            found += _pretending_class(node)
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
                if isinstance(target, ast.Attribute) and target.attr == "__class__":
                    found.append(f"changes an object's class ({ast.unparse(target)[:60]} = ...)")
    return list(dict.fromkeys(found))


def _pretending_class(node: ast.ClassDef) -> list[str]:
    """Why the class ``node`` could stand for a value it is not: it subclasses an array or a
    number, or defines comparisons or NumPy's conversions."""
    found = []
    for base in node.bases:
        name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
        if name in _PRETENDING_BASES:
            found.append(f"class {node.name} subclasses {ast.unparse(base)} "
                         "(a result that can pretend to hold other values)")
    defined = {target.id for statement in node.body
               for target in (statement.targets if isinstance(statement, ast.Assign) else [])
               if isinstance(target, ast.Name)}
    defined |= {statement.name for statement in node.body
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))}
    pretending = sorted(defined & _PRETENDING_METHODS)
    if pretending:
        found.append(f"class {node.name} defines {', '.join(pretending)} "
                     "(its objects can compare equal to anything)")
    return found


def _helper_names(locked_sources: dict[str, str]) -> dict[str, str]:
    """The functions and classes that the locked cells define (the set-up's helpers, such as
    a gradient checker): name -> the cell's grade_id."""
    helpers = {}
    for grade_id, source in locked_sources.items():
        try:
            tree = ast.parse(_strip_magics(source)[0])
        except SyntaxError:
            continue
        for statement in tree.body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                helpers[statement.name] = grade_id
    return helpers


def _stored_names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
            and isinstance(n.ctx, (ast.Store, ast.Del))} if node is not None else set()


def _module_bindings(statements: list[ast.stmt]) -> set[str]:
    """The names that ``statements`` bind at module level (not inside a function or class)."""
    bound: set[str] = set()
    for statement in statements:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(statement.name)
        elif isinstance(statement, (ast.For, ast.AsyncFor)):
            bound |= _stored_names(statement.target)
            bound |= _module_bindings(statement.body + statement.orelse)
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            for item in statement.items:
                bound |= _stored_names(item.optional_vars)
            bound |= _module_bindings(statement.body)
        elif isinstance(statement, (ast.If, ast.While)):
            bound |= _module_bindings(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            handled = [s for handler in statement.handlers for s in handler.body]
            bound |= {h.name for h in statement.handlers if h.name}
            bound |= _module_bindings(statement.body + handled + statement.orelse
                                      + statement.finalbody)
        else:
            bound |= _stored_names(statement)
    return bound


def redefined_helpers(source: str, helpers: dict[str, str]) -> list[str]:
    """The locked cells' helpers (see :func:`_helper_names`) that the code ``source`` binds
    again: a gradient checker redefined to agree with anything."""
    try:
        tree = ast.parse(_strip_magics(source)[0])
    except SyntaxError:
        return []
    bound = _module_bindings(tree.body)
    bound.update(name for node in ast.walk(tree) if isinstance(node, ast.Global)
                 for name in node.names)
    return [f"redefines {name}, a helper of the locked cell {helpers[name]}"
            for name in sorted(bound & helpers.keys())]


def _course_root_of(notebook: Path) -> Path:
    """submitted/<student>/<assignment>/<notebook>: the course root, three folders up (when it
    holds nbgrader_config.py), else the current folder."""
    candidate = notebook.resolve().parents[3] if len(notebook.resolve().parents) > 3 else None
    if candidate is not None and (candidate / "nbgrader_config.py").exists():
        return candidate
    return Path.cwd()


def scan_submission(notebook_path: str | Path, *, release: str | Path | None = None
                    ) -> list[str]:
    """Static reasons why a submitted notebook is suspicious; an empty list when it is clean.

    ``notebook_path`` is where the notebook should be, normally
    ``submitted/<student>/<assignment>/<assignment>.ipynb``. Reported: a missing notebook or a
    wrong file name, malformed JSON or an old notebook format, an oversized file, extra files
    next to it, cells that differ from the release (deleted, duplicated, moved, retyped or
    edited locked cells, changed nbgrader metadata), and, in the cells the student may edit,
    code that reaches outside the answer (see :func:`scan_code`). ``release`` is the student
    version of the notebook, by default ``exercises/<assignment>/<name>`` of the course.
    Nothing is executed. Used by ``python -m bngrade.autograde`` for its "suspicious" column.
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
    except Exception as error:
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
        locked_sources = {nbgrader_meta(c)["grade_id"]: c.source for c in
                          nbformat.read(release_path, as_version=4).cells
                          if nbgrader_meta(c).get("locked") and nbgrader_meta(c).get("grade_id")}
    helpers = _helper_names(locked_sources)
    for index, cell in enumerate(nb.cells):
        meta = nbgrader_meta(cell)
        if cell.cell_type != "code":
            continue
        grade_id = meta.get("grade_id")
        if grade_id in locked_sources:  # a locked cell: nbgrader puts its source back
            continue
        where = f"cell {index}" + (f" (answer {grade_id})" if grade_id else " (added)")
        reasons = scan_code(cell.source) + redefined_helpers(cell.source, helpers)
        found += [f"{where}: {reason}" for reason in reasons]
    return list(dict.fromkeys(found))


def _compare_structure(nb: Any, release: Any) -> list[str]:
    found = []
    wanted = [(nbgrader_meta(c)["grade_id"], c) for c in release.cells
              if nbgrader_meta(c).get("grade_id")]
    got: dict[str, list[int]] = {}
    for index, cell in enumerate(nb.cells):
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id:
            got.setdefault(grade_id, []).append(index)
    known = {name for name, _ in wanted}
    for name in got:
        if name not in known:
            found.append(f"a cell claims the unknown nbgrader id {name!r}")
    order = []
    for name, cell in wanted:
        kind = ("test cell" if is_test_cell(cell) else "answer cell"
                if nbgrader_meta(cell).get("solution") else "locked cell")
        if name not in got:
            found.append(f"deleted {kind} {name}")
            continue
        if len(got[name]) > 1:
            found.append(f"duplicated {kind} {name}")
        order.append(name)
        mine = nb.cells[got[name][-1]]
        if mine.cell_type != cell.cell_type:
            found.append(f"{kind} {name} changed from {cell.cell_type} to {mine.cell_type}")
        elif nbgrader_meta(cell).get("locked") and mine.source != cell.source:
            found.append(f"edited {kind} {name}")
        for key in ("grade", "solution", "locked", "points", "schema_version"):
            was, now = nbgrader_meta(cell).get(key), nbgrader_meta(mine).get(key)
            if now != was:
                found.append(f"changed the nbgrader metadata of {name} ({key}: "
                             f"{was!r} -> {now!r})")
    positions = [got[name][0] for name in order]
    for before, after, name in zip(positions[:-1], positions[1:], order[1:], strict=True):
        if after < before:
            found.append(f"moved cell {name} (the cells are out of order)")
    return found


def report_submission_problems(assignment: str | None = None, student: str | None = None,
                               notebooks: Sequence[str] = ()) -> None:
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


