"""nbgrader configuration of the course. Run every nbgrader command from the repository root.

    solutions/<assignment>/   instructor notebooks: solutions and hidden tests (nbgrader's source)
    exercises/<assignment>/   the student release, generated: make exercises
    submitted/, autograded/, feedback/, gradebook.db, grades.csv   grading work (git-ignored)

An instructor's round (book/instructors.md): put submissions in submitted/<student>/<assignment>/,
then `python -m bngrade.autograde <assignment>` (or `nbgrader autograde <assignment>`),
`nbgrader generate_feedback <assignment>` and `nbgrader export` (grades.csv). A student checks
a notebook with `python -m bncore.check <notebook>`.

Autograding runs students' code: their cells run in the sandbox of bngrade/sandbox.py (limits,
bubblewrap where available, the course's reference modules refused), the test cells run in the
grader's own process (bngrade/execute.py), and the feedback hides the hidden tests
(bngrade.feedback.HideHiddenTests).
"""

import os
import sys

from nbconvert.preprocessors import ClearMetadataPreprocessor, CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (
    AssignLatePenalties,
    CheckCellMetadata,
    ClearOutput,
    DeduplicateIds,
    GetGrades,
    IgnorePattern,
    LimitOutput,
    OverwriteCells,
    OverwriteKernelspec,
    SaveAutoGrades,
)

from bngrade.course import SECRET_ENV, course_secret
from bngrade.execute import GradingExecute
from bngrade.feedback import HideHiddenTests
from bngrade.report import StoreGradingReport
from bngrade.sanitize import SanitizeSubmission

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

# nbgrader's gradebook runs `alembic` by name; find it next to this Python even when the
# virtual environment is not activated (`.venv/bin/nbgrader autograde ...`).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

# The course root is this file's folder, wherever nbgrader is started from.
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
# The hidden tests draw their inputs with this course's secret (.grading/secret, made once),
# so the published solutions do not give them away. The students' kernels never see it.
os.environ.setdefault(SECRET_ENV, course_secret(c.CourseDirectory.root))
c.CourseDirectory.course_id = "batchnorm-course"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.submitted_directory = "submitted"
c.CourseDirectory.autograded_directory = "autograded"
c.CourseDirectory.feedback_directory = "feedback"
# The gradebook is <root>/gradebook.db (nbgrader's default db_url), ignored by git.

# Students need not be added to the gradebook first: autograde creates them (the default in
# nbgrader 0.9, stated here because the round-trip test relies on it).
c.Autograde.create_student = True

# Seconds per cell when autograding or validating; a graded notebook runs in seconds in total.
c.Execute.timeout = 60

# Autograding runs untrusted code. nbgrader's own steps, with three of ours (bngrade/):
# SanitizeSubmission repairs tampered nbgrader metadata and puts deleted locked cells back;
# GradingExecute runs the student's cells in the sandbox and the test cells in this process,
# caps outputs, and survives dying and hanging kernels; StoreGradingReport keeps its record in
# the autograded notebook (bngrade.report.grading_problems reads it).
c.Autograde.sanitize_preprocessors = [
    ClearOutput, SanitizeSubmission, DeduplicateIds, OverwriteKernelspec, OverwriteCells,
    CheckCellMetadata,
]
c.Autograde.autograde_preprocessors = [
    GradingExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput, StoreGradingReport,
    SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
]
# The kernel's limits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE) and the sandbox:
# "auto" uses bubblewrap when it is installed and nbgrader runs as root, else limits only.
c.SandboxedKernelManager.sandbox = "auto"
c.SandboxedKernelManager.memory_limit = 2 * 2**30
c.SandboxedKernelManager.cpu_limit = 600
c.SandboxedKernelManager.process_limit = 64
c.SandboxedKernelManager.file_size_limit = 64 * 2**20
# With bubblewrap, kernels are forked from a warm parent that has imported the kernel's
# libraries once (bngrade/zygote.py); these heavy ones too (chapter 2's notebook uses SciPy).
c.SandboxedKernelManager.preload = ["scipy.stats"]
# What one cell may print into the autograded notebook (bytes); the rest is dropped.
c.GradingExecute.max_output_bytes = 2**20
# Log what looks wrong in each submission (wrong file name, suspicious code) before grading it.
c.Autograde.pre_convert_hook = "bngrade.scan.report_submission_problems"

# `nbgrader zip_collect <assignment>` files a learning platform's download into submitted/.
# This pattern reads Canvas's names, <name>_[LATE_]<user id>_<submission id>_<file>[-<n>].ipynb
# (e.g. doejane_LATE_1001_5001_ch3-forward-backward-1.ipynb: student 1001); the student id is
# the platform's user id. Adapt it to your platform (book/instructors.md).
c.FileNameCollectorPlugin.named_regexp = (
    r".*/[^/]*?_(?:LATE_)?(?P<student_id>\d+)_\d+_(?P<file_id>[^/]+?)(?:-\d+)?\.ipynb$"
)

# Feedback must not reveal the hidden tests. nbgrader's default feedback shows the autograded
# notebook as it is, hidden tests included; HideHiddenTests removes the hidden test code and
# cuts the tracebacks of cells that hold hidden tests down to the exception's message.
c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]

# No nbgrader command here starts a Jupyter server. The formgrader runs inside Jupyter, which
# reads jupyter_server_config.py, not this file: to run it as root (as CI does), start it with
# `jupyter lab --allow-root`.
