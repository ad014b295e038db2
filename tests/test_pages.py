"""bncore.pages: the helpers the reading pages use instead of myst-nb's, in and out of the book."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from markdown_it import MarkdownIt

from bncore import pages


@pytest.fixture
def no_myst_nb(monkeypatch):
    """myst_nb made unimportable, as in a downloaded notebook or on Colab."""
    monkeypatch.setitem(sys.modules, "myst_nb", None)


@pytest.fixture
def shown(monkeypatch):
    """What the helpers display, in order."""
    out = []
    monkeypatch.setattr(pages, "_display", out.append)
    return out


def test_glue_without_myst_nb_displays_only_when_asked(no_myst_nb, shown):
    pages.glue("ch9_value", 0.25)
    pages.glue("ch9_hidden", 0.5, display=False)
    assert shown == [0.25]


def test_glue_without_myst_nb_or_ipython_prints(no_myst_nb, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    pages.glue("ch9_value", 17)
    pages.glue("ch9_hidden", 18, display=False)
    assert capsys.readouterr().out == "17\n"


def test_glue_records_what_myst_nb_glue_records(monkeypatch, shown):
    import IPython.display
    import myst_nb.ext.glue

    ours, theirs = [], []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: ours.append((a, k)))
    monkeypatch.setattr(myst_nb.ext.glue, "ipy_display", lambda *a, **k: theirs.append((a, k)))
    for value, display in [(3, False), (0.25, True), ("a <b>", False), (np.float64(1.5), False),
                           (np.arange(3), True)]:
        pages.glue("ch9_value", value, display=display)
        myst_nb.ext.glue.glue("ch9_value", value, display=display)
    assert ours == theirs and len(ours) == 5
    assert shown == []   # recorded for myst-nb, not shown by us


def test_glue_in_the_book_does_not_import_myst_nb():
    # Importing myst_nb's glue imports nbformat and jsonschema: a second or two of every page.
    code = ("import sys\nfrom bncore.pages import glue\nglue('x', 1.5, display=False)\n"
            "print(sorted(m for m in ('myst_nb', 'nbformat', 'jsonschema') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_glue_rejects_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="name"):
        pages.glue(3, 1.0)


def rendered_cells(table: str) -> list[list[str]]:
    """The rows of the first table that a GFM Markdown renderer makes of `table`."""
    html = MarkdownIt("commonmark").enable("table").render(table)
    assert "<table>" in html, f"not rendered as a table:\n{html}"
    from html.parser import HTMLParser

    rows: list[list[str]] = []
    inside = False

    class Cells(HTMLParser):
        def handle_starttag(self, tag, attrs):
            nonlocal inside
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                rows[-1].append("")
                inside = True

        def handle_endtag(self, tag):
            nonlocal inside
            inside = inside and tag not in ("td", "th")

        def handle_data(self, data):
            if inside:
                rows[-1][-1] += data

    Cells().feed(html)
    return rows


def test_markdown_table_renders_as_a_table_with_the_same_cells():
    header = ["placement", "MLP", "CNN"]
    rows = [["no BN", "90.2 ± 1.1 [88.6, 91.8]", 92.3], ["a | b", "−0.2", ""]]
    table = pages.markdown_table(header, rows)
    assert rendered_cells(table) == [header, ["no BN", "90.2 ± 1.1 [88.6, 91.8]", "92.3"],
                                     ["a | b", "−0.2", ""]]


@pytest.mark.parametrize("header, rows, problem", [
    ([], [], "at least one column"),
    (["a", "b"], [["1"]], "row 0 has 1 cells"),
    (["a"], [["two\nlines"]], "cannot span lines"),
])
def test_markdown_table_rejects_a_malformed_table(header, rows, problem):
    with pytest.raises(ValueError, match=problem):
        pages.markdown_table(header, rows)


def test_show_table_displays_markdown_with_its_caption_above(shown):
    table = pages.markdown_table(["a", "b"], [[1, 2]])
    pages.show_table(table, caption="Two numbers.")
    (markdown,) = shown
    assert markdown.data.startswith("Two numbers.\n\n| a | b |")
    assert rendered_cells(markdown.data) == [["a", "b"], ["1", "2"]]


def test_show_table_rejects_text_that_is_not_a_pipe_table(shown):
    with pytest.raises(ValueError, match="pipe table"):
        pages.show_table("mean 3.2, std 0.4")
    assert shown == []
