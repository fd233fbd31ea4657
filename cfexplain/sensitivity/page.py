"""Drawing sweeps: per transformation a plot, a strip of transformed images, a GIF; one page.

:func:`write_report` writes ``sensitivity.csv``, ``summary.json`` and a self-contained
``index.html`` (relative paths, inline CSS, no network); every string that came from a config or
a file is HTML-escaped. Computing the sweeps lives in ``analysis``; this module only draws.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cfexplain.sensitivity.analysis import SweepResult, result_rows
from cfexplain.utils.artifacts import write_bytes, write_json, write_text
from cfexplain.utils.images import animated_gif, to_uint8, upscale
from cfexplain.utils.markup import esc, facts_table, fmt, notes_html, page

# Mask colours (RGB), one per class in channel order, repeating past the end.
PALETTE = ((230, 57, 70), (42, 157, 143), (244, 162, 97), (69, 123, 157), (155, 93, 229))


def tiles_rgb(images: torch.Tensor, masks: torch.Tensor | None = None) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] (and bool masks ``[N, K, H, W]``, tinted over) -> uint8 ``[N, H, W, 3]``."""
    arr = to_uint8(images)
    rgb = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    if masks is None:
        return rgb
    out = rgb.astype(np.float32)
    for k in range(masks.shape[1]):
        m = masks[:, k].cpu().numpy()[..., None]
        colour = np.array(PALETTE[k % len(PALETTE)], np.float32)
        out = np.where(m, 0.5 * out + 0.5 * colour, out)
    return out.round().clip(0, 255).astype(np.uint8)


def _label(result: SweepResult, i: int, e: int) -> str:
    """The output of example ``e`` at parameter ``i``: p for classifiers, mean Dice otherwise."""
    v = result.values[i, e]
    if result.task == "classification":
        return f"p={float(v[0]):.2f}"
    finite = v[~torch.isnan(v)]
    return f"Dice={float(finite.mean()):.2f}" if len(finite) else "Dice=–"


def strip_image(result: SweepResult, size: int = 64) -> Image.Image:
    """Examples (rows) along the parameter axis (columns), the output under each tile."""
    p_count, e_count = result.examples.shape[:2]
    text_h = 26
    cells = []
    for i in range(p_count):
        masks = result.example_masks[i] if result.example_masks is not None else None
        cells.append([upscale(t, size) for t in tiles_rgb(result.examples[i], masks)])
    w, h = cells[0][0].size
    out = Image.new("RGB", (p_count * (w + 2), e_count * (h + text_h)), "white")
    draw = ImageDraw.Draw(out)
    for i in range(p_count):
        for e in range(e_count):
            x0, y0 = i * (w + 2), e * (h + text_h)
            out.paste(cells[i][e], (x0, y0))
            draw.text((x0 + 2, y0 + h + 1), f"{result.params[i]:g}", fill="black")
            draw.text((x0 + 2, y0 + h + 13), _label(result, i, e), fill="black")
    return out


def gif_bytes(result: SweepResult, size: int = 64, duration_ms: int = 300) -> bytes:
    """Animated GIF along the parameter axis (forward then back): the examples side by side."""

    frames = []
    for i in range(len(result.params)):
        masks = result.example_masks[i] if result.example_masks is not None else None
        tiles = [np.asarray(upscale(t, size)) for t in tiles_rgb(result.examples[i], masks)]
        frames.append(np.concatenate(tiles, axis=1))
    return animated_gif(frames, duration_ms)


def plot_png(result: SweepResult) -> bytes:
    """Mean output against the parameter, ± one standard deviation over images, identity marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 2.5), dpi=90)
    ax = fig.add_subplot()
    m, s = result.mean().numpy(), result.spread().numpy()
    x = np.asarray(result.params)
    for o, name in enumerate(result.outputs):
        colour = np.array(PALETTE[o % len(PALETTE)]) / 255
        ax.plot(x, m[:, o], "o-", ms=3, color=colour, label=name)
        ax.fill_between(x, m[:, o] - s[:, o], m[:, o] + s[:, o], color=colour, alpha=0.18, lw=0)
    ax.axvline(result.identity, color="#888", lw=0.8, ls="--")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(f"{result.transform} ({result.unit})")
    ax.set_ylabel("p(target)" if result.task == "classification" else "Dice")
    if len(result.outputs) > 1:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_transform_files(result: SweepResult, out: Path, size: int = 64) -> dict[str, str]:
    """``<out>/<transform>/{plot.png, strip.png, sweep.gif}``; paths relative to ``out``."""
    folder = out / result.transform
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes(folder / "plot.png", plot_png(result))
    strip_image(result, size).save(folder / "strip.png", format="PNG")
    write_bytes(folder / "sweep.gif", gif_bytes(result, size))
    return {
        k: f"{result.transform}/{f}"
        for k, f in (("plot", "plot.png"), ("strip", "strip.png"), ("gif", "sweep.gif"))
    }


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
header{border-bottom:1px solid #ccc;margin-bottom:1em}
table{border-collapse:collapse}td,th{padding:1px 8px 1px 0;vertical-align:top;text-align:left}
section{background:#fff;border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.5em .7em}
section h2{margin:.1em 0 .3em;font-size:16px}.figs{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0}figure img{display:block;max-width:100%;image-rendering:pixelated}
figure.plot img{image-rendering:auto}figcaption{font-size:11px;color:#444}
.summary td{font-variant-numeric:tabular-nums}.note{color:#8a5300}
"""


def _section(result: SweepResult, files: Mapping[str, str]) -> str:
    rows = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(
            f"<td>{esc(fmt(s[k]))}</td>" for k in ("identity", "min", "max", "range", "worst")
        )
        + "</tr>"
        for name, s in result.summary().items()
    )
    table = (
        '<table class="summary"><tr><th>output</th><th>at identity</th><th>min</th><th>max</th>'
        f"<th>range</th><th>worst {esc(result.unit)}</th></tr>{rows}</table>"
    )
    figs = "".join(
        f'<figure class="{cls}"><img src="{esc(files[key])}" alt="{esc(cap)}"><figcaption>{esc(cap)}</figcaption></figure>'
        for key, cls, cap in (
            ("plot", "plot", "output vs parameter (mean ± std)"),
            ("gif", "gif", "sweep"),
            ("strip", "strip", "transformed images along the axis"),
        )
    )
    params = ", ".join(f"{p:g}" for p in result.params)
    return (
        f'<section id="{esc(result.transform)}"><h2>{esc(result.transform)}</h2>'
        f"<p>parameter: {esc(result.unit)} · values: {esc(params)}</p>{table}"
        f'<div class="figs">{figs}</div></section>\n'
    )


def page_html(
    header: Mapping[str, Any],
    results: Sequence[SweepResult],
    files: Mapping[str, Mapping[str, str]],
    notes: Sequence[str] = (),
) -> str:
    """The whole page: a header table, notes, then one section per transformation."""
    toc = " · ".join(f'<a href="#{esc(r.transform)}">{esc(r.transform)}</a>' for r in results)
    body = "".join(_section(r, files[r.transform]) for r in results)
    return page(
        f"cfexplain sensitivity · {header.get('run', '')}",
        _CSS,
        "cfexplain sensitivity analysis",
        f"{facts_table(header)}{notes_html(notes)}<p>{toc}</p>",
        f"<main>\n{body}</main>\n",
    )


def write_report(
    out: str | Path,
    results: Sequence[SweepResult],
    header: Mapping[str, Any],
    summary: Mapping[str, Any],
    notes: Sequence[str] = (),
    size: int = 64,
) -> tuple[Path, dict[str, dict[str, str]]]:
    """Every transformation's files, ``sensitivity.csv``, ``summary.json`` and ``index.html``.

    Returns the page's path and, per transformation, its files relative to ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {r.transform: write_transform_files(r, out, size) for r in results}
    buf = io.StringIO()
    columns = ["transform", "param", "output", "mean", "std", "images"]
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in results:
        writer.writerows(result_rows(r))
    write_text(out / "sensitivity.csv", buf.getvalue())
    write_json(
        out / "summary.json",
        {
            **summary,
            "transforms": {
                r.transform: {
                    "params": r.params,
                    "unit": r.unit,
                    "outputs": r.summary(),
                    "files": files[r.transform],
                }
                for r in results
            },
        },
    )
    index = write_text(out / "index.html", page_html(header, results, files, notes))
    return index, files
