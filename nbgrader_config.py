"""nbgrader configuration of the course. Run every nbgrader command from the repository root.

    solutions/<assignment>/   instructor notebooks: solutions and hidden tests (nbgrader's source)
    exercises/<assignment>/   the student release, generated: make exercises
    submitted/, autograded/, feedback/, gradebook.db, grades.csv   grading work (git-ignored)

An instructor's round: put submissions in submitted/<student>/<assignment>/, then
`nbgrader autograde <assignment>`, `nbgrader generate_feedback <assignment>` and
`nbgrader export` (grades.csv). A student checks a notebook with `nbgrader validate <notebook>`.
"""

import os
import sys

from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import GetGrades

from bncore.grading import HideHiddenTests

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

# nbgrader's gradebook runs `alembic` by name; find it next to this Python even when the
# virtual environment is not activated (`.venv/bin/nbgrader autograde ...`).
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

# The course root is this file's folder, wherever nbgrader is started from.
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
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

# Feedback must not reveal the hidden tests. nbgrader's default feedback shows the autograded
# notebook as it is, hidden tests included; HideHiddenTests removes the hidden test code and
# cuts the tracebacks of cells that hold hidden tests down to the exception's message.
c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]

# No nbgrader command here starts a Jupyter server. The formgrader runs inside Jupyter, which
# reads jupyter_server_config.py, not this file: to run it as root (as CI does), start it with
# `jupyter lab --allow-root`.
