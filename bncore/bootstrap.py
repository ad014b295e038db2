"""The first code cell of every notebook the course hands out: it installs bncore when missing.

A student may open a graded notebook or a reading page's ``.ipynb`` anywhere: a clone of the
course, a single download, Colab, Binder, a course hub. The cell checks whether this Python
has bncore at the course's version (or newer); if not, it says so in one line and installs the
wheel published with the book, ``<site>/wheels/bncore-<version>-py3-none-any.whl``. Otherwise
it does nothing. Reading pages that need PyTorch also install its CPU build when torch is
missing, and say so. ``BNCORE_SITE`` in the environment replaces the site's address (a course
hub's mirror, the tests' local server).

``python -m bngrade release`` writes this cell into the graded notebooks; the book's build
writes it into the reading pages' notebooks.
"""

from __future__ import annotations

from importlib import metadata

#: Where the book is published; the wheel lies under <SITE>/wheels/.
SITE = "https://bn-course.github.io/batchnorm-course"
#: The CPU build of PyTorch, for pages that need torch where it is missing.
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
TAG = "bncore-bootstrap"

_CELL = '''\
# Set-up: installs the course's package bncore {version} when this Python lacks it (as in
# Colab, or after a single download); otherwise it does nothing.
import importlib.metadata
import os
import subprocess
import sys

BNCORE_VERSION = "{version}"
SITE = os.environ.get("BNCORE_SITE", "{site}")


def version_tuple(text):
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


try:
    installed = importlib.metadata.version("bncore")
except importlib.metadata.PackageNotFoundError:
    installed = None
if installed is None or version_tuple(installed) < version_tuple(BNCORE_VERSION):
    print(f"Installing bncore {{BNCORE_VERSION}} from {{SITE}} ...", flush=True)
    wheel = f"{{SITE}}/wheels/bncore-{{BNCORE_VERSION}}-py3-none-any.whl"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", wheel], check=True)
    import importlib
    import site

    site.addsitedir(site.getusersitepackages())  # where pip puts it if Python is read-only
    importlib.invalidate_caches()
    if "bncore" in sys.modules:
        print("An older bncore was already imported: restart the kernel, then run again.")
'''

_TORCH = '''
try:
    import torch
except ImportError:
    print("This page needs PyTorch: installing its CPU build (about 200 MB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "torch",
                    "--index-url", "{index}"], check=True)
'''


def version() -> str:
    """The installed bncore's version (the course's version when installed from the repo)."""
    return metadata.version("bncore")


def cell_source(*, torch: bool = False, bncore_version: str | None = None,
                site: str = SITE) -> str:
    """The source of the set-up cell; with ``torch``, PyTorch's CPU build is installed too."""
    source = _CELL.format(version=bncore_version or version(), site=site.rstrip("/"))
    if torch:
        source += _TORCH.format(index=TORCH_INDEX)
    return source


def wheel_name(bncore_version: str | None = None) -> str:
    return f"bncore-{bncore_version or version()}-py3-none-any.whl"
