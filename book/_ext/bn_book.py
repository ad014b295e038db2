"""The book's local Sphinx extension (loaded by _config.yml, ``sphinx: local_extensions``).

It does six small things that a static _config.yml cannot:

1. **MathJax offline.** The pip package ``django-static-mathjax`` carries MathJax 3.2.2. Its
   location depends on the virtual environment, so at every build the files the page needs
   (``tex-chtml.js``, the TeX extensions, the CHTML output and its woff-v2 fonts, the menu and
   the accessibility tools) are copied once into ``_build/mathjax/mathjax/`` and that folder is
   served through ``html_extra_path``, which puts them at ``_build/html/mathjax/``. The
   ``mathjax_path`` in _config.yml (``../mathjax/tex-chtml.js``, relative to ``_static/``)
   points there; MathJax finds its fonts and extensions relative to its own script.
2. **Pages executed in parallel, afresh on CI.** ``bn_execute.py`` (set up from here) executes
   the notebook pages in a pool of two processes into myst-nb's execution cache before Sphinx
   reads them; with the environment variable ``CI`` set, every page, cached or not.
3. **Colab links that open.** Colab opens ``.ipynb`` files only, and the pages are MyST
   Markdown. The executed notebook of every page is published with the HTML under
   ``_sources/<page>.ipynb``; the Colab launch button is pointed at that file on the branch
   the site is published from (``bn_colab_branch``, ``gh-pages`` by default).
4. **No CDN scripts.** Live code (thebe) is off, but sphinx-thebe still adds a script that names
   thebe's CDN URL on every page; it is left out.
5. **A chapter numbers its sections across its pages.** Sphinx numbers a chapter's further
   pages (its ``sections`` in _toc.yml) like sections of the index page, after the index's own
   sections: 2.1 ... 2.6 on the index, then "2.7 The critique" with its sections 2.7.1, 2.7.2.
   Here a chapter's sections are numbered 2.1, 2.2, ... in reading order across all its pages;
   a further page's title carries no number (it is a page of the chapter, not a section), and
   the sidebar, the headings and the page's table of contents show the same numbers.
6. **The book's stylesheet** (``book/_static/bn-book.css``): code and outputs that fit 88
   characters in the article's column, and glued numbers set like the prose around them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

MATHJAX_DIST = "django-static-mathjax"
# Paths inside MathJax's es5/ folder that tex-chtml.js loads (directly or on demand).
MATHJAX_PARTS = ("tex-chtml.js", "input", "output/chtml.js", "output/chtml", "ui", "a11y",
                 "sre", "adaptors", "core.js", "startup.js", "loader.js")


def mathjax_source() -> Path:
    """The es5/ folder of the MathJax copy installed by django-static-mathjax."""
    try:
        dist = metadata.distribution(MATHJAX_DIST)
    except metadata.PackageNotFoundError as err:
        raise ExtensionError(f"{MATHJAX_DIST} is not installed (pip install -r requirements.txt)"
                             ) from err
    es5 = Path(dist.locate_file("mathjax/static/mathjax/es5"))
    if not (es5 / "tex-chtml.js").is_file():
        raise ExtensionError(f"no MathJax tex-chtml.js under {es5}")
    return es5


def stage_mathjax(app: Sphinx, config: Config) -> None:
    """Copy MathJax into _build/mathjax/mathjax and serve it through html_extra_path."""
    source = mathjax_source()
    version = metadata.version(MATHJAX_DIST)
    extra = Path(app.outdir).parent / "mathjax"   # outside _build/html, as Sphinx requires
    target = extra / "mathjax"
    stamp = target / ".version"
    if not (stamp.is_file() and stamp.read_text() == version):
        shutil.rmtree(target, ignore_errors=True)
        for part in MATHJAX_PARTS:
            src = source / part
            dst = target / part
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        shutil.copy2(source.parent / "LICENSE", target / "LICENSE")
        stamp.write_text(version)
    if str(extra) not in config.html_extra_path:
        config.html_extra_path.append(str(extra))


def colab_from_published_notebook(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Point the Colab button at the executed .ipynb published with the site."""
    branch = app.config.bn_colab_branch
    if not branch or "ipynb_source" not in context:
        return
    repo = app.config.html_theme_options.get("repository_url", "").rstrip("/")
    if not repo.startswith("https://github.com/"):
        return
    org_repo = repo.removeprefix("https://github.com/")
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []):
            if button.get("text") == "Colab":
                colab = button["url"].split("/github/")[0]
                button["url"] = (f"{colab}/github/{org_repo}/blob/{branch}/_sources/"
                                 f"{context['ipynb_source']}")


def drop_thebe_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Leave out sphinx-thebe's scripts (they name a CDN) when live code is switched off."""
    if app.config.html_theme_options.get("launch_buttons", {}).get("thebe"):
        return
    context["script_files"] = [
        js for js in context.get("script_files", [])
        if not (str(js).endswith("sphinx-thebe.js")
                or "THEBE_JS_URL" in getattr(js, "attributes", {}).get("body", ""))
    ]


def executed_download_from_cache(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Give the .ipynb download its outputs when they came from the execution cache.

    myst-nb writes _build/jupyter_execute/<page>.ipynb, which sphinx-book-theme copies to
    _sources/ for the download button, from the notebook as read; a notebook taken from the
    cache (not executed in this build) is written without its outputs. Merge them back in.
    """
    import nbformat
    from jupyter_cache import get_cache

    if app.config.nb_execution_mode != "cache":
        return
    build = Path(app.outdir).parent
    path = build / "jupyter_execute" / f"{pagename}.ipynb"
    if not path.is_file():
        return
    notebook = nbformat.read(path, as_version=4)
    if any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"):
        return
    cache = get_cache(app.config.nb_execution_cache_path or build / ".jupyter_cache")
    try:
        _, merged = cache.merge_match_into_notebook(notebook)
    except KeyError:
        return
    nbformat.write(merged, path)


# --- for students who run the course outside a clone -------------------------------------------
#
# - bncore's wheel on the site. Every build makes the wheel of the bncore in this tree (offline:
#   pip wheel --no-deps --no-build-isolation --no-index, from a copy of the sources so the tree
#   stays clean) and publishes it at the stable address wheels/bncore-<version>-py3-none-any.whl,
#   from where the first cell of every notebook installs it (bncore.bootstrap).
# - Downloads that install what they need. Every reading page's .ipynb download (the file the
#   download and Colab buttons use) starts with that set-up cell, which also installs PyTorch's
#   CPU build when the page imports torch and torch is missing.
# - Binder opens notebooks. JupyterLab 4 shows a MyST Markdown page as text; binder/postBuild
#   writes an .ipynb beside every reading page, and the Binder button opens that.

#: The repository's root (this file is book/_ext/bn_book.py).
ROOT = Path(__file__).resolve().parents[2]

#: Where the wheel lies on the site, relative to its root (bncore.bootstrap installs from there).
WHEELS = "wheels"
#: Files beside pyproject.toml that setuptools puts into the wheel when they exist.
PACKAGE_EXTRAS = ("README.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "LICENSE-CONTENT")


def build_wheel(root: Path, wheel_dir: Path) -> Path:
    """Build bncore's wheel from the sources under ``root`` into ``wheel_dir``; its path.

    Nothing is downloaded: pip builds with the setuptools of this environment. The build runs on
    a copy of pyproject.toml and bncore/, since setuptools leaves build/ and *.egg-info behind.
    Other bncore wheels in ``wheel_dir`` are removed: the folder holds the current one only.
    """
    with tempfile.TemporaryDirectory(prefix="bncore-wheel-") as tmp:
        source, out = Path(tmp) / "src", Path(tmp) / "out"
        shutil.copytree(root / "bncore", source / "bncore",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for extra in ("pyproject.toml", *PACKAGE_EXTRAS):
            if (root / extra).is_file():
                shutil.copy2(root / extra, source / extra)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out),
               str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        built = sorted(out.glob("bncore-*-py3-none-any.whl"))
        if done.returncode != 0 or len(built) != 1:
            raise ExtensionError(f"building bncore's wheel failed ({' '.join(cmd)}):\n"
                                 f"{done.stdout}{done.stderr}")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        for old in wheel_dir.glob("bncore-*.whl"):
            old.unlink()
        return Path(shutil.copy2(built[0], wheel_dir / built[0].name))


def published_version(html: Path) -> str:
    """The version of the bncore wheel under ``html``/wheels/ (the only one the build puts
    there)."""
    wheels = sorted((html / WHEELS).glob("bncore-*-py3-none-any.whl"))
    if len(wheels) != 1:
        raise ExtensionError(f"expected one bncore wheel in {html / WHEELS}, found "
                             f"{[w.name for w in wheels]}")
    return wheels[0].name.split("-")[1]


def publish_wheel(app: Sphinx, config: Config) -> None:
    """Build the wheel into _build/bncore-wheel/wheels/ and serve it through html_extra_path."""
    extra = Path(app.outdir).parent / "bncore-wheel"   # outside _build/html, as Sphinx requires
    wheel = build_wheel(ROOT, extra / WHEELS)
    logger.info(f"bncore's wheel: {WHEELS}/{wheel.name}")
    if str(extra) not in config.html_extra_path:
        config.html_extra_path.append(str(extra))


def bncore_modules_importing_torch() -> set[str]:
    """The bncore modules that import torch, directly or through other bncore modules."""
    import bncore
    from bncore.runner import imported_modules

    package = Path(bncore.__file__).parent
    imports = {f"bncore.{path.stem}": set(imported_modules([path.read_text(encoding="utf-8")]))
               for path in package.glob("*.py")}
    needs = {name for name, found in imports.items()
             if any(m.split(".")[0] == "torch" for m in found)}
    grown = True
    while grown:
        grown = False
        for name, found in imports.items():
            if name not in needs and found & needs:
                needs.add(name)
                grown = True
    return needs


def needs_torch(notebook, torch_modules: set[str]) -> bool:
    """Whether a notebook's code imports torch, or a bncore module that does."""
    from bncore.runner import imported_modules

    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return any(m.split(".")[0] == "torch" or m in torch_modules for m in imported_modules(code))


def with_bootstrap_cell(notebook, version: str, torch_modules: set[str]):
    """The notebook with the set-up cell that installs bncore ``version`` first (replacing one
    already there)."""
    import nbformat

    from bncore.bootstrap import TAG, cell_source

    source = cell_source(torch=needs_torch(notebook, torch_modules), bncore_version=version)
    cells = [c for c in notebook.cells if TAG not in c.get("metadata", {}).get("tags", [])]
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [TAG]})
    if (notebook.nbformat, notebook.nbformat_minor) >= (4, 5):
        cell["id"] = TAG
    else:
        cell.pop("id", None)
    notebook.cells = [cell, *cells]
    return notebook


def bootstrap_downloads(app: Sphinx, exception) -> None:
    """Put the set-up cell first in every notebook page's _sources/<page>.ipynb."""
    import nbformat

    if exception is not None or app.builder.format != "html":
        return
    version = published_version(Path(app.outdir))
    torch_modules = bncore_modules_importing_torch()
    for doc in sorted(app.env.found_docs):
        if "kernelspec" not in app.env.metadata.get(doc, {}):
            continue
        path = Path(app.outdir) / "_sources" / f"{doc}.ipynb"
        if not path.is_file():
            logger.warning(f"{doc} is a notebook, but the build holds no _sources/{doc}.ipynb "
                           "to give the set-up cell")
            continue
        notebook = with_bootstrap_cell(nbformat.read(path, as_version=4), version,
                                       torch_modules)
        nbformat.validate(notebook)
        nbformat.write(notebook, path)


def binder_opens_notebooks(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Point the Binder button at the .ipynb that binder/postBuild writes beside a .md page."""
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []):
            if button.get("text") == "Binder" and button.get("url", "").endswith(".md"):
                button["url"] = button["url"][:-len(".md")] + ".ipynb"
def number_sections_across_pages(app: Sphinx, env: BuildEnvironment) -> list[str]:
    """Renumber a chapter's further pages: their sections continue the chapter's count.

    Runs after Sphinx has numbered the sections (env-get-updated). A chapter is a page whose
    title has a one-part number (N,); the pages its toctree includes were numbered (N, t) with
    sections (N, t, a, ...). Their titles lose the number, and their sections become
    (N, k + a, ...), where k is the number of the chapter's last section so far.
    """
    renumbered = []
    for index, numbers in env.toc_secnumbers.items():
        chapter = numbers.get("")
        if not chapter or len(chapter) != 1:
            continue
        last = max((n[1] for n in numbers.values() if n and len(n) >= 2), default=0)
        for page in env.toctree_includes.get(index, []):
            old = env.toc_secnumbers.get(page, {})
            title = old.get("")
            if not title or len(title) != 2 or title[0] != chapter[0]:
                continue
            new = {"": None}
            for anchor, n in old.items():
                if anchor and n and len(n) >= 3:
                    new[anchor] = (chapter[0], last + n[2], *n[3:])
            last = max((n[1] for n in new.values() if n), default=last)
            env.toc_secnumbers[page] = new
            for reference in env.tocs[page].findall(nodes.reference):
                if "secnumber" in reference:
                    number = new.get(reference["anchorname"])
                    reference["secnumber"] = list(number) if number else None
            if page in env.titles:
                env.titles[page]["secnumber"] = None
            renumbered.append(page)
    return renumbered


def add_stylesheet(app: Sphinx, config: Config) -> None:
    """Serve book/_static/bn-book.css and load it on every page."""
    static = str(Path(__file__).resolve().parents[1] / "_static")
    if static not in config.html_static_path:
        config.html_static_path.append(static)
    app.add_css_file("bn-book.css")


def setup(app: Sphinx) -> dict:
    app.add_config_value("bn_colab_branch", "gh-pages", "html")
    # Executes the notebook pages in parallel (afresh on CI) before Sphinx reads them.
    app.setup_extension("bn_execute")
    # Before Sphinx checks html_extra_path (priority 800) and before myst-nb reads its config.
    app.connect("config-inited", stage_mathjax, priority=400)
    app.connect("config-inited", add_stylesheet, priority=400)
    # After Sphinx's own numbering (the toctree collector, priority 500).
    app.connect("env-get-updated", number_sections_across_pages, priority=900)
    # After sphinx-book-theme builds its launch buttons (priority 501).
    app.connect("html-page-context", colab_from_published_notebook, priority=600)
    app.connect("html-page-context", drop_thebe_scripts, priority=600)
    # Before sphinx-book-theme copies the notebook to _sources/ (priority 501).
    app.connect("html-page-context", executed_download_from_cache, priority=450)
    # The wheel is built before Sphinx checks html_extra_path (priority 800).
    app.connect("config-inited", publish_wheel, priority=400)
    # After sphinx-book-theme builds its launch buttons (priority 501).
    app.connect("html-page-context", binder_opens_notebooks, priority=600)
    # Once every page (and its _sources/<page>.ipynb) is written.
    app.connect("build-finished", bootstrap_downloads)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
