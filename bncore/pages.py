"""Presentation helpers for the reading pages: glued values and result tables.

The pages are executed when the book is built, with myst-nb, whose ``glue`` stores a value for
the ``{glue:text}`` references in the prose. A reader who downloads a page as a notebook, or
opens it in Colab, runs the same code without myst-nb, so the pages import these helpers
instead of myst-nb's:

- :func:`glue` calls ``myst_nb.glue`` where myst-nb is installed; elsewhere it shows the value
  when asked to display it, and does nothing otherwise.
- :func:`markdown_table` and :func:`show_table` show a table of results as a real table: a
  Markdown pipe table, which the book renders as HTML (``nb_render_markdown_format: myst`` in
  _config.yml) and Jupyter and Colab render as well.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def _myst_nb_glue() -> Callable[..., Any] | None:
    """myst_nb.glue, or None where myst-nb cannot be imported."""
    try:
        return importlib.import_module("myst_nb").glue
    except ImportError:
        return None


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:   # plain Python, no IPython: print the value instead
        print(obj)
        return
    display(obj)


def glue(name: str, value: Any, display: bool = True) -> None:
    """Store ``value`` under ``name`` for ``{glue:text}`name`` in the book's prose.

    In the book this is ``myst_nb.glue(name, value, display)``. Outside it (no myst-nb), the
    value is displayed when ``display`` is true, as the book would show it, and nothing
    visible happens otherwise.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"glue needs a non-empty string name, got {name!r}")
    myst_glue = _myst_nb_glue()
    if myst_glue is not None:
        myst_glue(name, value, display=display)
    elif display:
        _display(value)


def _cell(value: Any) -> str:
    text = str(value)
    if "\n" in text:
        raise ValueError(f"a table cell cannot span lines: {text!r}")
    return text.replace("|", r"\|")


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A Markdown pipe table: ``header`` (k cells) over ``rows`` (each k cells), as text.

    Cells are turned into text with ``str``; format numbers before passing them in.
    """
    header = [_cell(h) for h in header]
    if not header:
        raise ValueError("a table needs at least one column")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for i, row in enumerate(rows):
        cells = [_cell(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row {i} has {len(cells)} cells, the header {len(header)}: {row}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def show_table(table: str, caption: str | None = None) -> None:
    """Show a Markdown pipe table (from :func:`markdown_table`) as a table, with an optional
    caption above it.

    The book renders the output as HTML (``nb_render_markdown_format: myst``); Jupyter, Colab
    and VS Code render Markdown outputs themselves.
    """
    lines = table.strip().splitlines()
    if len(lines) < 2 or not lines[0].lstrip().startswith("|") or "---" not in lines[1]:
        raise ValueError("show_table needs a Markdown pipe table (a header row, then a "
                         f"separator row of ---): got {table[:80]!r}")
    text = "\n".join(lines)
    if caption:
        text = f"{caption}\n\n{text}"
    try:
        from IPython.display import Markdown
    except ImportError:   # plain Python: the Markdown text is still a readable table
        print(text)
        return
    _display(Markdown(text))
