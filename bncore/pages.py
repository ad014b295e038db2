"""Presentation helpers for the reading pages: glued values and result tables.

The pages are executed when the book is built, with myst-nb, whose ``glue`` stores a value for
the ``{glue:text}`` references in the prose. A reader who downloads a page as a notebook, or
opens it in Colab, runs the same code without myst-nb, so the pages import these helpers
instead of myst-nb's:

- :func:`glue` records the value as ``myst_nb.glue`` does where myst-nb is installed (without
  importing it: that would cost a page one to two seconds, for one display call); elsewhere it
  shows the value when asked to display it, and does nothing otherwise.
- :func:`markdown_table` and :func:`show_table` show a table of results as a real table: a
  Markdown pipe table, which the book renders as HTML (``nb_render_markdown_format: myst`` in
  _config.yml) and Jupyter and Colab render as well.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

#: The MIME-type prefix of a value glued without being displayed: myst-nb's ``GLUE_PREFIX``
#: (myst_nb/ext/glue), the record format of papermill and scrapbook that myst-nb reads.
GLUE_PREFIX = "application/papermill.record/"


def _myst_nb_installed() -> bool:
    """Whether myst-nb can be imported, found without importing it."""
    try:
        return importlib.util.find_spec("myst_nb") is not None
    except (ImportError, ValueError):   # a broken or stand-in module
        return False


def _glue_record(name: str, value: object, display: bool) -> None:
    """What ``myst_nb.glue(name, value, display)`` does: display the value's MIME bundle with
    metadata ``{"scrapbook": {"name": name, "mime_prefix": prefix}}``, its MIME types prefixed
    by GLUE_PREFIX when it is not to be displayed. (Importing myst_nb.glue imports nbformat
    and jsonschema, which takes longer than all the rest of this call.)"""
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipython_display

    bundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipython_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)


def _display(obj: object) -> None:
    try:
        from IPython.display import display
    except ImportError:   # plain Python, no IPython: print the value instead
        print(obj)
        return
    display(obj)


def glue(name: str, value: object, display: bool = True) -> None:
    """Store ``value`` under ``name`` for ``{glue:text}`name`` in the book's prose.

    In the book (myst-nb installed) this does what ``myst_nb.glue(name, value, display)``
    does. Outside it (no myst-nb), the value is displayed when ``display`` is true, as the book
    would show it, and nothing visible happens otherwise.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"glue needs a non-empty string name, got {name!r}")
    if _myst_nb_installed():
        _glue_record(name, value, display)
    elif display:
        _display(value)


def _cell(value: object) -> str:
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
