"""What every HTML page of cfexplain writes with: escaped text and numbers for a table cell."""

from __future__ import annotations

import html
import math
from typing import Any


def esc(value: Any) -> str:
    """``value`` as HTML-escaped text (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = ".3f") -> str:
    """A float as ``spec`` (NaN as a dash), anything else as ``str``."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else format(value, spec)
    return str(value)


def notes_html(notes: Any) -> str:
    """Each note as ``<p class="note">``, escaped."""
    return "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def facts_table(facts: Any, spec: str = ".3f") -> str:
    """A two-column ``<table>`` of ``{name: value}``, values through :func:`fmt`."""
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(fmt(v, spec))}</td></tr>" for k, v in facts.items()
    )
    return f"<table>{rows}</table>"


def page(title: str, css: str, heading: str, header: str, body: str) -> str:
    """The skeleton of every cfexplain page: one self-contained file (inline ``css``, no
    network), titled ``title``, a ``<header>`` with the ``heading`` and the ``header`` HTML (the
    facts, notes, links), then ``body``. ``title`` and ``heading`` are plain text; ``header`` and
    ``body`` are HTML, escaped by the caller where they hold user strings."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{css}</style></head><body>\n"
        f"<header><h1>{esc(heading)}</h1>{header}</header>\n{body}</body></html>\n"
    )
