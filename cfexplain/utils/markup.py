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
