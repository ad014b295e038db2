"""Students' journeys: the course run as students run it, outside the developers' environment.

One fresh virtual environment outside the repository, made with the commands of the students'
page (book/students.md, the "one download" route: bncore's wheel from the site, and
JupyterLab), serves every case; the site is a local http.server on 127.0.0.1 that holds the
wheel the book's build makes (book/_ext/bn_book.py). The page's commands are read from the page
itself (the ```bash block after a ``% journey: <name>`` comment) and run with bash, as written:
only the site's address, the repository's address and a notebook's name are replaced.

For every graded notebook (every assignment under solutions/):

- the answers filled in (``bngrade.submissions.model_submission``), saved under the name a
  browser gives a second download and alone in a folder, executed top to bottom by nbclient in
  that environment's kernel: clean to the end, the self-check cell passing;
- the same notebook executed from memory in an empty folder (Colab): the self-check says it
  checks the kernel, and passes;
- the untouched release: its self-check cell raises AssertionError and the terminal check of the
  page exits 1.

Besides: a reading page's .ipynb download from the built book (the ``built_book`` fixture) runs
without myst_nb in that environment, bncore uninstalled first, so that its first cell installs
bncore for real, from the built site served on 127.0.0.1 (``BNCORE_SITE``); the environment holds
none of the instructors' or the book's tools; the clone route as written; Binder's postBuild in a
fresh environment and its environment resolved; the launch buttons and links of the built book;
the deploy step that keeps earlier wheels; JupyterLab from the students' environment in Chromium,
Run All, no nbgrader menus (screenshots under _build/journeys/, or $BN_JOURNEYS).

Timings and the environment's size are written to journeys.json in that folder.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
import yaml

from bncore import bootstrap
from bncore.runner import is_test_cell, nbgrader_meta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import bn_book  # noqa: E402  (the book's extension: it builds the wheel the site carries)

# Minutes, and notebook kernels: neither in `make test-fast`.
pytestmark = [pytest.mark.slow, pytest.mark.grading]

ASSIGNMENTS = sorted(p.name for p in (ROOT / "solutions").iterdir()
                     if (p / f"{p.name}.ipynb").is_file())
STUDENTS_PAGE = ROOT / "book" / "students.md"
REPOSITORY = "https://github.com/bn-course/batchnorm-course"
# The notebook the page's commands name.
EXAMPLE = "ch3-forward-backward"
# Distributions that belong to instructors or to the book's build, never to a student.
INSTRUCTOR_TOOLS = ("nbgrader", "sphinx", "jupyter-book", "playwright", "pytest", "ruff",
                    "bngrade")
CHROMIUM = os.environ.get("BN_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("BN_JOURNEYS", ROOT / "_build" / "journeys"))
# Variables of the developers' environment that a student's shell does not have.
FOREIGN_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "NBGRADER_EXECUTION",
               "BNCORE_SELF_CHECK", "BNCORE_SITE", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR",
               "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JPY_SESSION_NAME", "CONDA_PREFIX")


def version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^version = "([^"]+)"', text, re.M)[1]


def release(assignment: str):
    return nbformat.read(ROOT / "exercises" / assignment / f"{assignment}.ipynb", as_version=4)


def solution(assignment: str):
    return nbformat.read(ROOT / "solutions" / assignment / f"{assignment}.ipynb", as_version=4)


def model_answer(assignment: str):
    """The release with every answer (code and written) taken from the solution."""
    from bngrade.submissions import model_submission

    return model_submission(release(assignment), solution(assignment))


def count_tests(notebook) -> int:
    return sum(1 for cell in notebook.cells if is_test_cell(cell))


def renamed(assignment: str) -> str:
    """The name a browser gives a second download of the same file."""
    return f"{assignment} (1).ipynb"


# ---------------------------------------------------------------- the page's commands

def journey(name: str) -> str:
    """The bash block that follows ``% journey: <name>`` in the students' page."""
    text = STUDENTS_PAGE.read_text(encoding="utf-8")
    match = re.search(rf"^% journey: {re.escape(name)}\n```bash\n(.*?)^```", text, re.M | re.S)
    assert match, f"book/students.md has no ```bash block after '% journey: {name}'"
    return match[1]


class Journal:
    """Seconds per step and other measurements, written to journeys.json."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def record(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def journal():
    return Journal(ARTIFACTS / "journeys.json")


class Shell:
    """A student's fresh shell: their own HOME, the system's PATH, python3 = this Python's base
    interpreter, none of the developers' variables. The machine's pip settings (its package
    index and cache) are kept."""

    def __init__(self, home: Path, shims: Path):
        self.home = home
        base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
        shims.mkdir(parents=True, exist_ok=True)
        for name in ("python3", "python"):
            link = shims / name
            if not link.exists():
                link.symlink_to(base)
        self.env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        self.env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
        self.env.update(HOME=str(home), PATH=f"{shims}:/usr/local/bin:/usr/bin:/bin")
        self.env.update(GIT_AUTHOR_NAME="student", GIT_AUTHOR_EMAIL="student@example.org",
                        GIT_COMMITTER_NAME="student", GIT_COMMITTER_EMAIL="student@example.org")

    def run(self, script: str, cwd: Path, timeout: int = 900, **extra_env):
        env = {**self.env, **extra_env}
        start = time.perf_counter()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return done, time.perf_counter() - start


# ---------------------------------------------------------------- the site on 127.0.0.1

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Site:
    """A folder served on http://127.0.0.1:<free port>; ``requests`` lists the paths asked for."""

    def __init__(self, folder: Path):
        site = self

        class Handler(QuietHandler):
            def do_GET(self):
                site.requests.append(self.path)
                super().do_GET()

        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def wheel_site(tmp_path_factory):
    """The wheel the book's build publishes, at its address on a local site."""
    folder = tmp_path_factory.mktemp("site")
    wheel = bn_book.build_wheel(ROOT, folder / "wheels")
    assert wheel.name == bootstrap.wheel_name(version()), wheel.name
    site = Site(folder)
    yield site
    site.close()


@pytest.fixture(scope="session")
def student(tmp_path_factory, wheel_site, journal):
    """The students' environment, made with the page's "one download" commands:
    ~/bn-course with bncore's wheel (from the site) and JupyterLab."""
    home = tmp_path_factory.mktemp("home")
    shell = Shell(home, tmp_path_factory.mktemp("shims"))
    script = journey("download-install").replace(bootstrap.SITE, wheel_site.url)
    done, seconds = shell.run(script, cwd=home)
    assert done.returncode == 0, f"the page's install commands failed:\n{done.stderr[-3000:]}"
    journal.record("download route: create the environment and install (s)", round(seconds, 1))
    assert re.search(rf"^Successfully installed .*\bbncore-{re.escape(version())}\b",
                     done.stdout, re.M), done.stdout[-2000:]   # what the page says it ends with
    venv = home / "bn-course"
    assert f"/wheels/{bootstrap.wheel_name(version())}" in wheel_site.requests
    return shell, venv


# ---------------------------------------------------------------- running notebooks there

def kernel_manager(venv: Path):
    """A kernel manager that starts the environment's own Python as the kernel."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    python = str(venv / "bin" / "python")

    class VenvKernel(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[python, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                              display_name="student", language="python", name=kernel_name)

    return KernelManager(kernel_name="python3", kernel_spec_manager=VenvKernel())


def execute(notebook, venv: Path, shell: Shell, folder: Path, timeout: int = 600, **extra_env):
    """Run every cell top to bottom (errors recorded, not raised) in the environment's kernel,
    with ``folder`` as the working folder; returns the executed notebook and the seconds."""
    from nbclient import NotebookClient

    notebook = copy.deepcopy(notebook)
    env = {**shell.env, **extra_env}
    client = NotebookClient(notebook, km=kernel_manager(venv), timeout=timeout,
                            allow_errors=True, resources={"metadata": {"path": str(folder)}})
    start = time.perf_counter()
    client.execute(env=env, cwd=str(folder), stderr=subprocess.DEVNULL)
    return notebook, time.perf_counter() - start


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream")


def errors_of(notebook) -> list[tuple[int, str]]:
    return [(i, f"{o.ename}: {o.evalue}") for i, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.output_type == "error"]


def self_check_cell(notebook):
    cell = notebook.cells[-1]
    assert "self_check(" in cell.source, "a graded notebook ends with its self-check cell"
    return cell


# ---------------------------------------------------------------- the students' environment

def distributions(venv: Path) -> dict[str, str]:
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            check=True, env={"PATH": "/usr/bin:/bin"})
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(listed.stdout)}


def size_mb(folder: Path) -> float:
    total = sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / 1e6, 1)


def test_students_environment_holds_no_instructor_or_book_tools(student, journal):
    shell, venv = student
    config = (venv / "pyvenv.cfg").read_text()
    assert re.search(r"include-system-site-packages\s*=\s*false", config), config
    installed = distributions(venv)
    assert installed.get("bncore") == version(), installed.get("bncore")
    assert "ipykernel" in installed and "jupyterlab" in installed
    found = sorted(name for name in installed
                   if any(name == tool or name.startswith(tool + "-")
                          for tool in INSTRUCTOR_TOOLS))
    assert not found, f"the students' environment holds instructors' or book tools: {found}"
    for module in ("nbgrader", "sphinx", "jupyter_book", "playwright", "pytest", "ruff",
                   "bngrade", "myst_nb", "torch"):
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                               capture_output=True, text=True, env=shell.env, cwd=shell.home)
        assert probe.returncode != 0, f"`import {module}` works in the students' environment"
    journal.record("students' environment: size with JupyterLab (MB)", size_mb(venv))
    journal.record("students' environment: distributions", len(installed))


def test_students_jupyter_has_no_nbgrader_extensions(student):
    shell, venv = student
    for args in (["labextension", "list"], ["server", "extension", "list"]):
        listed = subprocess.run([str(venv / "bin" / "jupyter"), *args], capture_output=True,
                                text=True, env=shell.env, cwd=shell.home)
        assert listed.returncode == 0, listed.stderr
        assert "jupyterlab" in (listed.stdout + listed.stderr).lower()
        assert "nbgrader" not in (listed.stdout + listed.stderr).lower(), listed.stdout


# ---------------------------------------------------------------- the graded notebooks

def run_all_passes(assignment, answered, student, journal, folder, route: str) -> str:
    """Run All on an answered notebook in folder: no cell raises, and its self-check passes
    every check; the time is recorded for the route. Returns the self-check's report."""
    shell, venv = student
    executed, seconds = execute(answered, venv, shell, folder)
    journal.record(f"{assignment}: {route}, Run All with its self-check (s)", round(seconds, 1))
    assert not errors_of(executed), f"cells raised: {errors_of(executed)}"
    report = text_of(self_check_cell(executed))
    n = count_tests(answered)
    assert f"{n} of {n} checks passed" in report, report
    return report


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_renamed_download_runs_clean_and_passes_its_self_check(assignment, student, journal,
                                                               tmp_path):
    answered = model_answer(assignment)
    nbformat.write(answered, tmp_path / renamed(assignment))
    report = run_all_passes(assignment, answered, student, journal, tmp_path, "answered")
    assert f"Checking {renamed(assignment)}" in report, report


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_notebook_that_is_no_file_checks_the_kernel(assignment, student, journal, tmp_path):
    """As in Colab: the notebook runs from memory, and its working folder holds no file."""
    report = run_all_passes(assignment, model_answer(assignment), student, journal, tmp_path,
                            "no file")
    assert f"There is no saved {assignment} notebook in" in report, report
    assert "this checks the kernel as it is now" in report, report
    assert not list(tmp_path.iterdir()), "the notebook wrote files into its working folder"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_untouched_release_fails_its_self_check(assignment, student, tmp_path):
    shell, venv = student
    untouched = release(assignment)
    nbformat.write(untouched, tmp_path / renamed(assignment))
    executed, _ = execute(untouched, venv, shell, tmp_path)
    self_check = self_check_cell(executed)
    raised = [o.ename for o in self_check.outputs if o.output_type == "error"]
    assert raised == ["AssertionError"], (raised, text_of(self_check))
    assert f"0 of {count_tests(untouched)} checks passed" in text_of(self_check)
    command = journey("download-check").replace(f"{EXAMPLE}.ipynb",
                                                 shlex.quote(renamed(assignment)))
    done, _ = shell.run(command, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "Fix the first failure first" in done.stdout


def test_terminal_checks_pass_as_written(student, journal, tmp_path):
    """The page's terminal commands, in the notebook's folder, on the answered notebook: from
    a fresh shell (the download route), and from a hub's terminal, whose PATH starts with the
    environment's programs."""
    shell, venv = student
    answered = model_answer(EXAMPLE)
    nbformat.write(answered, tmp_path / f"{EXAMPLE}.ipynb")
    n = count_tests(answered)
    hub_path = f"{venv}/bin:{shell.env['PATH']}"
    for route, extra in (("download-check", {}), ("hub-check", {"PATH": hub_path})):
        assert f"{EXAMPLE}.ipynb" in journey(route)
        done, seconds = shell.run(journey(route), cwd=tmp_path, **extra)
        journal.record(f"{route}: terminal check of {EXAMPLE} (s)", round(seconds, 1))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{n} of {n} checks passed" in done.stdout, done.stdout


# ---------------------------------------------------------------- a reading page's download

def page_imports(notebook) -> list[str]:
    from bncore.runner import imported_modules

    return imported_modules(c.source for c in notebook.cells if c.cell_type == "code")


def needs_torch_in(venv: Path, modules: list[str]) -> bool:
    """The oracle: whether importing the modules fails for want of torch, in an environment
    that has bncore and no torch."""
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except ModuleNotFoundError as error:\n"
             "        if (error.name or '').split('.')[0] == 'torch':\n"
             "            sys.exit(3)\n"
             "    except ImportError:\n"
             "        pass\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert done.returncode in (0, 3), done.stderr
    return done.returncode == 3


def reading_pages() -> list[str]:
    """The book's notebook pages, from _toc.yml."""
    from tests.test_book import NOTEBOOKS

    assert NOTEBOOKS, "the book has no notebook pages"
    return NOTEBOOKS


def test_every_reading_download_starts_with_the_bootstrap_cell(built_book, student):
    _, venv = student
    published = sorted((built_book / "wheels").glob("bncore-*.whl"))
    assert [w.name for w in published] == [bootstrap.wheel_name(version())]
    for doc in reading_pages():
        download = nbformat.read(built_book / "_sources" / f"{doc}.ipynb", as_version=4)
        first, rest = download.cells[0], download.cells[1:]
        assert bootstrap.TAG in first.metadata.get("tags", []), f"{doc}: no set-up cell first"
        assert not any(bootstrap.TAG in c.metadata.get("tags", []) for c in rest), doc
        executed = nbformat.read(built_book.parent / "jupyter_execute" / f"{doc}.ipynb",
                                 as_version=4)
        assert [c.source for c in rest] == [c.source for c in executed.cells], (
            f"{doc}: the download is not the executed page after its set-up cell")
        torch = needs_torch_in(venv, page_imports(executed))
        assert first.source == bootstrap.cell_source(torch=torch, bncore_version=version()), (
            f"{doc}: the set-up cell should {'' if torch else 'not '}install torch")
        nbformat.validate(download)


def test_reading_page_download_runs_without_myst_nb(built_book, student, journal, tmp_path):
    """The download of a page that needs no torch (torch comes from PyTorch's own index, which
    the tests cannot reach), in the students' environment with bncore removed: its first cell
    installs bncore from the site, and the page runs top to bottom without myst_nb."""
    shell, venv = student
    pages = [doc for doc in reading_pages()
             if "torch" not in nbformat.read(built_book / "_sources" / f"{doc}.ipynb",
                                             as_version=4).cells[0].source]
    assert pages, "every reading page needs torch: none can be run here"
    doc = pages[0]
    site = Site(built_book)
    python = str(venv / "bin" / "python")
    try:
        subprocess.run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "bncore"],
                       check=True, env=shell.env, capture_output=True)
        assert "bncore" not in distributions(venv) and "myst-nb" not in distributions(venv)
        download = nbformat.read(built_book / "_sources" / f"{doc}.ipynb", as_version=4)
        executed, seconds = execute(download, venv, shell, tmp_path, BNCORE_SITE=site.url)
        journal.record(f"reading page {doc}: download, install bncore, Run All (s)",
                       round(seconds, 1))
    finally:
        if "bncore" not in distributions(venv):   # leave the environment as it was
            subprocess.run([python, "-m", "pip", "install", "--quiet",
                            f"{site.url}/wheels/{bootstrap.wheel_name(version())}"],
                           env=shell.env, capture_output=True)
        site.close()
    installing = f"Installing bncore {version()} from {site.url} ..."
    assert text_of(executed.cells[0]).startswith(installing), text_of(executed.cells[0])
    assert f"/wheels/{bootstrap.wheel_name(version())}" in site.requests
    assert not errors_of(executed), f"{doc} raised: {errors_of(executed)}"
    assert distributions(venv).get("bncore") == version()
    assert "myst-nb" not in distributions(venv)


# ---------------------------------------------------------------- launch buttons and links

def soup(path: Path):
    from bs4 import BeautifulSoup

    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def launch_links(page: Path) -> dict[str, str]:
    return {a.get_text(" ", strip=True): a["href"]
            for a in soup(page).select(".dropdown-launch-buttons a[href]")}


def test_launch_buttons_open_notebooks(built_book):
    org_repo = REPOSITORY.removeprefix("https://github.com/")
    for doc in reading_pages():
        links = launch_links(built_book / f"{doc}.html")
        assert links.get("Binder") == (f"https://mybinder.org/v2/gh/{org_repo}/main"
                                       f"?urlpath=lab/tree/{doc}.ipynb"), (doc, links)
        assert links.get("Colab") == (f"https://colab.research.google.com/github/{org_repo}"
                                      f"/blob/gh-pages/_sources/{doc}.ipynb"), (doc, links)
        assert (built_book / "_sources" / f"{doc}.ipynb").is_file()


def test_students_page_links_every_graded_notebook_to_colab_and_binder(built_book):
    org_repo = REPOSITORY.removeprefix("https://github.com/")
    hrefs = {a["href"] for a in soup(built_book / "book" / "students.html").find_all("a",
                                                                                   href=True)}
    for assignment in ASSIGNMENTS:
        path = f"exercises/{assignment}/{assignment}.ipynb"
        assert (ROOT / path).is_file()
        assert f"https://colab.research.google.com/github/{org_repo}/blob/main/{path}" in hrefs
        assert f"https://mybinder.org/v2/gh/{org_repo}/main?urlpath=lab/tree/{path}" in hrefs


def test_students_page_names_the_published_wheel_and_the_cpu_torch():
    wheel_url = f"{bootstrap.SITE}/wheels/{bootstrap.wheel_name(version())}"
    assert wheel_url in journey("download-install")
    assert f"--index-url {bootstrap.TORCH_INDEX}" in journey("torch-cpu")
    text = STUDENTS_PAGE.read_text(encoding="utf-8")
    assert "bncore.grading" not in text, "the self-check is python -m bncore.check"


# ---------------------------------------------------------------- the clone route

def tracked_copy(destination: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore), copied."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
    return destination


def test_clone_route_as_written(tmp_path_factory, journal):
    home = tmp_path_factory.mktemp("clone-home")
    shell = Shell(home, tmp_path_factory.mktemp("clone-shims"))
    origin = tracked_copy(tmp_path_factory.mktemp("origin") / "batchnorm-course")
    made, _ = shell.run("git init -q -b main && git add -A && git commit -q -m course", origin)
    assert made.returncode == 0, made.stderr
    script = journey("clone").replace(f"{REPOSITORY}.git", str(origin))
    done, seconds = shell.run(script, cwd=home)
    journal.record("clone route: clone, create the environment, install (s)", round(seconds, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"^Successfully installed .*\bbncore-{re.escape(version())}\b",
                     done.stdout, re.M), done.stdout[-2000:]
    clone = home / "batchnorm-course"
    installed = distributions(clone / ".venv")
    assert installed.get("bncore") == version()
    assert not [t for t in INSTRUCTOR_TOOLS if t in installed], installed
    check = journey("clone-check")
    done, _ = shell.run(check, cwd=clone)
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stdout + done.stderr
    assignment = EXAMPLE
    assert f"exercises/{assignment}/{assignment}.ipynb" in check
    answered = model_answer(assignment)
    nbformat.write(answered, clone / "exercises" / assignment / f"{assignment}.ipynb")
    done, seconds = shell.run(check, cwd=clone)
    journal.record("clone route: terminal check of ch3 (s)", round(seconds, 1))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{count_tests(answered)} of {count_tests(answered)} checks passed" in done.stdout


# ---------------------------------------------------------------- Binder

def binder_requirements() -> list[str]:
    lines = (ROOT / "binder" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_binder_environment_is_slim_and_has_the_cpu_torch(tmp_path, journal):
    lines = binder_requirements()
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)[1]
    assert f"torch=={pinned}+cpu" in lines, lines
    assert f"--extra-index-url {bootstrap.TORCH_INDEX}" in lines, lines
    assert "." in lines, "Binder installs bncore from the repository"
    # Resolve everything else as pip would on Binder (torch's CPU index is out of reach here).
    repo = tracked_copy(tmp_path / "repo")
    rest = [line for line in lines if not line.startswith(("torch", "--extra-index-url"))]
    (tmp_path / "rest.txt").write_text("\n".join(rest) + "\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                           "--ignore-installed", "--report", str(tmp_path / "report.json"),
                           "-r", str(tmp_path / "rest.txt")], cwd=repo, capture_output=True,
                          text=True, timeout=900)
    journal.record("binder: resolve its requirements (s)", round(time.perf_counter() - start, 1))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in report["install"]}
    assert {"bncore", "jupyterlab", "jupytext", "ipykernel"} <= names, sorted(names)
    found = sorted(n for n in names if any(n == t or n.startswith(t + "-")
                                          for t in INSTRUCTOR_TOOLS))
    assert not found, f"Binder's environment would hold {found}"


def test_binder_postbuild_gives_every_reading_page_a_notebook(built_book, tmp_path_factory,
                                                              journal):
    """binder/postBuild, run as Binder runs it (from the repository's root) in a fresh
    environment with jupytext, writes the .ipynb that each page's Binder button opens."""
    home = tmp_path_factory.mktemp("binder-home")
    shell = Shell(home, tmp_path_factory.mktemp("binder-shims"))
    repo = tracked_copy(tmp_path_factory.mktemp("binder") / "repo")
    jupytext = [line for line in binder_requirements() if line.startswith("jupytext")]
    assert jupytext, "binder/requirements.txt installs jupytext for postBuild"
    made, _ = shell.run(f"python3 -m venv {home}/env && {home}/env/bin/pip install --quiet "
                        f"{shlex.quote(jupytext[0])}", cwd=home)
    assert made.returncode == 0, made.stderr[-3000:]
    before = {p for p in repo.rglob("*.ipynb")}
    done, seconds = shell.run("binder/postBuild", cwd=repo,
                              PATH=f"{home}/env/bin:/usr/local/bin:/usr/bin:/bin")
    journal.record("binder: postBuild (s)", round(seconds, 1))
    assert done.returncode == 0, done.stdout + done.stderr
    written = {p.relative_to(repo).as_posix() for p in set(repo.rglob("*.ipynb")) - before}
    pages = reading_pages()
    assert written == {f"{doc}.ipynb" for doc in pages}
    for doc in pages:
        url = launch_links(built_book / f"{doc}.html")["Binder"]
        target = url.split("?urlpath=lab/tree/", 1)[1]
        notebook = nbformat.read(repo / target, as_version=4)
        nbformat.validate(notebook)
        executed = nbformat.read(built_book.parent / "jupyter_execute" / f"{doc}.ipynb",
                                 as_version=4)
        code = [c.source for c in notebook.cells if c.cell_type == "code"]
        assert code == [c.source for c in executed.cells if c.cell_type == "code"], doc


# ---------------------------------------------------------------- the deploy workflow

def deploy_step(name: str) -> str:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "deploy.yml").read_text())
    steps = workflow["jobs"]["book"]["steps"]
    found = [s for s in steps if s.get("name") == name]
    assert found, f"deploy.yml has no step named {name!r}"
    return found[0]["run"]


def test_deploy_keeps_the_wheels_of_earlier_versions(tmp_path):
    """The step runs after the build, before the publication: wheels published earlier stay,
    the build's own wheel is not replaced by an older copy."""
    script = deploy_step("Keep the wheels of earlier versions")
    git = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.org",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.org"}

    def sh(command: str, cwd: Path):
        return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                               command], cwd=cwd, env=git, capture_output=True, text=True)

    published = tmp_path / "published"
    (published / "wheels").mkdir(parents=True)
    (published / "wheels" / "bncore-0.1.0-py3-none-any.whl").write_bytes(b"old \x00 wheel")
    (published / "wheels" / f"bncore-{version()}-py3-none-any.whl").write_bytes(b"stale")
    (published / "index.html").write_text("old site")
    assert sh("git init -q -b gh-pages && git add -A && git commit -q -m site",
              published).returncode == 0
    checkout = tmp_path / "checkout"
    html = checkout / "_build" / "html"
    (html / "wheels").mkdir(parents=True)
    (html / "wheels" / f"bncore-{version()}-py3-none-any.whl").write_bytes(b"new")
    assert sh(f"git init -q -b main && git remote add origin {published}", checkout
              ).returncode == 0
    done = sh(script, checkout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (html / "wheels" / "bncore-0.1.0-py3-none-any.whl").read_bytes() == b"old \x00 wheel"
    assert (html / "wheels" / f"bncore-{version()}-py3-none-any.whl").read_bytes() == b"new"
    assert not (html / "index.html").exists(), "only wheels are carried over"
    # The first deployment, with no gh-pages branch yet.
    first = tmp_path / "first"
    (first / "_build" / "html" / "wheels").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sh("git init -q -b main", empty).returncode == 0
    assert sh(f"git init -q -b main && git remote add origin {empty}", first).returncode == 0
    done = sh(script, first)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- JupyterLab in Chromium

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(student, tmp_path, journal):
    """JupyterLab, started from the students' environment with the page's command, in a folder
    holding an answered chapter-3 notebook under a second download's name."""
    shell, venv = student
    assignment = EXAMPLE
    answered = model_answer(assignment)
    nbformat.write(answered, tmp_path / renamed(assignment))
    port, token = free_port(), "journeys"
    command = journey("download-lab").strip().replace(f"{assignment}.ipynb",
                                                       shlex.quote(renamed(assignment)))
    command += (f" --no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
                " --LabApp.news_url=None --LabApp.expose_app_in_browser=True"
                " --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")
    if os.geteuid() == 0:
        command += " --allow-root"   # jupyter_server refuses root otherwise (CI runs as root)
    start = time.perf_counter()
    with (tmp_path / "lab.log").open("w") as log:
        server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path,
                                  env=shell.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text())
        journal.record("JupyterLab: start (s)", round(time.perf_counter() - start, 1))
        yield {"url": url, "token": token, "name": renamed(assignment), "notebook": answered}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


ALL_RUN = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model || !panel.sessionContext) return false;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (!kernel || kernel.status !== 'idle') return false;
  const cells = Array.from(panel.content.model.cells);
  return cells.filter(c => c.type === 'code').every(c => c.executionCount !== null);
}"""

CELLS = """() => Array.from(window.jupyterapp.shell.currentWidget.content.model.cells)
  .map(c => c.toJSON())"""


def test_jupyterlab_runs_a_graded_notebook_without_instructor_menus(lab, journal):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: run scripts/system-deps.sh (as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(lab["url"]):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("blockedbyclient")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", only_local)
        start = time.perf_counter()
        page.goto(f"{lab['url']}/lab/tree/{urllib.parse.quote(lab['name'])}"
                  f"?token={lab['token']}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_function("""() => { const p = window.jupyterapp &&
            window.jupyterapp.shell.currentWidget; return p && p.sessionContext &&
            p.sessionContext.session && p.sessionContext.session.kernel &&
            p.sessionContext.session.kernel.status === 'idle'; }""", timeout=60_000)
        journal.record("JupyterLab: open the notebook, kernel ready (s)",
                       round(time.perf_counter() - start, 1))
        news = page.get_by_role("button", name="No")   # JupyterLab's question about its news
        if news.count():
            news.first.click()
        menus = page.locator(".lm-MenuBar-itemLabel").all_inner_texts()
        sidebars = " ".join(page.locator(".jp-SideBar").all_inner_texts())
        page.screenshot(path=str(ARTIFACTS / "lab-opened.png"))

        start = time.perf_counter()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.screenshot(path=str(ARTIFACTS / "lab-run-menu.png"))
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        page.wait_for_function(ALL_RUN, timeout=300_000, polling=500)
        journal.record("JupyterLab: Run All, self-check included (s)",
                       round(time.perf_counter() - start, 1))
        cells = page.evaluate(CELLS)
        commands = page.evaluate("() => window.jupyterapp.commands.listCommands()")
        toolbar = page.locator(".jp-NotebookPanel-toolbar").inner_text()
        page.evaluate("""() => { const nb = window.jupyterapp.shell.currentWidget.content;
            nb.activeCellIndex = nb.widgets.length - 1;
            return nb.scrollToItem(nb.widgets.length - 1, 'start'); }""")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "lab-self-check.png"))
        browser.close()

    assert menus and "Run" in menus and "Kernel" in menus, menus
    assert not [m for m in menus if "nbgrader" in m.lower()], menus
    assert not [c for c in commands if "nbgrader" in c.lower()], [
        c for c in commands if "nbgrader" in c.lower()]
    assert "Validate" not in toolbar, toolbar
    assert "Create Assignment" not in sidebars, sidebars
    errors = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert not errors, errors
    report = "".join(o.get("text", "") for o in cells[-1].get("outputs", []))
    n = count_tests(lab["notebook"])
    assert f"{n} of {n} checks passed" in report, report
    # The self-check names cells by the numbers JupyterLab shows after Run All.
    shown = {nbgrader_meta(c).get("grade_id"): c.get("execution_count") for c in cells}
    for grade_id, number in re.findall(r"passed\s+(\S+)\s+\S+ points?\s+cell \[(\d+)\]",
                                       report):
        assert shown.get(grade_id) == int(number), (grade_id, number, shown.get(grade_id))
    assert not outside, f"JupyterLab asked the network for {outside}"
