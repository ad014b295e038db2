"""book/_ext/bn_execute.py: the notebook pages are executed in a pool of processes into
myst-nb's execution cache before Sphinx reads them, and myst-nb then uses those executions.

Each test builds a small book of its own (strict, as `make book` builds the real one) whose
pages sleep and write down when they ran, so that the tests can see what ran where and when.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.course import ROOT

SLEEP = 3.0   # seconds each page sleeps: two pages run one after the other take twice that

pytestmark = pytest.mark.slow

PAGE = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# Page {name}

```{{code-cell}} ipython3
import time
from pathlib import Path

start = time.time()
time.sleep({sleep})
Path("ran-{name}.txt").open("a").write(f"{{start}} {{time.time()}}\\n")
{extra}print("page {name} ran")
```
"""


def write_book(folder: Path, pages: dict[str, str]) -> Path:
    """A book of notebook pages {name: extra code}, with the book's execution settings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_config.yml").write_text(textwrap.dedent(f"""\
        title: Execution test
        only_build_toc_files: true
        execute:
          execute_notebooks: cache
          timeout: 60
          allow_errors: false
          raise_on_error: true
        sphinx:
          local_extensions:
            bn_execute: {ROOT / "book" / "_ext"}
        """))
    names = list(pages)
    (folder / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        + "".join(f"  - file: {name}\n" for name in names))
    (folder / "intro.md").write_text("# Intro\n\nA book of notebook pages.\n")
    for name, extra in pages.items():
        (folder / f"{name}.md").write_text(PAGE.format(name=name, sleep=SLEEP, extra=extra))
    return folder


def build(book: Path, env: dict | None = None) -> tuple[int, str]:
    """A strict build of ``book``: (exit status, log)."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    done = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", "-W",
                           "-n", "--keep-going", str(book)],
                          env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


def runs(book: Path, name: str) -> list[tuple[float, float]]:
    """(start, end) of every execution of page ``name``."""
    path = book / f"ran-{name}.txt"
    if not path.is_file():
        return []
    return [tuple(map(float, line.split())) for line in path.read_text().splitlines()]


def executed_by_pool(log: str) -> list[str]:
    return sorted(Path(p).stem for p in re.findall(r"^(\S+): Executing notebook in a pool",
                                                   log, re.M))


def executed_by_myst_nb(log: str) -> list[str]:
    return sorted(Path(p).stem for p in re.findall(r"^(\S+): Executing notebook using", log,
                                                   re.M))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A book of two pages, built once from an empty cache without CI: (book, log)."""
    book = write_book(tmp_path_factory.mktemp("pool") / "book", {"a": "", "b": ""})
    status, log = build(book, {"CI": None})
    assert status == 0, log[-3000:]
    return book, log


def test_pages_run_in_parallel_before_reading_and_myst_nb_uses_them(built):
    book, log = built
    assert executed_by_pool(log) == ["a", "b"]
    assert executed_by_myst_nb(log) == []          # myst-nb found both in the cache
    assert len(re.findall(r"Using cached notebook", log)) == 2
    (a_start, a_end), (b_start, b_end) = runs(book, "a") + runs(book, "b")
    assert a_start < b_end and b_start < a_end, "the two pages did not run at the same time"
    for name in ("a", "b"):   # the page shows the output of its one execution
        assert f"page {name} ran" in (book / "_build" / "html" / f"{name}.html").read_text()


def test_a_rebuild_executes_nothing_and_ci_executes_every_page_again(built, tmp_path):
    book, _ = built
    status, log = build(book, {"CI": None})
    assert status == 0 and executed_by_pool(log) == [] and executed_by_myst_nb(log) == []
    for built_part in (book / "_build").iterdir():   # all but the cache: every page is read
        if built_part.name != ".jupyter_cache":
            built_part.rename(tmp_path / built_part.name)
    status, log = build(book, {"CI": "true"})
    assert status == 0, log[-3000:]
    assert executed_by_pool(log) == ["a", "b"] and executed_by_myst_nb(log) == []
    assert len(runs(book, "a")) == len(runs(book, "b")) == 2


def test_a_failing_cell_fails_the_strict_build_with_its_traceback(tmp_path):
    book = write_book(tmp_path / "book", {
        "good": "", "bad": 'raise ValueError("the bad page fails here")\n'})
    status, log = build(book, {"CI": None})
    assert status != 0
    assert "ValueError: the bad page fails here" in log   # the traceback is in the log
    assert executed_by_pool(log) == ["bad", "good"]
    # the failing page is executed again while it is read (and reported there), not cached
    assert executed_by_myst_nb(log) == ["bad"]
    assert len(runs(book, "good")) == 1 and len(runs(book, "bad")) == 2


def test_on_ci_a_page_that_now_fails_fails_though_an_older_run_is_cached(tmp_path):
    # The cache's key is the page's code only; on CI a page that fails now (here: because of
    # the environment, as a change to bncore would make it) must not pass with an old result.
    book = write_book(tmp_path / "book", {
        "a": "", "b": 'import os\nif os.environ.get("BN_TEST_FAIL"):\n'
                      '    raise ValueError("b fails now")\n'})
    status, log = build(book, {"CI": None})
    assert status == 0, log[-3000:]
    for built_part in (book / "_build").iterdir():
        if built_part.name != ".jupyter_cache":
            built_part.rename(tmp_path / built_part.name)
    status, log = build(book, {"CI": "true", "BN_TEST_FAIL": "1"})
    assert status != 0 and "ValueError: b fails now" in log
    assert executed_by_myst_nb(log) == ["b"]

