"""What the grading tests share: the course's root, its assignments, a scratch copy of the
course released with nbgrader, and nbgrader commands run as an instructor types them."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat

from bncore.runner import BEGIN_HIDDEN, END_HIDDEN
from bngrade.course import assignments, nbgrader_command

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = assignments(ROOT)
COURSE_ID = "batchnorm-course"


def nbgrader(*args, cwd, check=True) -> str:
    """Run ``nbgrader ARGS`` in ``cwd``; its output (stdout and stderr)."""
    start = time.perf_counter()
    done = subprocess.run([*nbgrader_command(), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    print(f"nbgrader {args[0]}: {time.perf_counter() - start:.1f} s")
    return done.stdout + done.stderr


def released_course(course: Path, names=None, config_extra: str = "") -> Path:
    """A scratch copy of the course (its nbgrader_config.py and solutions/), released with
    ``nbgrader generate_assignment``, so that its gradebook knows the assignments."""
    course.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    if config_extra:
        with (course / "nbgrader_config.py").open("a") as handle:
            handle.write("\n" + config_extra + "\n")
    for name in names or ASSIGNMENTS:
        shutil.copytree(ROOT / "solutions" / name, course / "solutions" / name)
    nbgrader("generate_assignment", "*" if not names or len(names) > 1 else names[0],
             "--force", "--log-level=ERROR", cwd=course)
    return course


def notebooks(course: Path, assignment: str):
    """The release and the solution of an assignment in a released course."""
    name = f"{assignment}.ipynb"
    return (nbformat.read(course / "exercises" / assignment / name, as_version=4),
            nbformat.read(course / "solutions" / assignment / name, as_version=4))


def submit(course: Path, student: str, assignment: str, notebook, name=None) -> Path:
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{assignment}.ipynb")
    nbformat.write(notebook, path)
    return path


def hidden_lines(solution, release) -> set[str]:
    """Lines of hidden test code that appear nowhere in the release, and so must never appear
    in feedback. String-literal lines are left out: a test's message is meant to be shown."""
    shown = "\n".join(cell.source for cell in release.cells)
    found = set()
    for cell in solution.cells:
        inside = False
        for line in cell.source.split("\n"):
            if BEGIN_HIDDEN in line:
                inside = True
            elif END_HIDDEN in line:
                inside = False
            elif inside:
                text = line.strip()
                literal = re.match(r"^[rbf]*['\"]", text)
                if len(text) >= 12 and not literal and text not in shown:
                    found.add(text)
    return found


def visible_text(page: str) -> str:
    """The text of an HTML page, tags removed (syntax highlighting splits code into spans)."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page))
