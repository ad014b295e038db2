"""The published book: a strict build that is green, complete, offline and ready to deploy.

Every page is discovered from _toc.yml, never from a list kept here, so a chapter added to the
table of contents is checked the moment it is listed. The build itself is the session fixture
`built_book` (tests/conftest.py): one strict build from an empty execution cache, every notebook
executed afresh; the cache test rebuilds from that build's cache.
The helpers at the top are shared with tests/test_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from glob import glob
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
SOURCE_SUFFIXES = (".md", ".ipynb", ".rst")
# A graded-notebook link: .../exercises/<assignment>/<assignment>.ipynb
GRADED = re.compile(r"(?:^|/)exercises/(?P<a>[^/]+)/(?P<b>[^/]+)\.ipynb$")
# Folders of the built site that hold assets, not pages.
ASSET_DIRS = {"_static", "_sources", "_images", "_downloads", "mathjax"}

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- the table of contents

def toc_pages(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every page of the book in reading order, as docnames ("book/intro", ...)."""
    data = yaml.safe_load(toc.read_text())
    pages: list[str] = []

    def add(file: str) -> None:
        doc = str(Path(file).with_suffix("")) if file.endswith(SOURCE_SUFFIXES) else file
        if doc not in pages:
            pages.append(doc)

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if "file" in node:
            add(node["file"])
        if "glob" in node:
            for match in sorted(glob(str(ROOT / node["glob"]))):
                if match.endswith(SOURCE_SUFFIXES):
                    add(str(Path(match).relative_to(ROOT)))
        for key in ("parts", "chapters", "sections", "subtrees", "entries"):
            walk(node.get(key, []))

    add(data["root"])
    walk(data)
    return pages


def toc_chapters(toc: Path = ROOT / "_toc.yml") -> dict[str, list[str]]:
    """The course's chapters, {folder name: its pages}: a chapter is a book/<folder>/ with pages
    in the toc and an index page. The folder's name is the name of its graded assignment."""
    chapters: dict[str, list[str]] = {}
    for doc in toc_pages(toc):
        parts = Path(doc).parts
        if len(parts) == 3 and parts[0] == "book":
            chapters.setdefault(parts[1], []).append(doc)
    return {name: docs for name, docs in chapters.items() if f"book/{name}/index" in docs}


def source_of(doc: str) -> Path:
    for suffix in SOURCE_SUFFIXES:
        if (ROOT / f"{doc}{suffix}").is_file():
            return ROOT / f"{doc}{suffix}"
    raise FileNotFoundError(f"_toc.yml lists {doc}, which has no source file")


def is_notebook(doc: str) -> bool:
    """A page that is executed at build time: an .ipynb, or MyST Markdown with a kernelspec."""
    src = source_of(doc)
    if src.suffix == ".ipynb":
        return True
    text = src.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return False
    front = yaml.safe_load(text.split("---", 2)[1]) or {}
    return "kernelspec" in front


def html_pages(html: Path) -> list[Path]:
    """The HTML pages of a built site (not the theme's templates under _static)."""
    return sorted(p for p in html.rglob("*.html")
                  if p.relative_to(html).parts[0] not in ASSET_DIRS)


def graded_target(href: str) -> str | None:
    """The repository path a graded-notebook link points at, or None for another link."""
    path = unquote(urlsplit(href).path)
    match = GRADED.search(path)
    if not match or match["a"] != match["b"]:
        return None
    return f"exercises/{match['a']}/{match['a']}.ipynb"


def repository_blob_prefix() -> str:
    repo = CONFIG.get("repository", {})
    return f"{repo.get('url', '').rstrip('/')}/blob/{repo.get('branch', 'main')}/"


def soup(path: Path):
    from bs4 import BeautifulSoup

    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def is_remote(url: str) -> bool:
    return urlsplit(url).scheme in {"http", "https"} or url.startswith("//")


def build_book(out: Path, log: Path) -> float:
    """`jupyter-book build -W -n --keep-going --path-output out .`, strict, its output in log;
    fails with the end of the log unless the build succeeds. Returns the seconds it took.

    The build runs as it does locally, CI removed from the environment (with CI set,
    book/_ext/bn_execute.py executes every page again, whatever the execution cache holds, so
    the cache test could not see the cache used). The one place the tests spell out the build
    command: the built_book fixture and the cache test both call it."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", "-W", "-n",
           "--keep-going", "--path-output", str(out), "."]
    start = time.perf_counter()
    with log.open("w") as fh:
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=3600)
    seconds = time.perf_counter() - start
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    assert result.returncode == 0, (
        f"the strict book build failed (exit {result.returncode}); end of {log}:\n{tail}")
    return seconds


def code_cells(doc: str) -> list[str]:
    """The source of every `{code-cell}` of a MyST Markdown page, in order."""
    text = source_of(doc).read_text(encoding="utf-8")
    return re.findall(r"^(`{3,})\{code-cell\}[^\n]*\n(.*?)^\1\s*$", text, re.M | re.S)


PAGES = toc_pages()
CHAPTERS = toc_chapters()
NOTEBOOKS = [doc for doc in PAGES if is_notebook(doc)]
CODE_WIDTH = 88           # characters: what fits the article's column at 1280 px
# A page whose code the test below runs without myst-nb: a short one (a few seconds).
STANDALONE_PAGE = "book/ch5-placement/conv"


# ---------------------------------------------------------------- the tests

def test_strict_build_is_green(built_book):
    # The fixture ran `jupyter-book build -W -n --keep-going` (any warning fails it) and
    # check_offline.py, and asserted that both exited 0.
    assert (built_book / "index.html").is_file()
    assert (built_book / "searchindex.js").is_file(), "no search index: search cannot work"


def test_every_notebook_page_was_executed_afresh(built_book):
    log = built_book.parents[1] / "build.log"    # written by the built_book fixture
    if not log.is_file():
        pytest.skip("an existing build was given (BN_BUILT_BOOK): no build log to read")
    ran = sorted(executed(log))
    assert ran == sorted(str(source_of(d)) for d in NOTEBOOKS), (
        f"from an empty cache every notebook page must be executed; the build executed {ran}")


def test_toc_lists_pages_that_exist():
    assert PAGES, "_toc.yml lists no page"
    for doc in PAGES:
        source_of(doc)   # raises with the docname when the source is missing


@pytest.mark.parametrize("doc", PAGES)
def test_every_toc_page_has_html(built_book, doc):
    page = built_book / f"{doc}.html"
    assert page.is_file(), f"{doc} is in _toc.yml but {page.name} was not built"
    title = soup(page).find("h1")
    assert title and title.get_text(strip=True), f"{doc}.html has no <h1> title"


def test_scripts_and_styles_are_local(built_book):
    """No <script src> or stylesheet from another host; every local one exists."""
    problems = []
    for page in html_pages(built_book):
        where = page.relative_to(built_book)
        doc = soup(page)
        urls = [s["src"] for s in doc.find_all("script", src=True)]
        urls += [link["href"] for link in doc.find_all("link", href=True)
                 if {"stylesheet", "preload", "icon", "modulepreload"} & set(link.get("rel", []))]
        for url in urls:
            if is_remote(url):
                problems.append(f"{where}: loads {url} from the network")
                continue
            path = urlsplit(url).path
            if path and not (page.parent / unquote(path)).resolve().is_file():
                problems.append(f"{where}: refers to {url}, which is not in the build")
        for script in doc.find_all("script", src=False):
            for url in re.findall(r"""["'](https?://[^"']+\.(?:js|css))["']""", script.text):
                problems.append(f"{where}: an inline script names {url}")
    assert not problems, "\n".join(problems)


def test_mathjax_is_served_locally(built_book):
    loaders = set()
    for doc in PAGES:
        for script in soup(built_book / f"{doc}.html").find_all("script", src=True):
            if "mathjax" in script["src"].lower():
                assert not is_remote(script["src"]), f"{doc} loads MathJax from {script['src']}"
                loaders.add((built_book / f"{doc}.html").parent.joinpath(
                    urlsplit(script["src"]).path).resolve())
    assert loaders, "no page loads MathJax"
    for loader in loaders:
        assert loader.is_file(), f"MathJax script {loader} is missing"
        fonts = list((loader.parent / "output" / "chtml" / "fonts").rglob("*.woff"))
        assert fonts, f"no MathJax fonts beside {loader}"


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_chapter_links_its_graded_notebook(built_book, chapter):
    """Some page of every chapter links exercises/<chapter>/<chapter>.ipynb, and it exists."""
    expected = f"exercises/{chapter}/{chapter}.ipynb"
    found = []
    for doc in CHAPTERS[chapter]:
        for a in soup(built_book / f"{doc}.html").find_all("a", href=True):
            if graded_target(a["href"]) == expected:
                found.append((doc, a["href"]))
    assert found, f"no page of {chapter} ({', '.join(CHAPTERS[chapter])}) links {expected}"
    assert (ROOT / expected).is_file(), (
        f"{chapter} links {expected}, which does not exist: run `make exercises`")
    for doc, href in found:
        if is_remote(href):
            assert href == repository_blob_prefix() + expected, (
                f"{doc} links {href}; expected the repository's {repository_blob_prefix()}"
                f"{expected}")


def test_every_graded_link_points_at_a_release(built_book):
    for page in html_pages(built_book):
        for a in soup(page).find_all("a", href=True):
            target = graded_target(a["href"])
            if target:
                assert (ROOT / target).is_file(), (
                    f"{page.relative_to(built_book)} links {a['href']}: {target} does not exist")


def executed_download(html: Path, doc: str) -> Path | None:
    candidates = [html / "_sources" / f"{doc}.ipynb"]
    candidates += sorted((html / "_downloads").rglob(f"{Path(doc).name}.ipynb"))
    return next((p for p in candidates if p.is_file()), None)


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_executed_notebook_is_downloadable(built_book, doc):
    notebook = executed_download(built_book, doc)
    assert notebook, f"no {doc}.ipynb in _sources/ or _downloads/"
    # The set-up cell that installs bncore (tagged bncore-bootstrap) runs where the download is
    # opened, not in the build.
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"
             and "bncore-bootstrap" not in c.get("metadata", {}).get("tags", [])]
    assert cells, f"{notebook.name} has no code cell"
    unexecuted = [i for i, c in enumerate(cells) if c.get("execution_count") is None]
    assert not unexecuted, f"{notebook} holds code cells that were not executed: {unexecuted}"
    assert any(c.get("outputs") for c in cells), f"{notebook} has no output at all"


@pytest.mark.parametrize("doc", PAGES)
def test_download_buttons(built_book, doc):
    """The download menu offers the source (.md) of every page and the .ipynb of a notebook."""
    page = built_book / f"{doc}.html"
    menu = soup(page).select_one(".dropdown-download-buttons")
    assert menu, f"{doc}.html has no download menu"
    hrefs = [urlsplit(a["href"]).path for a in menu.find_all("a", href=True)]
    wanted = [source_of(doc).suffix] + ([".ipynb"] if is_notebook(doc) else [])
    for suffix in wanted:
        links = [h for h in hrefs if h.endswith(f"{Path(doc).name}{suffix}")]
        assert links, f"{doc}.html offers no {suffix} download (it offers {hrefs})"
        assert (page.parent / unquote(links[0])).resolve().is_file(), (
            f"{doc}.html: the {suffix} download {links[0]} is not in the build")


@pytest.mark.parametrize("doc", PAGES)
def test_every_page_has_a_description(built_book, doc):
    """A <meta name="description"> for search engines and link previews (front matter:
    `myst: html_meta: description: ...`)."""
    meta = soup(built_book / f"{doc}.html").find("meta", attrs={"name": "description"})
    assert meta and len(meta.get("content", "").strip()) >= 40, (
        f"{source_of(doc).relative_to(ROOT)} needs a description in its front matter:\n"
        "myst:\n  html_meta:\n    description: \"One or two sentences about this page.\"")


def test_logo_favicon_and_canonical_urls(built_book):
    baseurl = CONFIG["html"]["baseurl"]
    assert baseurl.startswith("https://") and baseurl.endswith("/"), baseurl
    for doc in PAGES:
        page = built_book / f"{doc}.html"
        doc_soup = soup(page)
        icon = doc_soup.find("link", rel="icon")
        assert icon, f"{doc}.html has no favicon"
        assert (page.parent / icon["href"]).resolve().is_file(), f"favicon {icon['href']} missing"
        logo = doc_soup.select_one("img.logo__image")
        assert logo, f"{doc}.html shows no logo"
        assert (page.parent / logo["src"]).resolve().is_file(), f"logo {logo['src']} missing"
        canonical = doc_soup.find("link", rel="canonical")
        assert canonical and canonical["href"] == f"{baseurl}{doc}.html", (
            f"{doc}.html: canonical URL {canonical and canonical['href']}")


# ---------------------------------------------------------------- pages outside the book

@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_page_code_does_not_import_myst_nb(doc):
    """A page runs where myst-nb is not installed (a downloaded notebook, Colab): it glues
    values with bncore.pages.glue, which calls myst-nb only when it is there."""
    found = [line.strip() for _, cell in code_cells(doc) for line in cell.splitlines()
             if re.search(r"\b(import|from)\s+myst_nb\b", line)]
    assert not found, f"{doc} imports myst_nb: {found} (use `from bncore.pages import glue`)"


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_code_lines_fit_the_column(doc):
    long = [(len(line), line) for _, cell in code_cells(doc) for line in cell.splitlines()
            if len(line) > CODE_WIDTH]
    assert not long, f"{doc}: code lines over {CODE_WIDTH} characters: {long[:3]}"


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_figure_text_is_at_least_9_points(doc):
    """Figures are drawn at the column's width (checked in the browser), so text set in 9
    points or more stays legible; bncore.plotting.setup() sets 11."""
    small = [m.group(0) for _, cell in code_cells(doc) for m in re.finditer(
        r"fontsize\s*=\s*(?:([0-9.]+)|[\"'](x-small|xx-small)[\"'])", cell)
        if m.group(2) or float(m.group(1)) < 9]
    assert not small, f"{doc}: figure text below 9 points: {small}"


def test_a_page_runs_top_to_bottom_without_myst_nb(tmp_path):
    """One page, converted to a notebook and executed in a kernel where myst_nb cannot be
    imported: every cell runs, and the values it glues stay out of sight."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    doc = STANDALONE_PAGE if STANDALONE_PAGE in NOTEBOOKS else NOTEBOOKS[-1]
    notebook = jupytext.read(source_of(doc))
    block = nbformat.v4.new_code_cell(
        'import sys\nsys.modules["myst_nb"] = None  # import myst_nb now fails')
    notebook.cells.insert(0, block)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if "scrapbook" in o.get("metadata", {})], (
        "glued values were stored by myst-nb, which should not have been importable")
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"


# ---------------------------------------------------------------- the execution cache


def executed(log: Path) -> list[str]:
    return re.findall(r"^(\S+): Executing notebook", log.read_text(errors="replace"), re.M)


@pytest.mark.skipif(os.environ.get("BN_SKIP_CACHE_TEST") == "1",
                    reason="BN_SKIP_CACHE_TEST=1: the extra rebuild is skipped")
def test_clean_rebuild_with_warm_cache_executes_nothing(built_book, tmp_path):
    """The session's build (local `cache` mode, from an empty cache) executed every notebook;
    a rebuild from an empty _build/html but a copy of its _build/.jupyter_cache must execute
    no notebook."""
    build = built_book.parent                    # <path-output>/_build
    log = build.parent / "build.log"             # written by the built_book fixture
    if log.is_file():
        ran = executed(log)
        assert sorted(ran) == sorted(str(source_of(d)) for d in NOTEBOOKS), (
            f"the first build executed {ran}, expected every notebook page")
    elif not (build / ".jupyter_cache").is_dir():
        pytest.skip("an existing build was given (BN_BUILT_BOOK) without an execution cache")
    shutil.copytree(build / ".jupyter_cache", tmp_path / "_build" / ".jupyter_cache")
    seconds = build.parent / "build.seconds"    # the fixture's build time
    first = seconds.read_text() if seconds.is_file() else "?"
    second = build_book(tmp_path, tmp_path / "second.log")
    assert not executed(tmp_path / "second.log"), (
        f"the rebuild re-executed {executed(tmp_path / 'second.log')} though nothing changed")
    print(f"\nclean build {first} s; rebuild with a warm cache {second:.0f} s")
    # The downloads of a rebuild from the cache must still be the executed notebooks.
    html = tmp_path / "_build" / "html"
    for doc in NOTEBOOKS:
        notebook = json.loads(executed_download(html, doc).read_text())
        assert any(c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code"), (
            f"after a rebuild from the cache, the download of {doc} has no outputs "
            "(myst-nb writes the notebook as read, without the cached outputs)")
