"""The inspect page: one self-contained ``index.html`` (inline CSS, relative image paths, no
network) made of sections. Every string from a config, a file or a model (layer names, class
names, an expert's unit names) is HTML-escaped here; callers pass plain text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cfexplain.utils.markup import esc as e
from cfexplain.utils.markup import fmt as _fmt
from cfexplain.utils.markup import notes_html, page

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:.15em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
figure{display:inline-block;margin:.3em;text-align:center;vertical-align:top}
figure img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}
figcaption{font-size:.75em;color:#555;max-width:22em}
.note{background:#fff6d5;border-left:4px solid #e0b000;padding:.3em .6em;font-size:.9em}
nav a{margin-right:1em}
"""


def fmt(v: Any) -> str:
    return _fmt(v, ".4g")


def figure(src: str, caption: str, width: int | None = None) -> str:
    size = f' width="{int(width)}"' if width else ""
    return (
        f'<figure><img src="{e(src)}" alt="{e(caption)}"{size}>'
        f"<figcaption>{e(caption)}</figcaption></figure>"
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], raw: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped except in the column indices ``raw`` (already HTML)."""
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{v if i in raw else e(fmt(v))}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


@dataclass
class Section:
    key: str  # anchor id: one of the `what` names
    title: str
    body: str  # HTML, already escaped where it holds user strings
    notes: list[str] = field(default_factory=list)


def page_html(
    title: str, header: Mapping[str, Any], sections: Sequence[Section], notes: Sequence[str] = ()
) -> str:
    """The whole page: a header table, a table of contents, then each section."""
    head = table(["", ""], [[k, v] for k, v in header.items()])
    nav = " ".join(f'<a href="#{e(s.key)}">{e(s.title)}</a>' for s in sections)
    parts = [
        f'<section id="{e(s.key)}"><h2>{e(s.title)}</h2>{notes_html(s.notes)}{s.body}</section>'
        for s in sections
    ]
    header_html = f"{head}{notes_html(notes)}<nav>{nav}</nav>"
    return page(title, _CSS, title, header_html, "\n".join(parts) + "\n")
