"""The grading sandbox: how a student's notebook runs when the course autogrades it.

nbgrader runs a submission's code in a Jupyter kernel on the instructor's machine, with the
gradebook, the solutions and every other student's work next to it, and sandboxes nothing.
``nbgrader_config.py`` swaps in the classes of this module, so that the standard commands
(``nbgrader autograde``) grade every notebook like this:

* :class:`SandboxedKernelManager` starts the kernel with resource limits (``prlimit``: address
  space, CPU time, file size, open files, processes) and, where bubblewrap (``bwrap``) is
  installed and the grader runs as root, inside a sandbox: the whole system read-only; the
  course directory, home directories, ``/tmp`` and ``/run`` hidden; the Python installation and
  bncore shown again read-only; the submission's own folder as the working directory, showing
  the submission's extra files read-only, with a small writable layer that vanishes with the
  kernel; no network (the kernel talks to nbgrader over Unix sockets); its own process
  namespace; and an unprivileged user id of its own, so that the process limit really bounds a
  fork bomb. Without bwrap it falls back to the limits alone and says so once.
* :class:`GradingExecute` (nbgrader's ``Execute``) runs the cells: it caps what a cell can print;
  it turns a kernel that dies (``os._exit``, a crash, the CPU limit) or a cell that cannot be
  interrupted into a clear error in that cell, and zero for the graded cells after it, instead
  of failing the whole submission; before every test cell it puts back what a submission may
  have patched (numpy, bncore, builtins, the setup cell's names, IPython's input
  transformers...), through a channel that does not pass through the student's input
  transformers; and it records what happened (``metadata.bncore`` of the autograded notebook).
* :class:`SanitizeSubmission` repairs the nbgrader metadata of a submission (a cell with
  another nbgrader schema version otherwise aborts the whole run) and puts back deleted locked
  cells (setup and test cells) in their place.

``python -m bncore.sandbox check`` says which mode this machine gets and proves it on a kernel.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from traitlets import Bool, CaselessStrEnum, Integer, List, Unicode

MiB = 2**20
GiB = 2**30

# Paths hidden from every kernel besides the course directory (where they exist).
SYSTEM_HIDDEN = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv")
# Environment variables a sandboxed kernel keeps from the grader; everything else (tokens,
# credentials, proxies) stays outside.
ENV_PASSED = ("NBGRADER_EXECUTION", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SOURCE_DATE_EPOCH")
# Set in every graded kernel: one thread for the numerical libraries (limits stay meaningful
# and parallel grading does not oversubscribe), and private, empty configuration folders.
ENV_GRADING = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "MPLBACKEND": "Agg",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}

_mode_cache: dict[str, tuple[str, str]] = {}
_warned: set[str] = set()


def _python_installation() -> list[Path]:
    """The folders a kernel of this Python needs to read: the interpreter, the standard
    library, the virtual environment and the bncore package (which may be an editable install
    inside the course directory)."""
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(Path(sys.executable).resolve().parent)
    paths.add(Path(__file__).resolve().parent)
    # keep the outermost folders only
    return sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))


def sandbox_mode(requested: str = "auto") -> tuple[str, str]:
    """The sandbox this machine gives a kernel: ``("bwrap", "")``, ``("rlimits", why not
    bwrap)`` or ``("off", why)``. ``requested`` is ``auto`` (the best available), ``bwrap``
    (fails when unavailable), ``rlimits`` or ``off``. The result is cached per process."""
    requested = requested.lower()
    if requested in _mode_cache:
        return _mode_cache[requested]
    prlimit = shutil.which("prlimit")
    if requested == "off":
        result = ("off", "the sandbox is switched off (SandboxedKernelManager.sandbox = 'off')")
    elif requested == "rlimits":
        result = ("rlimits", "bubblewrap is not used (SandboxedKernelManager.sandbox = "
                  "'rlimits')") if prlimit else ("off", "prlimit (util-linux) is not installed")
    else:
        why = None
        if not sys.platform.startswith("linux"):
            why = "the sandbox needs Linux"
        elif not shutil.which("bwrap"):
            why = "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
        elif os.geteuid() != 0:
            why = ("the grader does not run as root, so the kernel cannot get an unprivileged "
                   "user of its own")
        elif not (prlimit and shutil.which("setpriv")):
            why = "prlimit and setpriv (util-linux) are needed"
        else:
            probe = subprocess.run(
                ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                 "--unshare-pid", "--unshare-net", "--die-with-parent", "--",
                 "setpriv", "--reuid=1999999", "--regid=1999999", "--clear-groups",
                 "--no-new-privs", "--", sys.executable, "-I", "-c", "import numpy"],
                capture_output=True, text=True, timeout=60)
            if probe.returncode != 0:
                why = f"bwrap fails on this machine: {probe.stderr.strip()[-300:]}"
        if why is None:
            result = ("bwrap", "")
        elif requested == "bwrap":
            raise RuntimeError(f"the grading sandbox is not available: {why}")
        elif prlimit:
            result = ("rlimits", why)
        else:
            result = ("off", f"{why}; and prlimit (util-linux) is not installed")
    _mode_cache[requested] = result
    return result


def limit_arguments(*, memory: int, cpu: int, file_size: int, open_files: int,
                    processes: int | None) -> list[str]:
    """``prlimit`` arguments: soft and hard limits alike, so the kernel cannot raise them."""
    args = [f"--as={memory}", f"--cpu={cpu}", f"--fsize={file_size}",
            f"--nofile={open_files}", "--core=0"]
    if processes is not None:
        args.append(f"--nproc={processes}")
    return args


def bwrap_arguments(*, cwd: Path, rundir: Path, hidden: list[Path], scratch_size: int,
                    uid: int, env: dict[str, str], hide_files: tuple[str, ...] = ()) -> list[str]:
    """The bubblewrap command line (without the command it runs) for a kernel working in
    ``cwd``: see the module's docstring. ``hide_files``: names in ``cwd`` the kernel must not
    see (the notebook being graded, which holds the hidden tests)."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    needed = _python_installation()
    for path in hidden:
        if path.is_symlink() or not path.exists():
            continue
        if path.is_dir():
            if path in (Path("/tmp"), Path("/dev/shm")):
                args += ["--perms", "1777", "--size", str(scratch_size), "--tmpfs", str(path)]
            else:
                args += ["--tmpfs", str(path)]
            for keep in needed:
                if path in keep.parents:
                    # bwrap creates the folders leading to a mount point as 0700 root, which the
                    # kernel's unprivileged user cannot pass (a venv at /tmp/clone/.venv): open
                    # them first, from the top down.
                    for folder in reversed(keep.parents):
                        if path in folder.parents:
                            args += ["--perms", "0755", "--dir", str(folder)]
                    args += ["--ro-bind", str(keep), str(keep)]
        else:
            args += ["--ro-bind", "/dev/null", str(path)]
    # The submission's folder: a small writable tmpfs showing its files read-only.
    args += ["--perms", "1777", "--size", str(scratch_size), "--tmpfs", str(cwd)]
    for entry in sorted(cwd.iterdir()) if cwd.is_dir() else []:
        if entry.name in hide_files or entry.is_symlink():
            continue
        args += ["--ro-bind", str(entry), str(entry)]
    args += ["--bind", str(rundir), str(rundir), "--chdir", str(cwd)]
    args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--hostname", "grading", "--die-with-parent",
             "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    args += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return args


class SandboxedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernels run under resource limits, in a bubblewrap sandbox
    where one is available (see the module's docstring). Configure it in nbgrader_config.py:
    ``c.SandboxedKernelManager.memory_limit = 2 * 2**30`` and so on."""

    sandbox = CaselessStrEnum(
        ["auto", "bwrap", "rlimits", "off"], "auto",
        help="auto: bwrap when available, else resource limits only (with a warning); bwrap: "
             "fail when bwrap cannot be used; rlimits: limits only; off: nbgrader's plain "
             "kernel").tag(config=True)
    memory_limit = Integer(2 * GiB, help="address space of the kernel process, bytes "
                           "(RLIMIT_AS): a memory bomb gets a MemoryError").tag(config=True)
    cpu_limit = Integer(600, help="CPU seconds of the kernel over the whole notebook "
                        "(RLIMIT_CPU); the per-cell wall-clock limit is Execute.timeout"
                        ).tag(config=True)
    process_limit = Integer(64, help="processes and threads of the kernel's user "
                            "(RLIMIT_NPROC; only with bwrap, where the kernel has a user of "
                            "its own)").tag(config=True)
    file_size_limit = Integer(64 * MiB, help="largest file the kernel may write, bytes "
                              "(RLIMIT_FSIZE)").tag(config=True)
    open_files_limit = Integer(1024, help="open files (RLIMIT_NOFILE)").tag(config=True)
    scratch_size = Integer(64 * MiB, help="size of the kernel's private /tmp and of the "
                           "writable layer over its folder, bytes").tag(config=True)
    hidden_paths = List(Unicode(), help="more files or folders hidden from the kernel (the "
                        "course directory and the gradebook are hidden already)"
                        ).tag(config=True)
    hidden_files = List(Unicode(), help="names of files in the kernel's folder it must not "
                        "see").tag(config=True)

    _rundir: Path | None = None
    mode: str = "off"

    async def _async_pre_start_kernel(self, **kw):
        mode, why = sandbox_mode(self.sandbox)
        self.mode = mode
        if why and why not in _warned:
            _warned.add(why)
            level = self.log.info if mode == "off" and self.sandbox == "off" else self.log.warning
            level("Grading sandbox: %s; %s.", mode, why)
        if mode == "off":
            return await super()._async_pre_start_kernel(**kw)
        self._rundir = Path(tempfile.mkdtemp(prefix="bncore-kernel-"))
        uid = 1_000_000 + secrets.randbelow(1_000_000)
        if mode == "bwrap":
            # Unix sockets cross the network namespace that TCP cannot.
            self.transport = "ipc"
            self.ip = str(self._rundir / "ipc")
            self.connection_file = str(self._rundir / "kernel.json")
            os.chown(self._rundir, uid, uid)
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        if cmd and Path(cmd[0]).name.startswith("python"):
            cmd = [cmd[0], "-I", *cmd[1:]]  # isolated: the folder's .py files cannot shadow
        cwd = Path(kw.get("cwd") or os.getcwd()).resolve()
        kw["cwd"] = str(cwd)
        env = {key: value for key, value in kw.get("env", os.environ).items()
               if key in ENV_PASSED}
        env.update(ENV_GRADING)
        if mode == "bwrap":
            env["JPY_PARENT_PID"] = "1"  # bwrap's init: no parent poller, no console banner
        # Private, empty configuration folders: in the sandbox's /tmp, or beside the kernel.
        private = Path("/tmp") if mode == "bwrap" else self._rundir
        env.update(HOME=str(private), TMPDIR="/tmp", IPYTHONDIR=str(private / ".ipython"),
                   MPLCONFIGDIR=str(private / ".matplotlib"),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin",
                                         "/usr/bin", "/bin"]))
        limits = limit_arguments(memory=self.memory_limit, cpu=self.cpu_limit,
                                 file_size=self.file_size_limit,
                                 open_files=self.open_files_limit,
                                 processes=self.process_limit if mode == "bwrap" else None)
        # The kernel's own output (not the cells'): a capped log, not the grader's terminal,
        # which a submission could otherwise flood through file descriptors 1 and 2.
        kw["stdout"] = subprocess.DEVNULL
        kw["stderr"] = open(self._rundir / "kernel.log", "wb")  # noqa: SIM115 (Popen's)
        if mode == "bwrap":
            os.chown(self.connection_file, uid, uid)
            hidden = [Path(p) for p in SYSTEM_HIDDEN] + [Path(p) for p in self.hidden_paths]
            sandbox = bwrap_arguments(cwd=cwd, rundir=self._rundir, hidden=hidden,
                                      scratch_size=self.scratch_size, uid=uid, env=env,
                                      hide_files=tuple(self.hidden_files))
            cmd = ["prlimit", *limits, "--", *sandbox, *cmd]
            kw["env"] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        else:
            cmd = ["prlimit", *limits, "--", *cmd]
            kw["env"] = {**kw.get("env", os.environ), **env}
        return cmd, kw

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        try:
            await super()._async_launch_kernel(kernel_cmd, **kw)
        finally:
            if hasattr(kw.get("stderr"), "close"):
                kw["stderr"].close()  # the kernel has its own copy

    async def interrupt_kernel(self):
        # A signal to the process group would stop bwrap itself: ask the kernel instead.
        if self.mode == "bwrap" and self.has_kernel:
            msg = self.session.msg("interrupt_request", content={})
            self._connect_control_socket()
            self.session.send(self._control_socket, msg)
            return
        await super().interrupt_kernel()

    def lock_rundir(self) -> None:
        """Once the kernel has bound its sockets, take its connection folder back: it is the
        one place outside its size-limited tmpfs where the kernel could create files."""
        if self.mode == "bwrap" and self._rundir is not None:
            os.chown(self.connection_file, 0, 0)
            os.chmod(self.connection_file, 0o600)
            os.chown(self._rundir, 0, 0)
            os.chmod(self._rundir, 0o700)

    def kernel_log(self, limit: int = 2000) -> str:
        """The end of what the kernel process itself wrote to stderr (startup errors)."""
        try:
            return (self._rundir / "kernel.log").read_bytes()[-limit:].decode(errors="replace")
        except (OSError, TypeError):
            return ""

    async def _async_cleanup_resources(self, restart: bool = False):
        await super()._async_cleanup_resources(restart=restart)
        if self._rundir is not None and not restart:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    async def cleanup_resources(self, restart: bool = False):
        await self._async_cleanup_resources(restart=restart)


# --- running the cells -------------------------------------------------------------------------


def _nbgrader(cell) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def is_test_cell(cell) -> bool:
    meta = _nbgrader(cell)
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def bound_names(source: str) -> list[str]:
    """The names a cell binds at its top level (imports, definitions, assignments)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(names))


def imported_modules(sources) -> list[str]:
    """The modules that code imports (``import a.b`` and ``from a.b import c`` give ``a.b``)."""
    found: list[str] = []
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append(node.module)
    return list(dict.fromkeys(found))


def _error_output(ename: str, evalue: str):
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue,
                                  traceback=[f"{ename}: {evalue}"])


# The expression that reaches bncore.grading's hooks without looking up any name that a
# submission could have rebound (builtins, the user's namespace): the hooks class is found
# among object's subclasses. It is evaluated as a user expression, which IPython's input and
# AST transformers never see.
_HOOKS = ("[c for c in ().__class__.__base__.__subclasses__() "
          "if c.__qualname__ == 'GraderHooks' and c.__module__ == 'bncore.grading'][0]")


class GradingExecute(Execute):
    """nbgrader's Execute preprocessor, hardened for grading untrusted notebooks (see the
    module's docstring). Its kernels are :class:`SandboxedKernelManager` kernels."""

    max_output_bytes = Integer(
        1 * MiB, help="text and data a cell may output before the rest is dropped; the "
                      "gradebook and the feedback stay small").tag(config=True)
    restore_before_tests = Bool(
        True, help="before every test cell, put back what the submission patched (numpy, "
                   "bncore, builtins, the locked cells' names, IPython hooks)").tag(config=True)
    grader_call_timeout = Integer(30, help="seconds the kernel gets to answer the grader's "
                                  "own checks").tag(config=True)

    def __init__(self, **kw):
        kw.setdefault("kernel_manager_class", SandboxedKernelManager)
        super().__init__(**kw)

    def create_kernel_manager(self):
        km = super().create_kernel_manager()
        if isinstance(km, SandboxedKernelManager):
            from nbgrader.coursedir import CourseDirectory

            coursedir = CourseDirectory(config=self.config)
            hidden = [coursedir.root]
            if coursedir.db_url.startswith("sqlite:///"):
                hidden.append(coursedir.db_url[len("sqlite:///"):])
            km.hidden_paths = [*km.hidden_paths, *hidden]
            notebook = self.resources.get("nbgrader", {}).get("notebook")
            if notebook:
                km.hidden_files = [*km.hidden_files, f"{notebook}.ipynb"]
        return km

    # -- output cap --

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        text = content.get("text")
        size = len(text) if isinstance(text, str) else len(
            json.dumps(content.get("data", content), default=str))
        used = self._output_used.get(cell_index, 0)
        self._output_used[cell_index] = used + size
        if used + size <= self.max_output_bytes:
            return super().output(outs, msg, display_id, cell_index)
        if used <= self.max_output_bytes:  # the first message over the limit
            note = nbformat.v4.new_output(
                "stream", name="stdout",
                text=f"\n[output truncated by the grader: this cell printed more than "
                     f"{self.max_output_bytes // 1024} KiB]\n")
            outs.append(note)
            self._report["output_truncated"].append(self._cell_name(cell_index))
        return None

    # -- the grader's own calls into the kernel --

    def _grader_call(self, action: str, *args) -> dict | None:
        """Evaluate ``GraderHooks.call(action, *args)`` in the kernel as a user expression;
        its JSON answer, or None when the kernel did not give one."""
        from jupyter_core.utils import run_sync

        try:
            return run_sync(self._async_grader_call)(action, args)
        except Exception as error:  # noqa: BLE001 -- any failure means: no answer
            self.log.warning("grader check %s got no answer: %s", action, error)
            return None

    async def _async_grader_call(self, action: str, args) -> dict | None:
        from queue import Empty

        from jupyter_core.utils import ensure_async

        # Before any student code has run (seal), a plain import is safe.
        head = "__import__('bncore.grading').grading.GraderHooks" if action == "seal" else _HOOKS
        expression = f"{head}.call({action!r}, {json.dumps(list(args))!r})"
        msg_id = await ensure_async(self.kc.execute(
            "", silent=False, store_history=False, user_expressions={"bncore": expression}))
        deadline = time.monotonic() + self.grader_call_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                reply = await ensure_async(
                    self.kc.shell_channel.get_msg(timeout=min(remaining, 1.0)))
            except Empty:
                if not await ensure_async(self.km.is_alive()):
                    return None  # the next cell will find the kernel dead
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        value = reply["content"].get("user_expressions", {}).get("bncore", {})
        if value.get("status") != "ok":
            self.log.warning("grader check %s failed in the kernel: %s %s", action,
                             value.get("ename"), value.get("evalue"))
            return None
        return json.loads(ast.literal_eval(value["data"]["text/plain"]))

    def _cell_name(self, index: int) -> str:
        cell = self.nb.cells[index]
        grade_id = _nbgrader(cell).get("grade_id")
        return f"cell {index}" + (f" ({grade_id})" if grade_id else "")

    # -- the notebook --

    def preprocess(self, nb, resources=None, km=None):
        from nbclient.client import NotebookClient

        NotebookClient.__init__(self, nb, km)
        self.reset_execution_trackers()
        self._check_assign_resources(resources)
        self._output_used: dict[int, int] = {}
        self._report = {"timed_out": [], "kernel_died": None, "not_run": [],
                        "output_truncated": [], "restored": [], "unchecked": [],
                        "result_outputs": []}
        test_sources = [c.source for c in nb.cells if c.cell_type == "code"
                        and (is_test_cell(c) or _nbgrader(c).get("locked"))]
        modules = imported_modules(test_sources)
        stopped = None

        with self.setup_kernel():
            assert self.kc is not None
            info_msg = self.wait_for_reply(self.kc.kernel_info())
            assert info_msg is not None
            self.nb.metadata["language_info"] = info_msg["content"]["language_info"]
            if isinstance(self.km, SandboxedKernelManager):
                self.km.lock_rundir()  # the kernel answered: its sockets are bound
            sealed = self.restore_before_tests and self._grader_call("seal", modules) is not None
            if self.restore_before_tests and not sealed:
                self.log.warning("could not seal the grading environment; the test cells "
                                 "run without it")
            for index, cell in enumerate(self.nb.cells):
                if cell.cell_type != "code":
                    continue
                if stopped is not None:
                    cell.outputs = [_error_output("NotRun", stopped)]
                    cell.execution_count = None
                    if is_test_cell(cell):
                        self._report["not_run"].append(self._cell_name(index))
                    continue
                unchecked = False
                if sealed and is_test_cell(cell):
                    answer = self._grader_call("restore", _nbgrader(cell).get("grade_id", ""))
                    if answer is None:
                        unchecked = True
                        self._report["unchecked"].append(self._cell_name(index))
                    elif answer.get("restored"):
                        self._report["restored"].append(
                            {"before": self._cell_name(index), "what": answer["restored"]})
                try:
                    self.preprocess_cell(cell, resources, index)
                except DeadKernelError:
                    cell.outputs.append(_error_output(
                        "KernelDied", "the kernel stopped while running this cell (os._exit, "
                        "a crash, or a resource limit); the cells after it were not run"))
                    self._report["kernel_died"] = self._cell_name(index)
                    if hasattr(self.km, "kernel_log"):
                        self.log.warning("the kernel died in %s; its last words: %s",
                                         self._cell_name(index), self.km.kernel_log(500))
                    stopped = f"not run: the kernel stopped in {self._cell_name(index)}"
                except CellTimeoutError:
                    cell.outputs.append(_error_output(
                        "CellTimeoutError", f"the cell ran longer than {self.timeout} s and "
                        "could not be interrupted; the kernel was stopped"))
                    self._report["timed_out"].append(self._cell_name(index))
                    stopped = f"not run: {self._cell_name(index)} could not be interrupted"
                    self._stop_kernel()
                else:
                    if any(o.get("ename") == "CellTimeoutError" for o in cell.outputs
                           if o.output_type == "error"):
                        self._report["timed_out"].append(self._cell_name(index))
                    if unchecked:
                        cell.outputs.append(_error_output(
                            "GradingTampered", "the grader could not check the notebook's "
                            "environment before this test (the kernel did not answer)"))
                    if sealed and _nbgrader(cell).get("locked") and not is_test_cell(cell):
                        self._grader_call("seal_names", bound_names(cell.source))
        self.set_widgets_metadata()
        self._neutralize_results()
        if self.resources is not None:
            self.resources.setdefault("bncore", {})["grading"] = self._report
        return self.nb, self.resources

    def _stop_kernel(self):
        from jupyter_core.utils import run_sync

        try:
            run_sync(self.km.shutdown_kernel)(now=True)
        except Exception as error:  # noqa: BLE001
            self.log.warning("stopping the kernel: %s", error)

    def _neutralize_results(self):
        """A test cell's grade comes from its outputs: an error gives zero, but nbgrader reads
        an ``execute_result`` before it as a partial grade (and a non-number as full marks),
        which graded code can emit by calling ``sys.displayhook``. The course's tests never
        give partial credit that way: such outputs are shown as plain displays."""
        for index, cell in enumerate(self.nb.cells):
            if not is_test_cell(cell):
                continue
            for output in cell.outputs:
                if output.output_type == "execute_result":
                    output.output_type = "display_data"
                    output.pop("execution_count", None)
                    self._report["result_outputs"].append(self._cell_name(index))


class StoreGradingReport(NbGraderPreprocessor):
    """Writes what :class:`GradingExecute` recorded into the autograded notebook's metadata
    (``metadata.bncore.grading``); runs after nbconvert's ClearMetadataPreprocessor."""

    def preprocess(self, nb, resources):
        report = resources.get("bncore", {}).get("grading")
        if report is not None:
            nb.metadata.setdefault("bncore", {})["grading"] = report
        return nb, resources


# --- repairing a submission before nbgrader reads it ------------------------------------------


class SanitizeSubmission(NbGraderPreprocessor):
    """Runs first when nbgrader sanitizes a submission, before its own preprocessors:

    * every cell that claims a grade_id of the assignment gets that cell's nbgrader metadata
      back from the gradebook (points, locked, grade, solution, schema version): a submission
      cannot change its points, and a cell with another schema version no longer stops the
      whole grading run (nbgrader raises SchemaTooOldError for the entire class);
    * nbgrader metadata that names no cell of the assignment, or is malformed, is removed: the
      cell is the student's own;
    * a deleted locked cell (the setup cell, a test cell, an instruction) is put back where
      it belongs, after the cell that precedes it in the source notebook.

    Edited, retyped or duplicated cells are left to nbgrader (OverwriteCells restores the
    source of locked cells, DeduplicateIds keeps the last copy of a cell).
    """

    def preprocess(self, nb, resources):
        from nbgrader.api import Gradebook, MissingEntry

        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            try:
                notebook = gb.find_notebook(info["notebook"], info["assignment"])
            except MissingEntry:
                return nb, resources
            grades = {c.name: c for c in notebook.grade_cells}
            solutions = {c.name for c in notebook.solution_cells}
            tasks = {c.name for c in notebook.task_cells}
            sources = {c.name: c for c in notebook.source_cells}
            canonical = {}
            for name, source in sources.items():
                meta = {"grade": name in grades, "grade_id": name, "locked": bool(source.locked),
                        "schema_version": 3, "solution": name in solutions,
                        "task": name in tasks}
                if name in grades:
                    meta["points"] = float(grades[name].max_score)
                canonical[name] = (meta, source.cell_type, source.source)

        last = {}
        for index, cell in enumerate(nb.cells):
            meta = cell.get("metadata", {}).get("nbgrader")
            name = meta.get("grade_id") if isinstance(meta, dict) else None
            if isinstance(name, str) and name in canonical:
                last[name] = index
        for index, cell in enumerate(nb.cells):
            meta = cell.get("metadata", {}).get("nbgrader")
            if meta is None:
                continue
            name = meta.get("grade_id") if isinstance(meta, dict) else None
            if isinstance(name, str) and last.get(name) == index:
                cell.metadata["nbgrader"] = dict(canonical[name][0])
            else:
                # An unknown id, malformed metadata, or an earlier copy of a duplicated cell
                # (nbgrader's DeduplicateIds would leave it an empty nbgrader dict, which
                # CheckCellMetadata then takes for schema version 0: the whole run stops).
                self.log.warning("removing nbgrader metadata from cell %d: %r", index,
                                 meta if name is None else name)
                del cell.metadata["nbgrader"]

        present = {_nbgrader(c).get("grade_id") for c in nb.cells}
        order = self._source_order(info) or list(canonical)
        for position, name in enumerate(order):
            if name in present or name not in canonical or not canonical[name][0]["locked"]:
                continue
            meta, cell_type, source = canonical[name]
            if cell_type == "code":
                cell = nbformat.v4.new_code_cell(source)
            else:
                cell = nbformat.v4.new_markdown_cell(source)
            cell.metadata["nbgrader"] = dict(meta)
            cell.metadata.update(deletable=False, editable=False)
            before = [n for n in order[:position] if n in present]
            index = 0
            if before:
                index = 1 + max(i for i, c in enumerate(nb.cells)
                                if _nbgrader(c).get("grade_id") == before[-1])
            nb.cells.insert(index, cell)
            present.add(name)
            self.log.warning("putting back the deleted cell %s", name)
        return nb, resources

    def _source_order(self, info) -> list[str]:
        """The grade_ids of the source notebook, in order (the gradebook keeps no order)."""
        from nbgrader.coursedir import CourseDirectory

        coursedir = CourseDirectory(config=self.config)
        path = Path(coursedir.format_path(coursedir.source_directory, ".", info["assignment"]))
        path = path / f"{info['notebook']}.ipynb"
        try:
            source = nbformat.read(path, as_version=4)
        except Exception:  # noqa: BLE001
            return []
        return [_nbgrader(c)["grade_id"] for c in source.cells if _nbgrader(c).get("grade_id")]


# --- python -m bncore.sandbox check ------------------------------------------------------------


def check(course_root: Path | None = None) -> int:
    """Say which sandbox this machine gives, start a sandboxed kernel and show what it can
    reach. Returns 0 when the kernel ran."""
    from jupyter_core.utils import run_sync

    mode, why = sandbox_mode("auto")
    print(f"sandbox: {mode}" + (f" ({why})" if why else ""))
    root = Path(course_root or Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="bncore-check-") as folder:
        km = SandboxedKernelManager(kernel_name="python3")
        km.hidden_paths = [str(root)]
        start = time.perf_counter()
        run_sync(km.start_kernel)(cwd=folder)
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            km.lock_rundir()
            started = time.perf_counter() - start
            code = (
                "import os, socket\n"
                f"root = {str(root)!r}\n"
                "print('user id', os.getuid(), '; working directory', os.getcwd())\n"
                "print('course directory visible:', os.path.exists(os.path.join(root, "
                "'solutions')))\n"
                f"print('connection folder writable:', os.access({str(km._rundir)!r}, "
                "os.W_OK))\n"
                "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                "    print('network: reachable')\n"
                "except OSError as e:\n    print('network: unreachable', e)\n")
            reply = kc.execute_interactive(code, timeout=60, output_hook=_print_stream)
        finally:
            kc.stop_channels()
            run_sync(km.shutdown_kernel)(now=True)
    print(f"kernel start: {started:.2f} s")
    return 0 if reply["content"]["status"] == "ok" else 1


def _print_stream(msg):
    if msg["msg_type"] == "stream":
        print("  " + msg["content"]["text"].rstrip().replace("\n", "\n  "))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bncore.sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check"])
    parser.parse_args(argv)
    return check()


if __name__ == "__main__":
    sys.exit(main())
