"""Execute the book's notebook pages in parallel, into myst-nb's execution cache.

Sphinx reads the pages one after the other, and myst-nb executes each notebook page while it
is read: one kernel at a time, although the pages are independent. Jupyter Book's command has
no ``-j``, and ``sphinx_multitoc_numbering`` keeps Sphinx from reading in parallel anyway.
So this extension runs before the reading starts (``env-before-read-docs``, which lists the
pages Sphinx is about to read) and executes those pages in a pool of
``bn_execution_workers`` processes (2 by default: the book's pages are written for two cores)
straight into myst-nb's jupyter-cache (``_build/.jupyter_cache``). When myst-nb then reads a
page in its ``cache`` mode, it finds the executed notebook there and executes nothing.

For the cache to match, a page is executed as exactly the notebook myst-nb will look up: it is
read with myst-nb's own reader (``create_nb_reader``) from the text Sphinx reads, with
myst-nb's kernel aliases and the page's own execution settings applied; it is executed, and
stored, as myst-nb's cache mode does (``single_nb_execution`` in the page's folder, or in a
temporary one with ``execution_in_temp``, then ``cache_notebook_bundle``). The log says
``<page>: Executing notebook`` and ``Executed notebook in ... seconds`` for each page, as
myst-nb does.

- **Which pages.** Locally, the pages whose notebook is not in the cache yet (a page re-runs
  when its code changes). With the environment variable ``CI`` set, every page Sphinx reads,
  cached or not: a fresh execution of the whole book, as myst-nb's ``force`` mode gave before
  (the cache's key is the notebook's code only, so a change to bncore alone would not
  invalidate it). A page that myst-nb would not execute from the cache (another execution
  mode in its metadata, or one of ``nb_execution_excludepatterns``) is left to myst-nb.
- **A failing page** is not cached (and, on CI, any earlier copy of it in the cache is
  removed): myst-nb finds no executed notebook, executes the page once more while reading it
  and reports the error with its traceback as usual, so that a strict build fails exactly as
  it would without the pool. Only a failing page runs twice.
- ``bn_execution_workers = 0`` switches the pool off: myst-nb executes each page while reading
  it (with ``CI`` set, in its ``force`` mode).
"""

from __future__ import annotations

import os
import re
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from tempfile import TemporaryDirectory
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: The colour codes in an IPython traceback, left out of the one line the log quotes.
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Page:
    """A notebook page to execute: the notebook as myst-nb reads it, and how to run it."""

    docname: str
    path: Path
    notebook: Any  # nbformat.NotebookNode
    timeout: int | None
    allow_errors: bool
    in_temp: bool  # executed in a temporary folder, not the page's own
    read_fmt: dict | None


def fresh_execution() -> bool:
    """Whether every page is executed, cached or not (on CI)."""
    return bool(os.environ.get("CI"))


def execution_mode(app: Sphinx, config: Config) -> None:
    """Without the pool, CI executes every page afresh in myst-nb's ``force`` mode; with it,
    myst-nb stays in ``cache`` mode and the pool executes every page (see the module)."""
    if fresh_execution() and config.bn_execution_workers < 1:
        config.nb_execution_mode = "force"


def notebook_page(env: BuildEnvironment, docname: str) -> Page | None:
    """The page as myst-nb's parser will see it (myst_nb.sphinx_.Parser.parse), or None when
    it is no notebook or myst-nb would not execute it from the cache."""
    from myst_nb.core.nb_to_tokens import nb_node_to_dict
    from myst_nb.core.read import create_nb_reader
    from sphinx.io import SphinxFileInput

    path = Path(env.doc2path(docname))
    text = SphinxFileInput(source_path=str(path), encoding=env.config.source_encoding).read()
    nb_config = env.mystnb_config
    reader = create_nb_reader(str(path), env.myst_config, nb_config, text)
    if reader is None:
        return None
    notebook = reader.read(text)
    kernel = notebook.metadata.get("kernelspec", {}).get("name")
    if kernel is not None:
        for pattern, alias in (nb_config.kernel_rgx_aliases or {}).items():
            if re.fullmatch(pattern, kernel):
                notebook.metadata["kernelspec"]["name"] = alias
                break
    if nb_config.metadata_key in notebook.metadata:
        overrides = nb_node_to_dict(notebook.metadata[nb_config.metadata_key])
        overrides.pop("output_folder", None)
        with suppress(Exception):  # myst-nb warns about bad overrides when it reads the page
            nb_config = nb_config.copy(**overrides)
    if nb_config.execution_mode != "cache" or any(
            PurePosixPath(path.as_posix()).match(p)
            for p in nb_config.execution_excludepatterns):
        return None
    return Page(docname, path, notebook, nb_config.execution_timeout,
                nb_config.execution_allow_errors, nb_config.execution_in_temp, reader.read_fmt)


def execute(page: Page) -> tuple[Any, float, str | None]:
    """In a worker process: execute the page's notebook as myst-nb's cache mode does, in the
    page's folder (or a temporary one). Returns (the executed notebook, seconds, the traceback
    as text or None)."""
    from jupyter_cache.executors.utils import single_nb_execution

    with (TemporaryDirectory() if page.in_temp else nullcontext(str(page.path.parent))) as cwd:
        result = single_nb_execution(page.notebook, cwd=os.path.abspath(cwd),
                                     timeout=page.timeout, allow_errors=page.allow_errors,
                                     meta_override=True)
    return result.nb, result.time, result.exc_string if result.err is not None else None


def store(cache: Any, page: Page, notebook: Any, seconds: float) -> None:
    """Put an executed page into the cache, as myst-nb's NotebookClientCache does."""
    from jupyter_cache.base import CacheBundleIn

    if page.read_fmt is not None:
        record = cache.add_nb_to_project(str(page.path), read_data=page.read_fmt)
    else:
        record = cache.add_nb_to_project(str(page.path))
    stored = cache.cache_notebook_bundle(
        CacheBundleIn(notebook, record.uri, data={"execution_seconds": seconds}),
        check_validity=False, overwrite=True)
    logger.info(f"Executed notebook in {seconds:.2f} seconds (cache ID={stored.pk})",
                location=page.docname)


def forget(cache: Any, page: Page, reason: str) -> None:
    """A page failed in the pool: drop any cached copy, so that myst-nb runs and reports it."""
    with suppress(KeyError):
        cache.remove_cache(cache.match_cache_notebook(page.notebook).pk)
    logger.info(f"Executing notebook failed in the pool ({reason}); it runs again while it is "
                "read, and the error is reported there", location=page.docname)


def pages_to_execute(env: BuildEnvironment, docnames: list[str], cache: Any) -> list[Page]:
    """The notebook pages among ``docnames`` to execute: all of them on CI, else those whose
    notebook is not in the cache."""
    pages = []
    for docname in docnames:
        page = notebook_page(env, docname)
        if page is None:
            continue
        if not fresh_execution():
            with suppress(KeyError):
                cache.match_cache_notebook(page.notebook)
                continue
        pages.append(page)
    return pages


def execute_in_pool(app: Sphinx, env: BuildEnvironment, docnames: list[str]) -> None:
    """``env-before-read-docs``: execute the pages Sphinx is about to read, in parallel."""
    from jupyter_cache import get_cache

    workers = app.config.bn_execution_workers
    if workers < 1 or env.mystnb_config.execution_mode != "cache":
        return
    cache = get_cache(env.mystnb_config.execution_cache_path)
    pages = pages_to_execute(env, docnames, cache)
    if not pages:
        return
    workers = min(workers, len(pages))
    logger.info(f"executing {len(pages)} notebook pages, {workers} at a time")
    # spawn, not fork: the workers start clean, not as copies of this Sphinx process
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        running: dict[Future, Page] = {}
        for page in pages:
            logger.info(f"Executing notebook in a pool of {workers} processes",
                        location=page.docname)
            running[pool.submit(execute, page)] = page
        collect(cache, running)
    except BaseException:   # an interrupted build leaves no queued page to run
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def collect(cache: Any, running: dict[Future, Page]) -> None:
    """Store each page in the cache as its execution ends, or forget it if it failed."""
    for future in as_completed(running):
        page = running[future]
        try:
            notebook, seconds, error = future.result()
        except Exception as err:  # the worker itself broke, not a cell
            forget(cache, page, "".join(traceback.format_exception_only(err)).strip())
            continue
        if error is not None:
            forget(cache, page, ANSI_COLOUR.sub("", error).strip().splitlines()[-1])
        else:
            store(cache, page, notebook, seconds)


def setup(app: Sphinx) -> dict:
    app.add_config_value("bn_execution_workers", 2, "env", types=[int])
    # Before myst-nb builds its configuration (builder-inited), which reads
    # nb_execution_mode.
    app.connect("config-inited", execution_mode, priority=400)
    app.connect("env-before-read-docs", execute_in_pool)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
