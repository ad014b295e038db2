"""Fixtures shared by the test files, and the markers and time limits set by file or kind."""

import os

import numpy as np
import pytest

# The hidden tests draw their inputs with the course's secret (bngrade.asserts.hidden_rng). The
# tests fix it, so that every run grades the same inputs; test_grading.py grades the model
# solutions under other secrets too.
os.environ["BNGRADE_SECRET"] = "the test suite's secret"  # bngrade.course.SECRET_ENV

# pytest-timeout's limit for a test marked slow (a book build, a class autograded), in seconds;
# every other test has the `timeout` of pyproject.toml. An explicit
# @pytest.mark.timeout(seconds) on a test wins over both.
SLOW_TIMEOUT = 1200


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture
def rng():
    """A seeded NumPy generator: a test sees the same numbers on every run."""
    return np.random.default_rng(20240521)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session, strict, every page executed: its html dir.

    Runs test_book.build_book (`jupyter-book build -W -n --keep-going`) into a temporary
    --path-output, then book/_ext/check_offline.py on the result. The build starts from an
    empty execution cache, so every notebook page is executed (test_book.py reads the build
    log, build.log beside _build/, to check it). It runs in the local `cache` mode: the cache
    test in test_book.py then rebuilds from this build's cache instead of executing the book
    twice more. Set BN_BUILT_BOOK=<path to _build/html> to test an existing build instead
    (for working on the tests; CI never sets it).
    """
    import subprocess
    import sys
    from pathlib import Path

    from tests.course import ROOT
    from tests.test_book import build_book

    if os.environ.get("BN_BUILT_BOOK"):
        html = Path(os.environ["BN_BUILT_BOOK"]).resolve()
        assert (html / "index.html").is_file(), f"BN_BUILT_BOOK={html} holds no built book"
        return html
    out = tmp_path_factory.mktemp("book")
    seconds = build_book(out, out / "build.log")
    (out / "build.seconds").write_text(f"{seconds:.1f}")
    html = out / "_build" / "html"
    check = subprocess.run([sys.executable, "book/_ext/check_offline.py", str(html)], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, f"check_offline.py found problems:\n{check.stderr}"
    return html
