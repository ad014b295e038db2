"""Warm kernels (bngrade.zygote): each notebook's kernel is forked from one sandboxed parent,
and must be as isolated from the kernels before it as a kernel started afresh."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from jupyter_core.utils import run_sync

from bngrade.sandbox import SandboxedKernelManager, sandbox_mode
from bngrade.zygote import ZygoteProcess

# nbgrader, notebook kernels or the grading sandbox: left out of `make test-fast`.
pytestmark = pytest.mark.grading

if sandbox_mode("auto")[0] != "bwrap":
    pytest.skip(f"warm kernels need bubblewrap: {sandbox_mode('auto')[1]}",
                allow_module_level=True)


@pytest.fixture
def course(request):
    """A course folder (world-readable, like a real one) with two students' submissions."""
    root = Path(tempfile.mkdtemp(prefix="bngrade-warm-"))
    root.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    for student in ("alice", "bob"):
        folder = root / "autograded" / student / "a1"
        folder.mkdir(parents=True)
        (folder / "a1.ipynb").write_text("{}")
        (folder / f"{student}.txt").write_text(f"{student}'s data file")
    (root / "gradebook.db").write_text("grades")
    return root


def run_in_kernel(course: Path, student: str, code: str, **traits) -> tuple[dict, object]:
    """Run ``code`` in a sandboxed kernel for ``student``'s notebook; return the JSON it
    printed last and the kernel's process handle."""
    km = SandboxedKernelManager(kernel_name="python3")
    km.hidden_paths = [str(course)]
    km.course_root = str(course)
    km.hidden_files = ["a1.ipynb"]
    km.refused_modules = ["bncore.numpy"]
    for name, value in traits.items():
        setattr(km, name, value)
    run_sync(km.start_kernel)(cwd=str(course / "autograded" / student / "a1"))
    process = km.provisioner.process
    kc = km.blocking_client()
    kc.start_channels()
    out: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)
        km.lock_rundir()
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: out.append(
            msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        run_sync(km.shutdown_kernel)(now=True)
    return json.loads("".join(out).strip().splitlines()[-1]), process


LEAVE_TRACES = """
import json, os, subprocess
open('/tmp/left-in-tmp', 'w').write('x')
open('/dev/shm/left-in-shm', 'w').write('x')
open('left-in-folder', 'w').write('x')
sleeper = subprocess.Popen(['sleep', '600'])
print(json.dumps({'uid': os.getuid(), 'sleeper': sleeper.pid}))
"""

LOOK_AROUND = """
import json, os, resource, socket
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
users = {}
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        users[pid] = os.stat('/proc/' + pid).st_uid
    except OSError:
        pass
try:
    import bncore.numpy
    refused = False
except ImportError:
    refused = True
try:
    socket.create_connection(('127.0.0.1', PORT), timeout=2).close()
    reached = True
except OSError:
    reached = False
try:
    os.kill(PARENT, 9)
    killed_parent = True
except OSError:
    killed_parent = False
print(json.dumps({
    'uid': os.getuid(), 'cwd': os.listdir('.'), 'tmp': os.listdir('/tmp'),
    'shm': os.listdir('/dev/shm'), 'course': os.path.exists(COURSE),
    'staged': [os.listdir(p) for p in ('/run/bngrade-course',) if os.path.isdir(p)],
    'process_users': sorted(set(users.values())), 'cap_eff': status['CapEff'].strip(),
    'no_new_privs': status['NoNewPrivs'].strip(),
    'memory': resource.getrlimit(resource.RLIMIT_AS)[0],
    'processes': resource.getrlimit(resource.RLIMIT_NPROC)[0],
    'refused': refused, 'reached': reached, 'killed_parent': killed_parent}))
"""


def test_a_warm_kernel_sees_nothing_of_the_kernel_before_it(course):
    """The second notebook's kernel comes from the same warm parent as the first, and finds
    none of what the first left: files in /tmp, /dev/shm or its folder, running processes; it
    has another user, no capabilities, the limits, and no way to the course or the network."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    first, first_process = run_in_kernel(course, "alice", LEAVE_TRACES)
    look = (LOOK_AROUND.replace("PORT", str(listener.getsockname()[1]))
            .replace("COURSE", repr(str(course))).replace("PARENT", "2"))
    second, second_process = run_in_kernel(course, "bob", look, memory_limit=2**30)
    listener.close()
    assert isinstance(first_process, ZygoteProcess) and isinstance(second_process, ZygoteProcess)
    assert first_process.zygote is second_process.zygote  # one warm parent for both
    assert second["uid"] != first["uid"] and second["uid"] >= 1_000_000
    assert second["cwd"] == ["bob.txt"]  # its own files, without the notebook or alice's
    assert "left-in-tmp" not in second["tmp"] and "left-in-shm" not in second["shm"]
    assert first["uid"] not in second["process_users"]  # alice's sleeper was killed
    assert second["course"] is False and second["staged"] in ([], [[]])
    assert int(second["cap_eff"], 16) == 0 and second["no_new_privs"] == "1"
    assert second["memory"] == 2**30 and second["processes"] == 64
    assert second["refused"] and not second["reached"] and not second["killed_parent"]


def test_kernels_start_afresh_where_the_warm_parent_cannot_serve(course, tmp_path):
    """Outside the course folder, or with ``warm`` off, a kernel starts afresh: the same
    sandbox, a plain process."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    km = SandboxedKernelManager(kernel_name="python3")
    km.course_root = str(course)
    run_sync(km.start_kernel)(cwd=str(outside))
    try:
        assert not isinstance(km.provisioner.process, ZygoteProcess)
    finally:
        run_sync(km.shutdown_kernel)(now=True)
    result, process = run_in_kernel(course, "alice", "import json, os; print(json.dumps("
                                    "{'uid': os.getuid()}))", warm=False)
    assert not isinstance(process, ZygoteProcess) and result["uid"] >= 1_000_000


def test_a_dead_warm_parent_is_replaced(course):
    """If the warm parent dies (killed between two notebooks), the next kernel gets a new one."""
    code = "import json, os; print(json.dumps({'uid': os.getuid()}))"
    _, first = run_in_kernel(course, "alice", code)
    first.zygote.process.kill()
    first.zygote.process.wait()
    result, second = run_in_kernel(course, "bob", code)
    assert isinstance(second, ZygoteProcess) and second.zygote is not first.zygote
    assert result["uid"] >= 1_000_000


def test_a_kernel_that_dies_is_reported_dead(course):
    """A kernel that ends itself (os._exit) is seen as dead by the grader at once."""
    km = SandboxedKernelManager(kernel_name="python3")
    km.hidden_paths = [str(course)]
    km.course_root = str(course)
    run_sync(km.start_kernel)(cwd=str(course / "autograded" / "alice" / "a1"))
    kc = km.blocking_client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert run_sync(km.is_alive)()
        kc.execute("import os; os._exit(3)")
        process = km.provisioner.process
        assert isinstance(process, ZygoteProcess)
        assert process.wait(timeout=30) == 3
        assert not run_sync(km.is_alive)()
    finally:
        kc.stop_channels()
        run_sync(km.shutdown_kernel)(now=True)
    assert os.path.exists(process.zygote.base)  # the parent lives on for the next notebook
