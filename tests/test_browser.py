"""The built book in a real browser: Debian's chromium, driven by Playwright, with the network off.

The site is served from the `built_book` fixture by a local http.server on 127.0.0.1 (a random
port). Every request to any other address is blocked and counted: a page that tries to reach
the network fails. Pages are discovered from _toc.yml, in reading order.

Screenshots (phone 390 px and desktop 1280 px wide, of the title page and chapter 3) and a
summary of what was checked (browser-summary.json) are saved under _build/screenshots/, or under
$BN_SCREENSHOTS when it is set. They are artifacts to look at, not pixel assertions.

Skips, with the reason, where chromium or the playwright package is missing (CI installs both:
scripts/system-deps.sh and requirements.txt). Never run `playwright install`: it downloads a
browser of its own; this file uses the system's chromium.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

from tests.test_book import (
    CHAPTERS,
    NOTEBOOKS,
    PAGES,
    ROOT,
    code_cells,
    graded_target,
    repository_blob_prefix,
    source_of,
)

CHROMIUM = os.environ.get("BN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
SEARCH_TERM = "Jacobian"       # a word that chapter 3 explains
TIMEOUT_MS = 20_000

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: run scripts/system-deps.sh (as root) or set "
                "BN_CHROMIUM", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing: pip install -r "
    "requirements.txt (the system's chromium is used; never `playwright install`)")

pytestmark = pytest.mark.slow

CHAPTER3 = next((doc for doc in PAGES if re.fullmatch(r"book/ch3-[^/]+/index", doc)), None)


# ---------------------------------------------------------------- server and browser

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass   # a browser that drops a connection it no longer needs is not an error


@pytest.fixture(scope="module")
def site(built_book):
    """The built book on http://127.0.0.1:<random port>/."""
    server = QuietServer(("127.0.0.1", 0),
                                 functools.partial(QuietHandler, directory=str(built_book)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("BN_SCREENSHOTS", ROOT / "_build" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Watch:
    """What the browser did that it should not have: errors, failed and blocked requests."""
    base: str
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def block(self, route):
        self.blocked.append(route.request.url)
        route.abort("blockedbyclient")

    def attach(self, page):
        page.on("console", lambda m: m.type == "error" and self.console.append(
            f"console.error: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"uncaught: {e}"))
        # net::ERR_ABORTED is a request the browser dropped itself (the page was left before
        # the favicon arrived, say); blocked requests and HTTP errors are counted apart.
        page.on("requestfailed", lambda r: r.url not in self.blocked
                and r.failure != "net::ERR_ABORTED" and self.failed.append(
                    f"{r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.http_errors.append(
            f"{r.status} {r.url}"))

    def snapshot(self) -> tuple[int, int, int, int]:
        return len(self.blocked), len(self.failed), len(self.http_errors), len(self.console)

    def since(self, mark) -> list[str]:
        lists = (self.blocked, self.failed, self.http_errors, self.console)
        news = []
        for start, items, label in zip(mark, lists, ("blocked", "failed", "HTTP", ""),
                                       strict=True):
            news += [f"{label} {x}".strip() for x in items[start:]]
        return news


def open_page(browser, site, viewport=DESKTOP):
    """A fresh context (empty storage) that may reach 127.0.0.1 only, and its page."""
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(TIMEOUT_MS)
    watch = Watch(site)
    # Every URL that is not on the local server (matched in the driver, so requests to the
    # server itself are not slowed down by a round trip through Python).
    context.route(re.compile(rf"^(?!{re.escape(site)})"), watch.block)
    page = context.new_page()
    watch.attach(page)
    return context, page, watch


def settle(page) -> None:
    """Wait until MathJax has typeset the page (when it has math) and the network is idle."""
    page.wait_for_load_state("load")
    page.evaluate("""() => (window.MathJax && MathJax.startup && MathJax.startup.promise)
                           ? MathJax.startup.promise.then(() => true) : false""")
    page.wait_for_load_state("networkidle")


def link_to(page, selector: str, url: str):
    """The first element matching selector whose resolved href is url."""
    links = page.locator(selector)
    index = links.evaluate_all("(as, url) => as.findIndex(a => a.href === url)", url)
    assert index >= 0, f"{page.url}: no {selector} links to {url}"
    return links.nth(index)


def doc_of(url: str, site: str) -> str:
    path = urlsplit(url).path.removeprefix(urlsplit(site).path)
    return path.removesuffix(".html")


# ---------------------------------------------------------------- one visit per page

# Runs in the page: what the tests below need to know about it.
INSPECT = """async () => {
  const article = document.querySelector('main') || document.body;
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
  const raw = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest(skip)) continue;
    // display or inline delimiters, or a TeX command such as \\operatorname{ left in the text
    const m = node.textContent.match(
      /\\$\\$|\\\\\\[|\\\\\\]|\\\\\\(|\\\\\\)|\\\\begin\\{|\\\\[a-zA-Z]+\\{|\\$\\\\[a-zA-Z]/);
    if (m) raw.push(node.textContent.trim().slice(0, 80));
  }
  const maths = [...document.querySelectorAll('.math')];
  const images = await Promise.all([...document.querySelectorAll('img')].map(async img => {
    img.loading = 'eager';
    try { await img.decode(); } catch (e) {}
    return {src: img.currentSrc || img.src, w: img.naturalWidth, h: img.naturalHeight,
            figure: !!img.closest('.bd-article') && !img.closest('.navbar-brand')};
  }));
  const hrefs = sel => [...document.querySelectorAll(sel)].map(a => a.href);
  return {
    title: (document.querySelector('h1') || {}).textContent || '',
    math: maths.length,
    untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(
      m => m.textContent.trim().slice(0, 80)),
    mjx: document.querySelectorAll('mjx-container').length,
    displayed: document.querySelectorAll('mjx-container[display="true"]').length,
    raw, images,
    links: hrefs('a[href]'),
    internal: hrefs('.bd-article a.reference.internal'),
    next: hrefs('a.right-next')[0] || null,
    prev: hrefs('a.left-prev')[0] || null,
    sidebar: hrefs('nav.bd-docs-nav a.reference'),
    downloads: hrefs('.dropdown-download-buttons a'),
  };
}"""


# Runs in the page after INSPECT, at 1280 px: what a reader can and cannot read. It first opens
# everything a reader can open (solution dropdowns, hidden code), so that their content is
# measured too.
READABLE = """async () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  document.querySelectorAll('.toggle-hidden').forEach(e => e.classList.remove('toggle-hidden'));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const column = article.getBoundingClientRect();
  const snippet = el => el.textContent.trim().replace(/\\s+/g, ' ').slice(0, 70);
  const skip = 'pre, code, script, style, textarea, mjx-container';
  const pipes = [], reprs = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    if (/at 0x[0-9a-fA-F]{4,}/.test(text)) reprs.push(text.trim().slice(0, 80));
    if (node.parentElement.closest(skip)) continue;
    // a separator row (typography may have turned --- into a dash), or a row of cells
    const separator = /\\|\\s*:?[-\u2013\u2014]+:?\\s*\\|/, row = /^\\s*\\|([^|\\n]*\\|){2,}\\s*$/m;
    if (separator.test(text) || row.test(text)) pipes.push(text.trim().slice(0, 80));
  }
  const clipped = [];
  for (const box of article.querySelectorAll('mjx-container[display="true"]')) {
    const math = box.querySelector('mjx-math');
    if (!math) continue;
    const outer = box.getBoundingClientRect(), inner = math.getBoundingClientRect();
    const hidden = inner.left < outer.left - 1 || inner.right > outer.right + 1;
    const outside = inner.left < column.left - 1 || inner.right > column.right + 1;
    if (hidden || outside || box.scrollWidth > box.clientWidth + 1) {
      const label = (box.closest('.math') || box).id || snippet(box.closest('p, div') || box);
      clipped.push(`${label}: ${Math.round(inner.width)} px of formula in a ` +
                   `${Math.round(outer.width)} px box`);
    }
  }
  const scrolling = [];
  const boxes = article.querySelectorAll(
    'pre, div.cell_output .output, .pst-scrollable-table-container, table');
  for (const el of boxes) {
    if (el.clientWidth === 0) continue;
    const over = el.scrollWidth - el.clientWidth;
    const right = el.getBoundingClientRect().right - column.right;
    if (over > 1 || right > 1) {
      const kind = el.closest('.cell_output') ? 'output'
                 : el.closest('.cell_input') ? 'code' : el.tagName.toLowerCase();
      scrolling.push(`${kind} scrolls by ${Math.max(over, Math.round(right))} px: ` +
                     snippet(el));
    }
  }
  const figures = await Promise.all([...article.querySelectorAll('img')].map(async img => {
    try { await img.decode(); } catch (e) {}
    const shown = img.getBoundingClientRect().width;
    return {src: img.currentSrc || img.src, natural: img.naturalWidth, shown};
  }));
  const shrunk = figures.filter(f => f.shown > 0 && f.natural / f.shown >= 1.3).map(
    f => `${f.src.split('/').pop()}: ${f.natural} px drawn, shown at ${Math.round(f.shown)} px`
         + ` (${(f.natural / f.shown).toFixed(2)}x smaller)`);
  const weight = el => parseInt(getComputedStyle(el).fontWeight, 10);
  const bold_glue = [...article.querySelectorAll('span.pasted-text')].filter(
    el => weight(el) > weight(el.parentElement)).map(el => el.textContent.trim());
  const number = el => {
    const span = el.querySelector('span.section-number');
    return span ? span.textContent.trim().replace(/\\.$/, '') : '';
  };
  const headings = [...article.querySelectorAll('h1, h2, h3')].map(h => ({
    level: +h.tagName[1], number: number(h),
    text: h.textContent.replace('#', '').trim().slice(0, 60)}));
  const sidebar = {};
  for (const a of document.querySelectorAll('nav.bd-docs-nav a.reference')) {
    const match = a.textContent.trim().match(/^(\\d+(?:\\.\\d+)*)\\.\\s/);
    sidebar[a.href.split('#')[0]] = match ? match[1] : '';
  }
  return {pipes, reprs, clipped, scrolling, shrunk, bold_glue, headings, sidebar,
          output_tables: article.querySelectorAll('div.cell_output table').length};
}"""


@pytest.fixture(scope="module")
def visits(browser, site):
    """Every toc page once, with what it showed and did: from the title page, the sweep clicks
    "next" as a reader would; pages that "next" does not reach are then opened directly."""
    context, page, watch = open_page(browser, site)
    out, order = {}, []
    start = time.perf_counter()
    mark = watch.snapshot()
    page.goto(f"{site}{PAGES[0]}.html")
    while True:
        doc = doc_of(page.url, site)
        settle(page)
        out[doc] = page.evaluate(INSPECT)
        out[doc]["problems"] = watch.since(mark)
        out[doc]["readable"] = page.evaluate(READABLE)
        order.append(doc)
        following = page.locator("a.right-next")
        if following.count() == 0 or len(order) > len(PAGES):
            break
        mark = watch.snapshot()
        with page.expect_navigation():
            following.click()
        if doc_of(page.url, site) in out:
            break   # "next" went back to a page already seen
    for doc in PAGES:
        if doc not in out:
            mark = watch.snapshot()
            page.goto(f"{site}{doc}.html")
            settle(page)
            out[doc] = page.evaluate(INSPECT)
            out[doc]["problems"] = watch.since(mark)
            out[doc]["readable"] = page.evaluate(READABLE)
    context.close()
    out["_next"] = order
    out["_seconds"] = time.perf_counter() - start
    return out


def pages_of(visits) -> dict:
    return {doc: info for doc, info in visits.items() if not doc.startswith("_")}


# ---------------------------------------------------------------- the tests

def test_every_page_loads_offline_without_errors(visits):
    problems = {doc: info["problems"] for doc, info in pages_of(visits).items()
                if info["problems"]}
    assert not problems, "pages that reached for the network or logged errors:\n" + "\n".join(
        f"{doc}: {p}" for doc, ps in problems.items() for p in ps)
    assert set(pages_of(visits)) == set(PAGES)
    assert all(info["title"].strip() for info in pages_of(visits).values())


def test_title_page_redirects_and_loads_offline(browser, site):
    context, page, watch = open_page(browser, site)
    page.goto(site)
    page.wait_for_url(f"{site}{PAGES[0]}.html")
    settle(page)
    context.close()
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


def test_math_is_typeset(visits):
    equations = 0
    for doc, info in pages_of(visits).items():
        assert not info["untypeset"], f"{doc}: math left untypeset: {info['untypeset'][:3]}"
        assert not info["raw"], f"{doc}: raw TeX in the text: {info['raw'][:3]}"
        assert info["mjx"] >= info["math"], f"{doc}: {info['math']} math, {info['mjx']} typeset"
        equations += info["mjx"]
    if CHAPTER3:
        assert pages_of(visits)[CHAPTER3]["displayed"] > 0, f"{CHAPTER3} shows no equation"
    assert equations > 0, "no page of the book shows typeset math"


def test_every_figure_loads(visits):
    for doc, info in pages_of(visits).items():
        broken = [img["src"] for img in info["images"] if not (img["w"] > 0 and img["h"] > 0)]
        assert not broken, f"{doc}: images that did not load: {broken}"
    notebook_figures = sum(img["figure"] for doc in NOTEBOOKS
                           for img in pages_of(visits)[doc]["images"])
    assert notebook_figures > 0, "no executed page shows a figure"


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:   # 127.0.0.1 only
        return response.read()


def test_internal_links_and_cross_references_resolve(visits, site):
    """Every link to the site (sidebar, cross-references, equations) opens an existing page and
    lands on an existing anchor."""
    cache: dict[str, str] = {}
    problems = []
    for doc, info in pages_of(visits).items():
        for href in set(info["links"]):
            if not href.startswith(site):
                continue
            url, fragment = urldefrag(href)
            if url not in cache:
                try:
                    cache[url] = fetch(url).decode("utf-8", errors="replace")
                except OSError as err:
                    problems.append(f"{doc}: {href}: {err}")
                    cache[url] = ""
                    continue
            if fragment and url.endswith(".html") and cache[url] and not re.search(
                    rf"""id=["']{re.escape(fragment)}["']""", cache[url]):
                problems.append(f"{doc}: {href}: no element with id {fragment!r}")
    assert not problems, "\n".join(problems)


def test_cross_reference_click_navigates(browser, site, visits):
    """Click a cross-reference from a chapter's text to another chapter's page (or, while the
    book has one chapter, to another part of the book) and land on its target."""
    def folder(url_or_doc: str) -> Path:
        return Path(doc_of(urldefrag(url_or_doc)[0], site)).parent

    crossing = [(doc, href) for doc, info in pages_of(visits).items()
                for href in info["internal"]
                if href.startswith(site) and folder(href) != Path(doc).parent]
    assert crossing, "no page refers to a page in another folder of the book"
    chapters = {Path(f"book/{name}") for name in CHAPTERS}
    crossing.sort(key=lambda pair: (Path(pair[0]).parent not in chapters,
                                    folder(pair[1]) not in chapters))
    doc, href = crossing[0]
    context, page, watch = open_page(browser, site)
    page.goto(f"{site}{doc}.html")
    link_to(page, ".bd-article a.reference.internal", href).click()
    page.wait_for_url(href)
    fragment = urldefrag(href)[1]
    if fragment:
        assert page.locator(f'[id="{fragment}"]').count() == 1, f"{href}: no #{fragment}"
    context.close()
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


def test_next_follows_the_toc(visits):
    """Clicking "next" from the title page visits every page in the toc's order."""
    assert visits["_next"] == PAGES, f"'next' visits {visits['_next']}, the toc says {PAGES}"


def test_previous_follows_the_toc_backwards(browser, site, visits):
    """Clicking "previous" from the last page walks the toc back to the title page."""
    for doc, info in pages_of(visits).items():
        i = PAGES.index(doc)
        assert info["prev"] == (f"{site}{PAGES[i - 1]}.html" if i else None), (
            f"{doc}: 'previous' links {info['prev']}")
    context, page, watch = open_page(browser, site)
    page.goto(f"{site}{PAGES[-1]}.html")
    backward = [doc_of(page.url, site)]
    while page.locator("a.left-prev").count() and len(backward) <= len(PAGES):
        with page.expect_navigation(wait_until="domcontentloaded"):
            page.locator("a.left-prev").click()
        backward.append(doc_of(page.url, site))
    context.close()
    assert backward == PAGES[::-1], f"'previous' visits {backward}"
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


def test_sidebar_lists_the_toc_and_navigates(browser, site, visits):
    for doc, info in pages_of(visits).items():
        listed = [doc_of(urldefrag(h)[0], site) for h in info["sidebar"]]
        listed = [d if d else PAGES[0] for d in listed]
        assert [d for d in listed if d != PAGES[0]] == PAGES[1:], (
            f"{doc}: the sidebar lists {listed}, the toc {PAGES}")
    target = CHAPTER3 or PAGES[-1]
    # On a phone the sidebar is folded away: open it with its toggle, then follow a link.
    context, page, watch = open_page(browser, site, PHONE)
    page.goto(f"{site}{PAGES[0]}.html")
    link = link_to(page, "nav.bd-docs-nav a.reference", f"{site}{target}.html")
    assert not link.is_visible(), "at 390 px the sidebar should start folded away"
    page.locator("button.primary-toggle").first.click()
    link.wait_for(state="visible")
    link.click()
    page.wait_for_url(f"{site}{target}.html")
    context.close()
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_chapter_link_to_graded_notebook(browser, site, visits, chapter):
    """The chapter shows a working link to its graded notebook (on the repository)."""
    expected = f"exercises/{chapter}/{chapter}.ipynb"
    docs = [d for d in CHAPTERS[chapter]
            if any(graded_target(h) == expected for h in pages_of(visits)[d]["links"])]
    assert docs, f"no page of {chapter} links {expected}"
    assert (ROOT / expected).is_file(), f"{expected} does not exist: run `make exercises`"
    context, page, watch = open_page(browser, site)
    # A link to the repository leaves the site: answer it with a stand-in page instead of the
    # network, and check where the click went.
    landed = []
    context.route(re.compile(r"^https://"), lambda route: (
        landed.append(route.request.url),
        route.fulfill(status=200, content_type="text/html", body="<h1>notebook</h1>")))
    page.goto(f"{site}{docs[0]}.html")
    link = page.locator(f'a[href$="{expected}"]').first
    link.scroll_into_view_if_needed()
    assert link.is_visible(), f"{docs[0]}: the link to {expected} is not visible"
    href = link.evaluate("a => a.href")
    if href.startswith(site):    # a notebook published with the site: it must be served
        assert json.loads(fetch(href))["cells"], f"{href} is not a notebook"
    else:
        assert href == repository_blob_prefix() + expected, (
            f"{docs[0]} links {href}, not the repository's {expected}")
        link.click()
        page.wait_for_load_state("load")
        assert landed and landed[-1] == href, f"clicking the link went to {landed}"
    context.close()
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


@pytest.mark.parametrize("doc", NOTEBOOKS)
def test_notebook_download_is_served(site, visits, doc):
    links = [h for h in pages_of(visits)[doc]["downloads"] if h.endswith(".ipynb")]
    assert links, f"{doc}: no .ipynb in the download menu"
    notebook = json.loads(fetch(links[0]))
    assert notebook["cells"] and notebook["nbformat"] == 4, f"{links[0]} is not a notebook"
    sources = [h for h in pages_of(visits)[doc]["downloads"] if h.endswith(".md")]
    assert sources and fetch(sources[0]).strip(), f"{doc}: no .md download"


def test_notebook_download_button_downloads(browser, site):
    """Open chapter 3's download menu and click .ipynb: the browser saves the notebook."""
    doc = CHAPTER3 or NOTEBOOKS[0]
    context, page, watch = open_page(browser, site)
    page.goto(f"{site}{doc}.html")
    page.locator(".dropdown-download-buttons button.dropdown-toggle").click()
    with page.expect_download() as download:
        page.locator(".dropdown-download-buttons a.btn-download-notebook-button").click()
    saved = Path(download.value.path())
    notebook = json.loads(saved.read_text())
    context.close()
    assert download.value.suggested_filename == f"{Path(doc).name}.ipynb"
    assert any(c.get("outputs") for c in notebook["cells"]), "the download is not executed"
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


@pytest.mark.skipif(CHAPTER3 is None, reason="chapter 3 is not in _toc.yml")
def test_search_finds_a_chapter_3_term(browser, site, visits):
    chapter3 = [d for d in PAGES if Path(d).parent == Path(CHAPTER3).parent]
    assert any(SEARCH_TERM in source_of(d).read_text() for d in chapter3), (
        f"{SEARCH_TERM!r} no longer appears in chapter 3: choose another SEARCH_TERM")
    context, page, watch = open_page(browser, site)
    page.goto(f"{site}search.html?q={SEARCH_TERM}")
    page.wait_for_function("""() => {
        const summary = document.querySelector('#search-results .search-summary');
        return summary && !/Preparing|Searching/.test(summary.textContent)
                       && document.querySelector('#search-results ul.search'); }""")
    results = page.eval_on_selector_all("#search-results ul.search li a",
                                        "as => as.map(a => a.href)")
    context.close()
    hits = {doc_of(urldefrag(h)[0], site) for h in results}
    assert hits & set(chapter3), f"searching {SEARCH_TERM!r} found {sorted(hits)}, no ch. 3 page"
    assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))


# ---------------------------------------------------------------- readability, at 1280 px

def readable(visits) -> dict:
    return {doc: info["readable"] for doc, info in pages_of(visits).items()}


def report(found: dict) -> str:
    return "\n".join(f"{doc}: {item}" for doc, items in found.items() for item in items)


def assert_no_page_has(visits, problem: str, what: str, most: int | None = None) -> None:
    """Fail with the pages whose readability check ``problem`` found something (at most
    ``most`` items a page), under the heading ``what``."""
    found = {doc: r[problem][:most] for doc, r in readable(visits).items() if r[problem]}
    assert not found, f"{what}:\n" + report(found)


def test_no_raw_pipe_tables(visits):
    """A Markdown table must reach the reader as a table, not as a paragraph of | text."""
    assert_no_page_has(visits, "pipes", "raw pipe-table text on the page")


def test_no_object_reprs(visits):
    """No '<... at 0x7f...>': an object's address is noise, and changes with every build."""
    assert_no_page_has(visits, "reprs", "object reprs printed on the page")


def test_display_equations_fit_the_column(visits):
    """Every displayed formula is visible whole, within the article's column."""
    assert_no_page_has(visits, "clipped", "display equations clipped or wider than the column")


def test_code_and_outputs_do_not_scroll_sideways(visits):
    """Code lines (at most 88 characters) and printed outputs fit the column."""
    assert_no_page_has(visits, "scrolling", "blocks that scroll sideways at 1280 px")


def test_figures_are_drawn_at_the_column_width(visits):
    """A figure shown at less than 1/1.3 of its drawn width has its labels shrunk with it."""
    assert_no_page_has(visits, "shrunk", "figures shrunk by 1.3x or more")


def table_calls(doc: str) -> int:
    """How many tables the page's code cells show (show_table, or a Markdown display)."""
    return sum(len(re.findall(r"\bshow_table\(|\bMarkdown\(", cell))
               for _, cell in code_cells(doc))


def test_result_tables_are_tables(visits):
    """Every table a code cell shows is an HTML <table>, chapter 5's result tables included."""
    pages = readable(visits)
    missing = {doc: f"shows {table_calls(doc)} tables, the page has {r['output_tables']}"
               for doc, r in pages.items() if r["output_tables"] < table_calls(doc)}
    assert not missing, "\n".join(f"{doc}: {m}" for doc, m in missing.items())
    chapter5 = [name for name in CHAPTERS if name.startswith("ch5-")]
    for name in chapter5:
        assert sum(table_calls(d) for d in CHAPTERS[name]) >= 1, f"{name} shows no table"
        assert sum(pages[d]["output_tables"] for d in CHAPTERS[name]) >= 1, (
            f"{name}'s result tables are not <table>s")


def test_glued_numbers_read_as_text(visits):
    """Numbers computed at build time are set like the prose around them, not in bold."""
    assert_no_page_has(visits, "bold_glue", "glued values set in bold", most=5)


def test_sections_number_in_reading_order(visits, site):
    """A chapter's sections are numbered N.1, N.2, ... in reading order across its pages; a
    chapter's further pages are pages of the chapter, not numbered like sections of its index
    page; the sidebar shows each page with the number of its heading."""
    pages = readable(visits)
    problems = []
    for name, docs in CHAPTERS.items():
        index = f"book/{name}/index"
        chapter = pages[index]["headings"][0]["number"]
        if not re.fullmatch(r"\d+", chapter):
            problems.append(f"{index}: the chapter's title is numbered {chapter!r}")
            continue
        section = subsection = 0
        for doc in [index] + [d for d in docs if d != index]:
            title, *rest = pages[doc]["headings"]
            if doc != index and title["number"]:
                problems.append(f"{doc}: the page is numbered {title['number']} like a section "
                                f"of {index}")
            for h in rest:
                if h["level"] == 2:
                    section, subsection = section + 1, 0
                    expected = f"{chapter}.{section}"
                else:
                    subsection += 1
                    expected = f"{chapter}.{section}.{subsection}"
                if h["number"] != expected:
                    problems.append(f"{doc}: {h['text']!r} is numbered {h['number']!r}, "
                                    f"in reading order it is {expected}")
                    break
    for doc, r in pages.items():
        listed = r["sidebar"].get(f"{site}{doc}.html")
        if listed is not None and listed != r["headings"][0]["number"]:
            problems.append(f"{doc}: the sidebar numbers it {listed!r}, its heading "
                            f"{r['headings'][0]['number']!r}")
    assert not problems, "\n".join(problems)


# At 390 px a formula may be wider than the screen: it must then scroll inside its box, with
# every part of it reachable, rather than be cut off.
PHONE_EQUATIONS = """() => [...document.querySelectorAll('mjx-container[display="true"]')]
  .map(box => {
    const math = box.querySelector('mjx-math');
    const outer = box.getBoundingClientRect(), inner = math.getBoundingClientRect();
    const style = getComputedStyle(box);
    const scrolls = ['auto', 'scroll'].includes(style.overflowX);
    const fits = inner.left >= outer.left - 1 && inner.right <= outer.right + 1;
    const reachable = scrolls && inner.left >= outer.left - 1
                      && box.scrollWidth >= Math.floor(inner.right - outer.left);
    return {id: (box.closest('.math') || box).id, fits, reachable,
            width: Math.round(inner.width), box: Math.round(outer.width)};
  }).filter(e => !e.fits && !e.reachable)"""


def test_pages_on_a_phone(browser, site):
    """At 390 px no page scrolls sideways as a whole, and every part of every formula can be
    reached (a wide one scrolls inside its own box)."""
    context, page, watch = open_page(browser, site, PHONE)
    found = {}
    for doc in PAGES:
        page.goto(f"{site}{doc}.html")
        settle(page)
        problems = [f"{e['id'] or 'equation'}: {e['width']} px in a {e['box']} px box, "
                    "partly out of reach" for e in page.evaluate(PHONE_EQUATIONS)]
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - window.innerWidth")
        if overflow > 1:
            problems.append(f"the page scrolls sideways by {overflow} px")
        if problems:
            found[doc] = problems
    context.close()
    assert not found, "at 390 px:\n" + report(found)


def test_screenshots(browser, site, visits, artifacts):
    """Phone and desktop screenshots of the title page and chapter 3 (artifacts, not asserts);
    the page must not scroll sideways on a phone."""
    shots = []
    for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        context, page, watch = open_page(browser, site, viewport)
        for doc in [PAGES[0]] + ([CHAPTER3] if CHAPTER3 else []):
            page.goto(f"{site}{doc}.html")
            settle(page)
            name = f"{doc.replace('/', '_')}-{label}.png"
            page.screenshot(path=str(artifacts / name))
            page.screenshot(path=str(artifacts / name.replace(".png", "-full.png")),
                            full_page=True)
            shots.append(name)
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, f"{doc} at {viewport['width']} px scrolls sideways by {overflow}"
        context.close()
        assert not watch.since((0, 0, 0, 0)), watch.since((0, 0, 0, 0))
    pages = pages_of(visits)
    summary = {
        "pages": len(pages),
        "figures": sum(img["figure"] for info in pages.values() for img in info["images"]),
        "images": sum(len(info["images"]) for info in pages.values()),
        "math_elements": sum(info["math"] for info in pages.values()),
        "typeset_equations": sum(info["mjx"] for info in pages.values()),
        "displayed_equations": sum(info["displayed"] for info in pages.values()),
        "blocked_requests": sum(p.startswith("blocked") for info in pages.values()
                                for p in info["problems"]),
        "seconds_to_visit_every_page": round(visits["_seconds"], 1),
        "screenshots": shots,
    }
    (artifacts / "browser-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nbrowser summary: {summary}")
