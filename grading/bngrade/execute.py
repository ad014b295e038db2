"""Running a submission when it is autograded: the Execute preprocessor of
``nbgrader_config.py``.

:class:`GradingExecute` is nbgrader's ``Execute``, run as the course's self-check runs a
notebook (``bncore.runner``): every cell but the tests in the student's kernel, which is a
:class:`bngrade.sandbox.SandboxedKernelManager` kernel that cannot import the course's reference
modules; the test cells, hidden tests included, in the grader's process, reaching the kernel
only through ``nb``. The student's code therefore never sees the hidden tests, the reference or
the expected values, and nothing it does to its own process changes a test's verdict. It also
caps what a kernel cell may print, turns a kernel that dies or a cell that cannot be
interrupted into a clear error in that cell (zero for the test cells after it) instead of
failing the whole submission, and records what happened (``metadata.bncore.grading``).
"""

from __future__ import annotations

import json
from typing import Any

import nbformat
from nbgrader.preprocessors import Execute
from traitlets import Integer

from bncore.runner import RunsTestsOutsideKernel, blocked_modules
from bngrade.sandbox import MiB, SandboxedKernelManager


class GradingExecute(RunsTestsOutsideKernel, Execute):
    """nbgrader's Execute, for untrusted notebooks (see the module docstring)."""

    run_hidden_tests = True
    max_output_bytes = Integer(
        1 * MiB, help="text and data a cell may output before the rest is dropped; the "
                      "gradebook and the feedback stay small").tag(config=True)

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("kernel_manager_class", SandboxedKernelManager)
        super().__init__(**kw)

    def create_kernel_manager(self) -> Any:
        km = super().create_kernel_manager()
        if isinstance(km, SandboxedKernelManager):
            from nbgrader.coursedir import CourseDirectory

            coursedir = CourseDirectory(config=self.config)
            hidden = [coursedir.root]
            if coursedir.db_url.startswith("sqlite:///"):
                hidden.append(coursedir.db_url[len("sqlite:///"):])
            km.hidden_paths = [*km.hidden_paths, *hidden]
            km.course_root = km.course_root or str(coursedir.root)
            notebook = self.resources.get("nbgrader", {}).get("notebook")
            if notebook:
                km.hidden_files = [*km.hidden_files, f"{notebook}.ipynb"]
            km.refused_modules = blocked_modules(self.nb)
        return km

    def output(self, outs: list, msg: dict, display_id: str | None, cell_index: int
               ) -> Any:
        """Keep at most ``max_output_bytes`` of what a kernel cell prints."""
        content = msg.get("content", {})
        text = content.get("text")
        size = len(text) if isinstance(text, str) else len(
            json.dumps(content.get("data", content), default=str))
        used = self._output_used.get(cell_index, 0)
        self._output_used[cell_index] = used + size
        if used + size <= self.max_output_bytes:
            return super().output(outs, msg, display_id, cell_index)
        if used <= self.max_output_bytes:  # the first message over the limit
            outs.append(nbformat.v4.new_output(
                "stream", name="stdout",
                text=f"\n[output truncated by the grader: this cell printed more than "
                     f"{self.max_output_bytes // 1024} KiB]\n"))
            self._truncated.append(cell_index)
        return None

    def preprocess(self, nb: Any, resources: Any = None, km: Any = None) -> tuple[Any, Any]:
        from nbclient.client import NotebookClient

        NotebookClient.__init__(self, nb, km)
        self.reset_execution_trackers()
        self._check_assign_resources(resources)
        self._output_used: dict[int, int] = {}
        self._truncated: list[int] = []
        with self.setup_kernel():
            assert self.kc is not None
            info = self.wait_for_reply(self.kc.kernel_info())
            self.nb.metadata["language_info"] = info["content"]["language_info"]
            if isinstance(self.km, SandboxedKernelManager):
                self.km.lock_rundir()  # the kernel answered: its sockets are bound
            kernel = getattr(self.km.provisioner, "process", None)
            report = self.run_cells()
        report["output_truncated"] = [f"cell {i}" for i in self._truncated]
        # Where the time went (a warm kernel reports its CPU time when it is gone).
        report["kernel_cpu_seconds"] = getattr(kernel, "cpu_seconds", None)
        self.set_widgets_metadata()
        if self.resources is not None:
            self.resources.setdefault("bncore", {})["grading"] = report
        return self.nb, self.resources
