"""The course directory as nbgrader sees it: its assignments, its configuration, its nbgrader.

Every instructor command runs from the course root, the folder that holds
``nbgrader_config.py`` (the repository's root, or a copy of the course on a grading machine).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any


def assignments(root: Path | str = ".") -> list[str]:
    """The course's assignments: the folders under solutions/ that hold a notebook."""
    source = Path(root) / "solutions"
    return sorted(
        folder.name
        for folder in source.iterdir()
        if folder.is_dir() and not folder.name.startswith(".") and any(folder.glob("*.ipynb"))
    ) if source.is_dir() else []


def nbgrader_command() -> list[str]:
    """The nbgrader command of this Python environment."""
    script = Path(sys.executable).with_name("nbgrader")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nbgrader"]


def course_directory(root: Path | str = ".") -> Any:
    """nbgrader's CourseDirectory, configured by ``root``/nbgrader_config.py."""
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    root = Path(root).resolve()
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    coursedir = CourseDirectory(config=config)
    if "root" not in config.get("CourseDirectory", {}):
        coursedir.root = str(root)
    return coursedir


#: The environment variable that carries the course's secret to the grader's checks.
SECRET_ENV = "BNGRADE_SECRET"


def course_secret(root: Path | str = ".") -> str:
    """The course's secret (``<root>/.grading/secret``, made once at random): it seeds the
    hidden tests' inputs (``bngrade.asserts.hidden_rng``). Keep it out of the repository (the
    course's .gitignore does) and out of the students' kernels (the sandbox does)."""
    path = Path(root) / ".grading" / "secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()
