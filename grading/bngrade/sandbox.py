"""The grading sandbox: how a student's notebook runs when the course autogrades it.

nbgrader runs a submission's code in a Jupyter kernel on the instructor's machine, with the
gradebook, the solutions and every other student's work next to it, and sandboxes nothing.
``nbgrader_config.py`` swaps in :class:`SandboxedKernelManager` (through
:class:`bngrade.execute.GradingExecute`), so that the standard commands grade every notebook
in a kernel that runs with resource limits (``prlimit``: address space, CPU time, file size,
open files, processes) and, where bubblewrap (``bwrap``) is installed and the grader runs as
root, inside a sandbox:

* the whole system read-only; the course directory, home directories, ``/tmp`` and ``/run``
  hidden; the Python installation and bncore shown again read-only, except the modules the
  notebook may not import (the course's reference implementation: see
  ``bncore.runner.blocked_modules``), which are replaced by a module that refuses to load;
* the submission's own folder as the working directory, showing its extra files read-only, with
  a small writable layer that vanishes with the kernel;
* no network (the kernel talks to the grader over Unix sockets), its own process namespace,
  and an unprivileged user id of its own, so that the process limit really bounds a fork bomb.

With bwrap, the kernels of one grading process are forked from a warm parent that imported the
kernel's libraries once (``bngrade.zygote``): each still gets a sandbox of its own, built as
above (its own mount, network and IPC namespaces, user, limits), and what it leaves behind
(files, processes) is gone before the next notebook. That saves about a quarter of a CPU second
per notebook; ``SandboxedKernelManager.warm = False`` starts every kernel afresh instead.

Without bwrap it falls back to the limits alone and says so once; the reference modules are
then only refused by an import hook, which the notebook's code can undo.

``python -m bngrade.sandbox check`` says which mode this machine gets and proves it on a
kernel: what it can see, and whether it reaches a listener that the check opens on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from jupyter_client.manager import AsyncKernelManager
from traitlets import Bool, CaselessStrEnum, Integer, List, Unicode

from bngrade.course import SECRET_ENV

MiB = 2**20
GiB = 2**30

# Paths hidden from every kernel besides the course directory (where they exist).
SYSTEM_HIDDEN = ("/home", "/root", "/run", "/tmp", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv")
# Environment variables a sandboxed kernel keeps from the grader; everything else (tokens,
# credentials, proxies) stays outside.
ENV_PASSED = ("NBGRADER_EXECUTION", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SOURCE_DATE_EPOCH")
# Never given to a kernel, whatever the sandbox: the course's secret (bngrade.course).
ENV_WITHHELD = (SECRET_ENV,)
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


def _withheld(env: Any) -> dict[str, str]:
    """``env`` without the variables no kernel may see (ENV_WITHHELD)."""
    return {key: value for key, value in env.items() if key not in ENV_WITHHELD}


# Arguments of every graded kernel: no input history (a database write per cell).
KERNEL_ARGUMENTS = ("--HistoryManager.enabled=False",)

_mode_cache: dict[str, tuple[str, str]] = {}
_broken_zygotes: set[tuple[Any, ...]] = set()
_warned: set[str] = set()


def _python_installation() -> list[Path]:
    """The folders a kernel of this Python needs to read: the interpreter, the standard
    library, the virtual environment and the bncore package (which may be an editable install
    inside the course directory)."""
    import bncore

    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(Path(sys.executable).resolve().parent)
    paths.add(Path(bncore.__file__).resolve().parent)
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


def _close_zygote(parent: Any) -> None:
    parent.close()
    shutil.rmtree(parent.base, ignore_errors=True)


def limit_arguments(*, memory: int, cpu: int, file_size: int, open_files: int,
                    processes: int | None) -> list[str]:
    """``prlimit`` arguments: soft and hard limits alike, so the kernel cannot raise them."""
    args = [f"--as={memory}", f"--cpu={cpu}", f"--fsize={file_size}",
            f"--nofile={open_files}", "--core=0"]
    if processes is not None:
        args.append(f"--nproc={processes}")
    return args


REFUSED_MODULE = (
    "raise ModuleNotFoundError(__name__ + ' cannot be imported while this notebook is graded: '"
    " 'the answers must be your own code', name=__name__)\n")


def module_paths(names: Iterable[str]) -> list[Path]:
    """Where the modules ``names`` live in this Python: a module's file, a package's folder.
    Modules that are not installed are left out."""
    import importlib.util

    found = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not Path(spec.origin).exists():
            continue
        origin = Path(spec.origin).resolve()
        found.append(origin.parent if origin.name == "__init__.py" else origin)
    return found


def bwrap_view(*, hidden: list[Path], scratch_size: int) -> list[str]:
    """The start of a bubblewrap command line: the whole system read-only, ``hidden`` files
    and folders out of sight (an empty tmpfs, ``/dev/null``), and the Python installation shown
    again where it lies under a hidden folder."""
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
    return args


def bwrap_isolation(env: dict[str, str]) -> list[str]:
    """The namespaces of a sandbox (no network, its own processes) and its whole environment."""
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "grading", "--die-with-parent", "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def bwrap_arguments(*, cwd: Path, rundir: Path, hidden: list[Path], scratch_size: int,
                    uid: int, env: dict[str, str], hide_files: tuple[str, ...] = (),
                    refused: Sequence[Path] = (), stub: Path | None = None) -> list[str]:
    """The bubblewrap command line (without the command it runs) for a kernel working in
    ``cwd``: see the module's docstring. ``hide_files``: names in ``cwd`` the kernel must not
    see (the notebook being graded). ``refused``: module files and package folders replaced
    by ``stub``, a module that refuses to load."""
    args = bwrap_view(hidden=hidden, scratch_size=scratch_size)
    for path in refused if stub is not None else ():
        if path.is_dir():
            args += ["--tmpfs", str(path), "--ro-bind", str(stub), str(path / "__init__.py")]
        elif path.is_file():
            args += ["--ro-bind", str(stub), str(path)]
    # The submission's folder: a small writable tmpfs showing its files read-only.
    args += ["--perms", "1777", "--size", str(scratch_size), "--tmpfs", str(cwd)]
    for entry in sorted(cwd.iterdir()) if cwd.is_dir() else []:
        if entry.name in hide_files or entry.is_symlink():
            continue
        args += ["--ro-bind", str(entry), str(entry)]
    args += ["--bind", str(rundir), str(rundir), "--chdir", str(cwd)]
    args += bwrap_isolation(env)
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
    refused_modules = List(Unicode(), help="modules the kernel may not import (set per "
                           "notebook by GradingExecute from bncore.runner.blocked_modules)"
                           ).tag(config=True)

    warm = Bool(True, help="with bwrap, fork each kernel from a warm, sandboxed parent "
                "(bngrade.zygote) that imported the kernel's libraries once, when the notebook's "
                "folder is under course_root; else start every kernel afresh").tag(config=True)
    course_root = Unicode("", help="the course folder, whose submissions the warm parent "
                          "shows its kernels (set by GradingExecute)").tag(config=True)
    preload = List(Unicode(), help="more modules the warm parent imports once for all its "
                   "kernels (the course's heavy libraries, e.g. scipy.stats); never a module "
                   "a notebook may be refused").tag(config=True)

    _rundir: Path | None = None
    _spawn: dict[str, Any] | None = None
    mode: str = "off"
    #: One warm parent per course and sandbox, for this process's kernels.
    _zygotes: ClassVar[dict[tuple[Any, ...], Any]] = {}

    async def _async_pre_start_kernel(self, **kw: Any) -> tuple[list[str], dict[str, Any]]:
        mode, why = sandbox_mode(self.sandbox)
        self.mode = mode
        self._spawn = None
        if why and why not in _warned:
            _warned.add(why)
            level = self.log.info if mode == "off" and self.sandbox == "off" else self.log.warning
            level("Grading sandbox: %s; %s.", mode, why)
        if mode == "off":
            cmd, kw = await super()._async_pre_start_kernel(**kw)
            kw["env"] = _withheld(kw.get("env", os.environ))
            return cmd, kw
        cwd = Path(kw.get("cwd") or os.getcwd()).resolve()
        hidden = [Path(p) for p in SYSTEM_HIDDEN] + [Path(p) for p in self.hidden_paths]
        zygote = self._zygote(cwd, hidden) if mode == "bwrap" else None
        self._rundir = Path(tempfile.mkdtemp(
            prefix="bncore-kernel-", dir=zygote.base if zygote is not None else None))
        uid = 1_000_000 + secrets.randbelow(1_000_000)
        if mode == "bwrap":
            # Unix sockets cross the network namespace that TCP cannot.
            self.transport = "ipc"
            self.ip = str(self._rundir / "ipc")
            self.connection_file = str(self._rundir / "kernel.json")
            os.chown(self._rundir, uid, uid)
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        if cmd and Path(cmd[0]).name.startswith("python"):
            cmd = [cmd[0], "-I", *cmd[1:], *KERNEL_ARGUMENTS]  # -I: no shadowing .py files
        kw["cwd"] = str(cwd)
        env = self._kernel_env(kw.get("env", os.environ))
        limits = self._limits()
        # The kernel's own output (not the cells'): a capped log, not the grader's terminal,
        # which a submission could otherwise flood through file descriptors 1 and 2.
        kw["stdout"] = subprocess.DEVNULL
        kw["stderr"] = open(self._rundir / "kernel.log", "wb")  # noqa: SIM115 (Popen's)
        if mode == "rlimits":
            cmd = ["prlimit", *limit_arguments(**limits), "--", *cmd]
            kw["env"] = _withheld({**kw.get("env", os.environ), **env})
            return cmd, kw
        os.chown(self.connection_file, uid, uid)
        refused = module_paths(self.refused_modules)
        stub = self._rundir / "refused.py"
        stub.write_text(REFUSED_MODULE)
        stub.chmod(0o644)
        sandbox = bwrap_arguments(cwd=cwd, rundir=self._rundir, hidden=hidden,
                                  scratch_size=self.scratch_size, uid=uid, env=env,
                                  hide_files=tuple(self.hidden_files), refused=refused, stub=stub)
        if zygote is not None and cmd[1:4] == ["-I", "-m", "ipykernel_launcher"]:
            self._spawn = {
                "zygote": zygote, "rundir": str(self._rundir), "uid": uid, "env": env,
                "folder": str(cwd.relative_to(zygote.course_root)),
                "hide_files": list(self.hidden_files), "limits": limits,
                "refused": [str(p) for p in refused], "scratch_size": self.scratch_size,
                "arguments": cmd[4:]}
        kw["env"] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        return ["prlimit", *limit_arguments(**limits), "--", *sandbox, *cmd], kw

    def _kernel_env(self, grader_env: Any) -> dict[str, str]:
        """A sandboxed kernel's whole environment: a few of the grader's variables, one thread
        for the numerical libraries, and private, empty configuration folders (in the kernel's
        own /tmp under bubblewrap, else in its connection folder)."""
        private = Path("/tmp") if self.mode == "bwrap" else self._rundir
        assert private is not None
        env = {key: value for key, value in grader_env.items() if key in ENV_PASSED}
        env.update(ENV_GRADING)
        if self.mode == "bwrap":
            env["JPY_PARENT_PID"] = "1"  # bwrap's init: no parent poller, no console banner
        env.update(HOME=str(private), TMPDIR="/tmp", IPYTHONDIR=str(private / ".ipython"),
                   MPLCONFIGDIR=str(private / ".matplotlib"),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin",
                                         "/usr/bin", "/bin"]))
        return env

    def _limits(self) -> dict[str, Any]:
        """The kernel's resource limits; the process limit only where the kernel has a user
        of its own (bubblewrap), since RLIMIT_NPROC counts every process of the user."""
        return {"memory": self.memory_limit, "cpu": self.cpu_limit,
                "file_size": self.file_size_limit, "open_files": self.open_files_limit,
                "processes": self.process_limit if self.mode == "bwrap" else None}

    def _zygote(self, cwd: Path, hidden: list[Path]) -> Any:
        """The warm parent for a kernel working in ``cwd``, started on first use; None where
        kernels start afresh (warm off, a folder outside the course, a parent that failed)."""
        from bngrade import zygote as warm

        root = Path(self.course_root).resolve() if self.course_root else None
        if not self.warm or root is None or root not in cwd.parents:
            return None
        key = (root, tuple(hidden), self.scratch_size, tuple(self.preload))
        parent = self._zygotes.get(key)
        if parent is not None and parent.alive:
            return parent
        if parent is not None:
            self.log.warning("Grading sandbox: the warm kernel parent stopped; starting another.")
        if key in _broken_zygotes:
            return None
        base = Path(tempfile.mkdtemp(prefix="bngrade-zygote-"))
        view = [*bwrap_view(hidden=hidden, scratch_size=self.scratch_size),
                *bwrap_isolation(self._kernel_env(os.environ))]
        try:
            parent = warm.Zygote(root, base, view, REFUSED_MODULE, preload=self.preload)
        except (OSError, warm.ZygoteError) as error:
            _broken_zygotes.add(key)
            self.log.warning("Grading sandbox: kernels start afresh (no warm parent: %s).", error)
            shutil.rmtree(base, ignore_errors=True)
            return None
        self._zygotes[key] = parent
        atexit.register(_close_zygote, parent)
        return parent

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        spawn, self._spawn = self._spawn, None
        try:
            if spawn is not None:
                from bngrade.zygote import ZygoteError

                zygote = spawn.pop("zygote")
                try:
                    process = zygote.spawn(spawn)
                except ZygoteError as error:
                    self.log.warning("Grading sandbox: the warm kernel parent failed (%s); "
                                     "this kernel starts afresh.", error)
                else:
                    assert self.provisioner is not None
                    self.provisioner.process = process  # type: ignore[attr-defined]
                    self.provisioner.pid = process.pid  # type: ignore[attr-defined]
                    self.provisioner.pgid = None  # type: ignore[attr-defined]
                    self._reconcile_connection_info(self.provisioner.connection_info)
                    return
            await super()._async_launch_kernel(kernel_cmd, **kw)
        finally:
            if hasattr(kw.get("stderr"), "close"):
                kw["stderr"].close()  # the kernel has its own copy

    async def interrupt_kernel(self) -> None:  # type: ignore[override]
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
        if self._rundir is None:
            return ""
        try:
            return (self._rundir / "kernel.log").read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if self._rundir is not None and not restart:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    async def cleanup_resources(  # type: ignore[override]
            self, restart: bool = False) -> None:
        await self._async_cleanup_resources(restart=restart)


# --- python -m bngrade.sandbox check ------------------------------------------------------------


def check(course_root: Path | None = None) -> int:
    """Say which sandbox this machine gives, start a sandboxed kernel and show what it can
    reach: the course directory, its own connection folder, a bncore reference module, and a
    listener that this check opens on 127.0.0.1 (the kernel's own loopback, in the sandbox, is
    another one). Returns 0 when the kernel ran. Connects nowhere but 127.0.0.1."""
    import socket

    from jupyter_core.utils import run_sync

    from bngrade.zygote import ZygoteProcess

    mode, why = sandbox_mode("auto")
    print(f"sandbox: {mode}" + (f" ({why})" if why else ""))
    root = Path(course_root or Path.cwd()).resolve()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bngrade-check-") as scratch:
        folder = Path(scratch) / "submission"  # a course of its own, for the warm parent
        folder.mkdir()
        Path(scratch).chmod(0o755)
        km = SandboxedKernelManager(kernel_name="python3")
        km.hidden_paths = [str(root)]
        km.course_root = scratch
        km.refused_modules = ["bncore.numpy"]
        start = time.perf_counter()
        run_sync(km.start_kernel)(cwd=str(folder))
        warm = isinstance(km.provisioner.process,  # type: ignore[union-attr]
                          ZygoteProcess)
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            km.lock_rundir()
            started = time.perf_counter() - start
            reply = kc.execute_interactive(
                _PROBE.format(root=str(root), rundir=str(km._rundir), port=port),
                timeout=60, output_hook=_print_stream)
        finally:
            kc.stop_channels()
            run_sync(km.shutdown_kernel)(now=True)
            listener.close()
    print(f"kernel start: {started:.2f} s" + (" (forked from the warm parent, which started "
                                               "first)" if warm else " (started afresh)"))
    return 0 if reply["content"]["status"] == "ok" else 1


_PROBE = """\
import os, socket
print('user id', os.getuid(), '; working directory', os.getcwd())
print('course directory visible:', os.path.exists(os.path.join({root!r}, 'solutions')))
print('connection folder writable:', os.access({rundir!r}, os.W_OK))
try:
    import bncore.numpy
    print('bncore.numpy importable: True')
except ImportError:
    print('bncore.numpy importable: False')
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()
    print("network: reachable (the grader's listener on 127.0.0.1:{port} answered)")
except OSError as error:
    print("network: unreachable (the grader's listener on 127.0.0.1:{port}:", error, ")")
"""


def _print_stream(msg: dict[str, Any]) -> None:
    if msg["msg_type"] == "stream":
        print("  " + msg["content"]["text"].rstrip().replace("\n", "\n  "))
    elif msg["msg_type"] == "error":
        print(f"  {msg['content']['ename']}: {msg['content']['evalue']}")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bngrade.sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check"])
    parser.parse_args(argv)
    return check()


if __name__ == "__main__":
    sys.exit(main())
