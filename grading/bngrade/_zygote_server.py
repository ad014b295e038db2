"""The warm end of :mod:`bngrade.zygote`, run inside a bubblewrap sandbox as
``python -I -c <this file's text> SOURCE HOLD STUB PRELOAD...``.

It imports what every kernel imports (``PRELOAD``), once, and then answers one request per line
on stdin, one JSON reply per line on stdout. ``spawn`` forks a kernel: the child gets a mount,
network and IPC namespace of its own, a fresh ``/tmp`` and ``/dev/shm``, a private working
folder showing the submission's files read-only, the refused modules replaced, resource
limits, and an unprivileged user of its own without capabilities; then it becomes an IPython
kernel. ``poll``, ``signal`` and ``kill`` act on a kernel; once a kernel is reaped (by
``poll`` or ``kill``), every process left by its user is ended too. This file imports nothing
of the course's and is never imported: the sandbox shows the Python installation only.
"""

import ctypes
import errno
import importlib
import json
import os
import resource
import signal
import sys
import traceback
from typing import Any

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
WORKDIR = "/run/notebook"
LIMITS = {"memory": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
          "file_size": resource.RLIMIT_FSIZE, "open_files": resource.RLIMIT_NOFILE,
          "processes": resource.RLIMIT_NPROC}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _encoded(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(libc.mount(_encoded(source), _encoded(target), _encoded(fstype), flags,
                      _encoded(data)), f"mount {target}")


def bind(source: str, target: str, readonly: bool = True) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def tmpfs(target: str, size: int, mode: str = "1777") -> None:
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={size}")


def placeholder(source: str, target: str) -> None:
    """An empty file or folder at ``target`` to bind ``source`` onto."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()


def private_filesystem(spec: dict[str, Any], source_root: str, hold: str, stub: str) -> None:
    """The child's own view: see the module's docstring."""
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    rundir = spec["rundir"]
    bind(rundir, hold, readonly=False)          # carried across the fresh /tmp
    for scratch in ("/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            tmpfs(scratch, spec["scratch_size"])
    os.makedirs(rundir, mode=0o755, exist_ok=True)
    mount(hold, rundir, None, MS_MOVE)
    tmpfs(WORKDIR, spec["scratch_size"])
    folder = os.path.join(source_root, spec["folder"])
    for name in sorted(os.listdir(folder)):
        entry = os.path.join(folder, name)
        if name in spec["hide_files"] or os.path.islink(entry):
            continue
        placeholder(entry, os.path.join(WORKDIR, name))
        bind(entry, os.path.join(WORKDIR, name))
    for path in spec["refused"]:
        if os.path.isdir(path):
            tmpfs(path, 65536, mode="0755")
            with open(stub) as source, open(os.path.join(path, "__init__.py"), "w") as init:
                init.write(source.read())
            mount(None, path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        elif os.path.isfile(path):
            bind(stub, path)
    _check(libc.umount2(os.fsencode(source_root), MNT_DETACH), "umount the course")


def drop_privileges(uid: int, limits: dict[str, int | None]) -> None:
    for name, value in limits.items():
        if value is not None:
            resource.setrlimit(LIMITS[name], (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def become_kernel(spec: dict[str, Any], source_root: str, hold: str, stub: str) -> None:
    """In the forked child: sandbox this process, then run the kernel until it exits."""
    code = 1
    try:
        os.setsid()
        log = os.open(os.path.join(spec["rundir"], "kernel.log"),
                      os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log, 2)
        os.closerange(3, 1 << 16)
        private_filesystem(spec, source_root, hold, stub)
        os.chdir(WORKDIR)
        drop_privileges(spec["uid"], spec["limits"])
        os.environ.clear()
        os.environ.update(spec["env"])
        sys.argv = ["ipykernel_launcher", *spec["arguments"]]
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def kill_user(uid: int) -> None:
    """SIGKILL to every process of ``uid`` (what the kernel left behind)."""
    if uid < 1000:
        return
    helper = os.fork()
    if helper == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def serve(source_root: str, hold: str, stub: str, preload: list[str]) -> None:
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # a missing optional library only makes its kernels slower
            pass
    returncodes: dict[int, int] = {}
    cpu: dict[int, float] = {}  # the CPU seconds each kernel used, once it is gone
    users: dict[int, int] = {}  # kernel's pid -> its user, until both are gone

    def reap(pid: int, block: bool = False) -> int | None:
        if pid not in returncodes:
            try:
                done, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status, usage = pid, -1, None
            if done == 0:
                return None
            returncodes[pid] = os.waitstatus_to_exitcode(status) if status != -1 else -1
            cpu[pid] = usage.ru_utime + usage.ru_stime if usage else 0.0
        if pid in users:
            kill_user(users.pop(pid))
        return returncodes[pid]

    reply: dict[str, Any] = {"ready": True}
    while True:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        op, pid = request.get("op"), request.get("pid")
        try:
            if op == "spawn":
                spec = request["spec"]
                child = os.fork()
                if child == 0:
                    become_kernel(spec, source_root, hold, stub)
                users[child] = spec["uid"]
                reply = {"pid": child}
            elif op == "poll":
                reply = {"returncode": reap(pid), "cpu": cpu.get(pid)}
            elif op == "signal":
                if reap(pid) is None:
                    os.kill(pid, request["signal"])
                reply = {}
            elif op == "kill":
                if reap(pid) is None:
                    os.kill(pid, signal.SIGKILL)
                reply = {"returncode": reap(pid, block=True), "cpu": cpu.get(pid)}
            else:
                reply = {"error": f"unknown request {op!r}"}
        except OSError as error:
            if error.errno == errno.ESRCH:
                reply = {"returncode": reap(pid)}
            else:
                reply = {"error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
