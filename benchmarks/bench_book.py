"""The book's build time: a clean strict build with every page executed, and cached rebuilds.

    .venv/bin/python benchmarks/bench_book.py              # clean build, two rebuilds, per page
    .venv/bin/python benchmarks/bench_book.py --cells 3    # ... and the slowest cells of the
                                                           #     3 slowest pages (re-executed)

Measured in one run, into a temporary --path-output (the repository's own _build/ is left
alone), with the strict options of ``make book`` (``-W -n --keep-going``) and the local
``cache`` execution mode (CI is removed from the environment):

1. ``clean``: an empty path-output, so an empty execution cache: every page is executed;
2. ``rebuild``: the same command again on the same path-output: nothing changed, so Sphinx
   reads nothing and nothing is executed;
3. ``fresh html``: a new path-output holding only a copy of the first build's
   ``_build/.jupyter_cache``: every page is read and written again, with its outputs taken from
   the cache (what tests/test_book.py's cache test does).

Printed: the time of each build (wall clock, and the CPU time of the build and its kernels: on
a shared machine the wall clock includes other people's work), how many pages each executed,
the ratios, the budget (a clean build in under 3 minutes on two cores), and the execution time
of every page from the jupyter-cache records. ``--cells K`` then runs the K slowest pages once
more, cell by cell, and lists their slowest cells. The first build's log is kept at
``<path-output>/build.log`` (``--keep`` keeps the whole path-output), so that
``BN_BUILT_BOOK=<path-output>/_build/html pytest tests/test_book.py`` can check that build.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 180


def build(out: Path, log: Path) -> tuple[float, float, list[str]]:
    """Wall and CPU seconds of a strict build into ``out``, and the pages it executed."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI would execute every page
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", "-W", "-n",
           "--keep-going", "--path-output", str(out), "."]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = log.read_text(errors="replace")
    if done.returncode:
        tail = "\n".join(text.splitlines()[-40:])
        sys.exit(f"the build failed (exit {done.returncode}); end of {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, re.findall(r"^(\S+): Executing notebook", text, re.M)


def page_times(cache_path: Path) -> list[tuple[float, str]]:
    """(seconds, page) for every page in a jupyter-cache, slowest first."""
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_path))
    uris = {record.pk: record.uri for record in cache.list_project_records()}
    hashes = {record.hashkey: record for record in cache.list_cache_records()}
    times = []
    for pk, uri in uris.items():
        record = cache.get_cached_project_nb(pk)
        if record is None:
            record = next((r for r in hashes.values() if r.uri == uri), None)
        if record is not None:
            seconds = (record.data or {}).get("execution_seconds")
            if seconds is not None:
                times.append((float(seconds), str(Path(uri).resolve().relative_to(ROOT))))
    return sorted(times, reverse=True)


def execution_workers() -> int:
    """How many pages the build executes at a time (bn_execution_workers in _config.yml,
    book/_ext/bn_execute.py's default 2 where it is not set)."""
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    workers = config.get("sphinx", {}).get("config", {}).get("bn_execution_workers", 2)
    return max(int(workers), 1)


def slowest_cells(page: str, top: int = 5) -> list[tuple[float, str]]:
    """Run one page cell by cell in its folder; its slowest cells with their first line."""
    import jupytext
    from nbclient import NotebookClient

    path = ROOT / page
    nb = jupytext.read(path)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    cells = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            start = time.perf_counter()
            client.execute_cell(cell, index)
            first = next((line for line in cell.source.splitlines()
                          if line.strip() and not line.startswith(("#", ":"))), "")
            cells.append((time.perf_counter() - start, f"cell {index}: {first[:70]}"))
    return sorted(cells, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=0, metavar="K",
                        help="list the slowest cells of the K slowest pages (runs them again)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary path-output")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-book-"))
    clean, fresh = work / "clean", work / "fresh"
    try:
        load0 = os.getloadavg()
        print(f"Building the book into {clean} (empty cache: every page executes) ...",
              flush=True)
        rows = [("clean", *build(clean, clean / "build.log"))]
        print("Rebuilding in place (nothing changed) ...", flush=True)
        rows.append(("rebuild", *build(clean, work / "rebuild.log")))
        print("Building fresh html from a copy of the execution cache ...", flush=True)
        shutil.copytree(clean / "_build" / ".jupyter_cache", fresh / "_build" / ".jupyter_cache")
        rows.append(("fresh html, warm cache", *build(fresh, work / "fresh.log")))
        load1 = os.getloadavg()

        pages = page_times(clean / "_build" / ".jupyter_cache")
        executed_total = sum(s for s, _ in pages)
        print(f"\nBook build: {len(pages)} executed pages; load average {load0[0]:.1f} at the "
              f"start, {load1[0]:.1f} at the end, {os.cpu_count()} cores")
        print(f"{'build':<24}{'wall s':>8}{'CPU s':>8}{'executed':>10}{'clean / this':>14}")
        for name, wall, cpu, ran in rows:
            print(f"{name:<24}{wall:>8.1f}{cpu:>8.1f}{len(ran):>10}{rows[0][1] / wall:>13.1f}x")
        clean_wall, workers = rows[0][1], execution_workers()
        print(f"\nClean build: {clean_wall:.0f} s against a budget of {BUDGET_SECONDS} s "
              f"({clean_wall / BUDGET_SECONDS:.2f} of it): "
              f"{'met' if clean_wall < BUDGET_SECONDS else 'missed'}. The pages' executions "
              f"add up to {executed_total:.0f} s; run {workers} at a time, about "
              f"{executed_total / workers:.0f} s of the build "
              f"({executed_total / workers / clean_wall:.0%}).")
        if rows[1][3] or rows[2][3]:
            print(f"WARNING: a rebuild executed pages: {rows[1][3] + rows[2][3]}")

        print(f"\n{'page':<50}{'execution s':>12}{'share':>8}")
        for seconds, page in pages:
            print(f"{page:<50}{seconds:>12.1f}{seconds / executed_total:>8.0%}")

        for _, page in pages[:args.cells]:
            print(f"\nSlowest cells of {page} (run again, cell by cell):", flush=True)
            for seconds, what in slowest_cells(page):
                print(f"  {seconds:6.1f} s  {what}")
    finally:
        if args.keep:
            print(f"\nkept {work} (BN_BUILT_BOOK={clean / '_build' / 'html'})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
