"""Warm kernels: a sandboxed process that imports the kernel's libraries once and forks a
fresh kernel for every notebook.

Starting a Python kernel costs about 0.4 CPU seconds, most of it importing ipykernel, IPython
and NumPy: at a thousand notebooks, more than the notebooks' own code. A :class:`Zygote` is
started once per grading worker, in a bubblewrap sandbox built like a kernel's (the system
read-only, the course and the home folders hidden, no network), with the capabilities to build
each kernel's own sandbox and nothing of the course in memory. For every notebook it forks a
child (``bngrade._zygote_server``) that, before it runs a line of the student's code:

* gets its own mount, network and IPC namespaces: a fresh ``/tmp`` and ``/dev/shm``, a private
  working folder (``/run/notebook``) showing the submission's files read-only over a small
  writable layer, and the course's refused modules replaced by a module that refuses to load;
* loses the way back to the course folder (detached from its view), every capability, and
  root: it runs as an unprivileged user of its own, with ``no_new_privs`` and the kernel's
  resource limits;
* and when its notebook is done, every process of that user is killed.

So each notebook still gets a kernel that never ran another student's code, in a sandbox of its
own; what the kernels share is the memory of the imports, copy-on-write. Nothing the zygote
imports may be a module the notebook is refused (the course's reference): it imports ``PRELOAD``
and the libraries of ``SandboxedKernelManager.preload`` only. :class:`ZygoteProcess` is the
grader's handle on one kernel, with the methods of the ``subprocess.Popen`` that jupyter_client
expects.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What every graded kernel imports: the kernel itself, and NumPy (``SandboxedKernelManager.
#: preload`` adds a course's own).
PRELOAD = ("numpy", "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell",
           "ipykernel.debugger",
           "IPython.core.interactiveshell", "IPython.core.completer", "jupyter_client.session",
           "zmq.asyncio", "tornado.ioloop", "sqlite3")
#: Where the zygote sees the course folder (read-only), to show a kernel its submission's files.
SOURCE = "/run/bngrade-course"
#: Where a child holds its connection folder while it replaces /tmp.
HOLD = "/run/bngrade-hold"
#: The module that refuses to load, as the kernels see it.
STUB = "/run/bngrade-refused.py"
#: The capabilities the zygote keeps to build its children's sandboxes (never the children).
CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL",
                "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_FOWNER")


class ZygoteError(RuntimeError):
    """The zygote could not start or answer."""


class Zygote:
    """One warm, sandboxed parent of kernels for the notebooks under ``course_root``, with its
    kernels' connection folders under ``base``. ``view``: the start of a bubblewrap command
    line (:func:`bngrade.sandbox.bwrap_view` and :func:`bngrade.sandbox.bwrap_isolation`)
    that hides what a kernel may not see."""

    def __init__(self, course_root: Path, base: Path, view: list[str], stub_text: str,
                 preload: Sequence[str] = ()) -> None:
        self.course_root = Path(course_root)
        self.base = Path(base)
        server = Path(__file__).with_name("_zygote_server.py").read_text()
        stub = self.base / "refused.py"
        stub.write_text(stub_text)
        stub.chmod(0o644)
        # The mount points and the stub live in the zygote's private /run.
        setup = ["--ro-bind", str(self.course_root), SOURCE, "--dir", HOLD,
                 "--dir", "/run/notebook", "--ro-bind", str(stub), STUB,
                 "--bind", str(self.base), str(self.base)]
        caps = [arg for cap in CAPABILITIES for arg in ("--cap-add", cap)]
        command = [*view, *setup, *caps, "--",
                   sys.executable, "-I", "-c", server, SOURCE, HOLD, STUB, *PRELOAD, *preload]
        self._lock = threading.Lock()
        self._log = open(self.base / "zygote.log", "wb")  # noqa: SIM115 (the process's)
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self._read()  # {"ready": true} once the imports are done

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            log = (self.base / "zygote.log").read_bytes()[-1500:].decode(errors="replace")
            raise ZygoteError(f"the warm kernel parent stopped: {log.strip()}")
        return json.loads(line)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError) as error:
                raise ZygoteError(f"the warm kernel parent is gone: {error}") from error
            reply = self._read()
        if "error" in reply:
            raise ZygoteError(reply["error"])
        return reply

    def spawn(self, spec: dict[str, Any]) -> ZygoteProcess:
        """A kernel: ``spec`` says its connection folder, the folder of its notebook (relative
        to the course), the files there to hide, its user, limits, environment, refused module
        paths and the kernel's command-line arguments."""
        return ZygoteProcess(self, self.request("spawn", spec=spec)["pid"])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class ZygoteProcess:
    """The grader's handle on a kernel that a :class:`Zygote` forked: ``subprocess.Popen``'s
    ``poll``, ``wait``, ``send_signal``, ``terminate`` and ``kill``. Its ``pid`` is the
    kernel's in the sandbox's process namespace; signals go through the zygote."""

    stdin = stdout = stderr = None

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None
        self.cpu_seconds: float | None = None  # the kernel's CPU time, once it is gone

    def _ask(self, op: str) -> None:
        try:
            reply = self.zygote.request(op, pid=self.pid)
        except ZygoteError:
            self.returncode = -signal.SIGKILL  # the zygote took its kernels with it
            return
        self.returncode, self.cpu_seconds = reply["returncode"], reply.get("cpu")

    def poll(self) -> int | None:
        if self.returncode is None:
            self._ask("poll")
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("kernel", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.kill()
        elif self.returncode is None:
            self.zygote.request("signal", pid=self.pid, signal=int(signum))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the kernel and whatever it started, and wait for them."""
        if self.returncode is None:
            self._ask("kill")
