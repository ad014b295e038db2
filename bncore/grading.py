"""Helpers for the graded notebooks' hidden tests.

The hidden tests compute the expected values with bncore, then call the student's function
inside :func:`reference_forbidden`, so that an answer which merely calls bncore's own
implementation (directly, through an alias, or through a copy of the module object) fails.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
# The implementation modules an answer must not call while it is being graded.
REFERENCE_FILES = frozenset(str(_PACKAGE_DIR / name) for name in ("numpy.py", "torch.py"))


class ReferenceCalled(AssertionError):
    """Raised when graded code calls bncore's reference implementation."""


@contextlib.contextmanager
def reference_forbidden(what: str = "your answer"):
    """Fail if any function defined in bncore.numpy or bncore.torch runs inside the block.

    >>> with reference_forbidden("batchnorm_forward"):
    ...     out = batchnorm_forward(x, gamma, beta)
    """
    called: list[str] = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in REFERENCE_FILES:
            called.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.setprofile(previous)
    if called:
        raise ReferenceCalled(
            f"{what} calls bncore's reference implementation ({called[0]}); "
            "write the computation yourself with NumPy."
        )
