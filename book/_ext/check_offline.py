"""Check that the built book needs no network: `python book/_ext/check_offline.py _build/html`.

Fails (exit status 1) when a page loads a script, a stylesheet, an image or a frame from another
host, or when the MathJax script or fonts a page refers to are missing from the build.
Ordinary links (<a href="https://...">) are fine: they are followed only when clicked.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

# (tag, attribute) pairs that the browser fetches while rendering the page.
FETCHED = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"),
           ("source", "src"), ("video", "src"), ("audio", "src"), ("embed", "src")}
MATHJAX_FONT = "mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff"


class Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") in {"canonical", "alternate", "search", "index",
                                                   "next", "prev", "author", "license"}:
            return  # not fetched to render the page
        for t, attr in FETCHED:
            if tag == t and attrs.get(attr):
                self.urls.append((tag, attrs[attr]))


def check(html_root: Path) -> list[str]:
    problems = []
    pages = sorted(html_root.rglob("*.html"))
    if not pages:
        return [f"no HTML pages under {html_root}"]
    mathjax_pages = 0
    for page in pages:
        if page.relative_to(html_root).parts[0] in {"mathjax", "_static", "_sources"}:
            continue  # assets (the theme ships Jinja templates as .html), not pages
        parser = Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        for tag, url in parser.urls:
            parts = urlsplit(url)
            where = page.relative_to(html_root)
            if parts.scheme in {"http", "https"} or url.startswith("//"):
                problems.append(f"{where}: <{tag}> loads {url} from the network")
            elif not parts.scheme and parts.path:
                target = (page.parent / parts.path).resolve()
                if not target.exists():
                    problems.append(f"{where}: <{tag}> refers to {url}, which is not in the build")
                if parts.path.endswith("tex-chtml.js"):
                    mathjax_pages += 1
    if mathjax_pages == 0:
        problems.append("no page loads the local MathJax (mathjax/tex-chtml.js)")
    if not (html_root / MATHJAX_FONT).is_file():
        problems.append(f"MathJax fonts missing: {MATHJAX_FONT}")
    return problems


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "_build/html")
    problems = check(root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"check_offline: {len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    print(f"check_offline: {root} loads nothing from the network; MathJax is local.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
