"""Fixtures shared by the test files."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded NumPy generator: a test sees the same numbers on every run."""
    return np.random.default_rng(20240521)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session, strict, every page executed: its html dir.

    Runs `jupyter-book build -W -n --keep-going` into a temporary --path-output, then
    book/_ext/check_offline.py on the result. The build starts from an empty execution cache,
    so every notebook page is executed (test_book.py reads the build log, build.log beside
    _build/, to check it). It runs in the local `cache` mode, CI removed from the environment
    (with CI set, book/_ext/bn_book.py executes in "force" mode, which fills no cache): the
    cache test in test_book.py then rebuilds from this build's cache instead of executing the
    book twice more. Set BN_BUILT_BOOK=<path to _build/html> to test an existing build instead
    (for working on the tests; CI never sets it).
    """
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bindir = Path(sys.executable).parent
    if os.environ.get("BN_BUILT_BOOK"):
        html = Path(os.environ["BN_BUILT_BOOK"]).resolve()
        assert (html / "index.html").is_file(), f"BN_BUILT_BOOK={html} holds no built book"
        return html
    out = tmp_path_factory.mktemp("book")
    log = out / "build.log"
    cmd = [str(bindir / "jupyter-book"), "build", "-W", "-n", "--keep-going",
           "--path-output", str(out), "."]
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    start = time.perf_counter()
    with log.open("w") as fh:
        build = subprocess.run(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                               timeout=3600)
    (out / "build.seconds").write_text(f"{time.perf_counter() - start:.1f}")
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    assert build.returncode == 0, (
        f"the strict book build failed (exit {build.returncode}); end of {log}:\n{tail}")
    html = out / "_build" / "html"
    check = subprocess.run([sys.executable, "book/_ext/check_offline.py", str(html)], cwd=root,
                           capture_output=True, text=True)
    assert check.returncode == 0, f"check_offline.py found problems:\n{check.stderr}"
    return html
