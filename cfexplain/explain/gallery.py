"""Drawing explanations: heatmap colours, per-image PNG strip, GIF and plot, and the HTML gallery.

Computing maps lives in ``attribution``; this module only draws. :class:`GalleryWriter` streams:
each :meth:`GalleryWriter.add` writes one image's files, appends its ``metrics.csv`` row and its
HTML row to disk and rewrites ``index.html``, so memory holds one batch, never the whole set.
The page is self-contained (relative paths, inline CSS and script, no network); every string that
came from a file name or a config is HTML-escaped.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from cfexplain.explain.attribution import normalise
from cfexplain.explain.guard import EVIDENCE_GRID, cell_region
from cfexplain.utils.artifacts import write_bytes, write_json, write_text
from cfexplain.utils.images import animated_gif, to_uint8, upscale
from cfexplain.utils.markup import esc, facts_table, fmt, notes_html, page

ROWS_FILE = "rows.html.part"
UNCHECKED = "unchecked"
# What a flagged row says, in plain words, above everything else it shows.
WARNINGS = {
    "unlike the training data": "This image does not look like the images the model was "
    "trained on; its explanation should not be trusted.",
    "reconstruction read differently": "The model reads the generator's redrawing of this "
    "image differently from the image itself: the counterfactual explains another image.",
}  # the HTML rows so far, one per image, appended batch by batch


# ----------------------------------------------------------------------------- colours


# Display maps are scaled by this quantile of |value| (see attribution.normalise).
DISPLAY_QUANTILE = 0.995


def colorize(maps: Tensor, signed: bool) -> np.ndarray:
    """``[N, 1, H, W]`` raw maps -> uint8 RGB ``[N, H, W, 3]`` on the shared display scale.

    Signed maps use a diverging colormap centred on zero (blue negative, red positive);
    unsigned maps a sequential one from black.
    """
    from matplotlib import colormaps

    scaled = normalise(maps, signed, DISPLAY_QUANTILE)[:, 0].cpu().numpy()
    if signed:
        rgba = colormaps["RdBu_r"]((scaled + 1) / 2)
    else:
        rgba = colormaps["inferno"](scaled)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def gray_rgb(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 RGB ``[N, H, W, 3]`` (gray repeated)."""
    arr = to_uint8(images)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def overlay(images: Tensor, maps: Tensor, signed: bool, alpha: float = 0.55) -> np.ndarray:
    """Heatmaps blended over the inputs: uint8 ``[N, H, W, 3]``; opacity grows with |value|."""
    base = gray_rgb(images).astype(np.float32)
    heat = colorize(maps, signed).astype(np.float32)
    # sqrt: weak but real structure stays visible; the colour still carries the value.
    mag = normalise(maps, signed, DISPLAY_QUANTILE)[:, 0].abs().cpu().numpy()[..., None]
    weight = np.sqrt(mag) * alpha
    return (base * (1 - weight) + heat * weight).round().clip(0, 255).astype(np.uint8)


def _save_png(img: Image.Image, path: Path) -> None:
    # Plain writes: a gallery image is cheap to redo, and fsync per file would dominate the time.
    img.save(path, format="PNG")


# ----------------------------------------------------------------------------- per image


@dataclass
class Concepts:
    """A concept-capsule classifier's reading of one image, in its attributes' names.

    Attributes:
        names: the attribute capsules' names ``[A]``.
        values: their readings (capsule lengths) ``[A]`` in [0, 1).
        truth: the ground truth ``[A]`` (the data's ``meta["concepts"]``), None without one.
        images: ``[A, C, H, W]`` the image redrawn by the decoder from each capsule alone.
        frames: per counterfactual frame, the readings ``[K][A]`` (None without frames).
    """

    names: list[str]
    values: list[float]
    truth: list[float] | None = None
    images: Tensor | None = None
    frames: list[list[float]] | None = None


@dataclass
class AttributeStrip:
    """One StyleSpace attribute walked over one image: ``frames [F, C, H, W]`` at ``steps`` (units
    of the attribute's shift d; 0 is the reconstruction) with f's probability of the target."""

    label: str
    frames: Tensor
    steps: Sequence[float]
    probs: Sequence[float]


@dataclass
class Row:
    """Everything drawn for one image. Tensors are on any device; maps are raw (not normalised).

    Attributes:
        name: display name (a file name or ``test #i``); escaped when written.
        image: ``[C, H, W]`` in [-1, 1].
        prob: f's probability of the target class for the input.
        pred, true: predicted / true class names (``true`` None for unlabelled files).
        reconstruction: ``[C, H, W]`` G(E(x)), or None without the counterfactual stages.
        frames: ``[K, C, H, W]`` counterfactual frames; ``lambdas`` and ``frame_probs`` ``[K]``.
        flip: index of the first frame whose decision differs from the reconstruction's, -1 none.
        recon_prob: f's probability of the target for the reconstruction (the flip's reference).
        difference: ``[1, H, W]`` flipping frame minus reconstruction (signed).
        effect: ``[1, H, W]`` where the classifier reacts to the change from the reconstruction
            to the sequence's strongest frame (signed: positive carries it there;
            :func:`cfexplain.explain.metrics.square_values`), or None.
        focused: ``[C, H, W]`` the reconstruction with only those changes (the squares that
            carry most of f's move, :func:`cfexplain.explain.metrics.focused_change`), and
            ``focused_score`` f's probability of the target for it (ordinal walks: its expected
            grade); None without ``effect``.
        maps: method name -> (raw map ``[1, H, W]``, signed).
        drawn: method name -> its own picture, used instead of the overlay.
        metrics: per-image numbers for metrics.csv and the page.
        frame_grades: ordinal walks: ``[K]`` expected grade Σ k·p_k of every frame;
            ``frame_argmax`` ``[K]`` its most probable grade; ``grade_names`` the class names
            of the grades in order; ``recon_grade`` the reconstruction's expected grade.
        report: the report written for the image, with a map per finding word (``report``).
    """

    name: str
    image: Tensor
    prob: float
    pred: str
    true: str | None = None
    reconstruction: Tensor | None = None
    frames: Tensor | None = None
    lambdas: Sequence[float] | None = None
    frame_probs: Sequence[float] | None = None
    flip: int = -1
    recon_prob: float | None = None
    difference: Tensor | None = None
    effect: Tensor | None = None
    focused: Tensor | None = None
    focused_score: float | None = None
    maps: dict[str, tuple[Tensor, bool]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Maps that draw themselves (the dominant-class map's colours): uint8 RGB [H, W, 3].
    drawn: dict[str, np.ndarray] = field(default_factory=dict)
    # The guard's verdict (cfexplain.explain.guard.Verdict); None when the image went unchecked.
    guard: Any = None
    frame_grades: Sequence[float] | None = None
    frame_argmax: Sequence[int] | None = None
    grade_names: Sequence[str] = ()
    recon_grade: float | None = None
    # A capsule classifier's attribute readings (None for other classifiers).
    concepts: Concepts | None = None
    # The generated report (cfexplain.explain.reporter.WrittenReport): text and word maps.
    report: Any = None
    # The image's top StyleSpace attribute counterfactuals, best first.
    attributes: list[AttributeStrip] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The guard's status, ``"unchecked"`` without a guard."""
        return self.guard.status if self.guard is not None else UNCHECKED

    @property
    def has_counterfactual(self) -> bool:
        return self.frames is not None

    @property
    def is_ordinal(self) -> bool:
        """An ordinal walk: every frame carries its expected and most probable grade."""
        return self.frames is not None and self.frame_grades is not None

    def frame_caption(self, k: int) -> str:
        """What is written under frame ``k`` besides λ: p(target), or for an ordinal walk the
        expected grade and the most probable class (ASCII: the strip's font has no Σ)."""
        if self.is_ordinal:
            assert self.frame_grades is not None and self.frame_argmax is not None
            return f"E={self.frame_grades[k]:.2f} {self.grade_names[self.frame_argmax[k]]}"
        assert self.frame_probs is not None
        return f"p={self.frame_probs[k]:.2f}"

    @property
    def focused_caption(self) -> str:
        """p(target) (ordinal walks: the expected grade) of the focused counterfactual and the
        share of f's move it reproduces."""
        share = self.metrics.get("focus_sufficiency", math.nan)
        moved = "" if math.isnan(share) else f" ({100 * share:.0f}%)"
        return f"{'E' if self.is_ordinal else 'p'}={self.focused_score:.2f}{moved}"


def _map_rgb(row: Row, name: str, m: Tensor, signed: bool) -> np.ndarray:
    drawn = row.drawn.get(name)
    return drawn if drawn is not None else overlay(row.image[None], m[None], signed)[0]


EVIDENCE_RGB = (230, 30, 30)


def mark_cell(rgb: np.ndarray, cell: int, grid: int) -> np.ndarray:
    """A copy of ``rgb [H, W, 3]`` with cell ``cell`` (row-major) of a ``grid`` x ``grid``
    partition (:func:`~cfexplain.explain.guard.cell_region`) outlined in red, one pixel wide."""
    out = rgb.copy()
    h, w = out.shape[:2]
    rows, cols = cell_region(cell, h, w, grid)
    out[[rows.start, rows.stop - 1], cols] = EVIDENCE_RGB
    out[rows, [cols.start, cols.stop - 1]] = EVIDENCE_RGB
    return out


def outlined_rgb(image: Tensor, verdict: Any) -> np.ndarray:
    """``image [C, H, W]`` as RGB, with the region the generator does not redraw (the guard
    ``verdict``'s ``evidence_loss`` cell) outlined when it named one."""
    rgb = gray_rgb(image[None])[0]
    cell = getattr(verdict, "cell", None)
    return rgb if cell is None else mark_cell(rgb, cell, EVIDENCE_GRID)


def input_rgb(row: Row) -> np.ndarray:
    """The row's input as RGB, outlined where the guard says G does not redraw it."""
    return outlined_rgb(row.image, row.guard)


def strip_image(row: Row, size: int = 96) -> Image.Image:
    """One PNG strip: input | reconstruction | frames with p(target) under each | difference |
    every map over the input."""
    tiles = [(input_rgb(row), "input", f"p={row.prob:.2f}")]
    if row.has_counterfactual:
        rp = f"p={row.recon_prob:.2f}" if row.recon_prob is not None else ""
        if row.is_ordinal and row.recon_grade is not None:
            rp = f"E={row.recon_grade:.2f}"
        tiles.append((gray_rgb(row.reconstruction[None])[0], "G(E(x))", rp))
        frames = gray_rgb(row.frames)
        for k, (frame, lam) in enumerate(zip(frames, row.lambdas)):
            mark = " *" if k == row.flip and not row.is_ordinal else ""
            # ASCII: the default PIL font has no λ glyph.
            tiles.append((frame, f"lam {lam:+.1f}{mark}", row.frame_caption(k)))
        if row.difference is not None:
            tiles.append((colorize(row.difference[None], signed=True)[0], "flip - G(E(x))", ""))
        if row.effect is not None:
            tiles.append((colorize(row.effect[None], signed=True)[0], "f reacts to", ""))
        if row.focused is not None:
            tiles.append((gray_rgb(row.focused[None])[0], "only that", row.focused_caption))
    for name, (m, signed) in row.maps.items():
        tiles.append((_map_rgb(row, name, m, signed), name[:14], ""))
    c = row.concepts
    if c is not None and c.images is not None:
        for name, value, pic in zip(c.names, c.values, gray_rgb(c.images), strict=True):
            tiles.append((pic, name[:14], f"{value:.2f}"))
    return tiles_image(tiles, size)


def attribute_strip_image(a: AttributeStrip, size: int = 96) -> Image.Image:
    """One attribute's frames side by side, its step (d units) over and p(target) under each."""
    tiles = [
        (frame, f"{step:+.2f} d", f"p={p:.2f}")
        for frame, step, p in zip(gray_rgb(a.frames), a.steps, a.probs)
    ]
    return tiles_image(tiles, size)


def tiles_image(tiles: Sequence[tuple[np.ndarray, str, str]], size: int = 96) -> Image.Image:
    """uint8 RGB tiles ``[H, W, 3]`` in a row, two short lines of text under each."""
    imgs = [upscale(t, size) for t, _, _ in tiles]
    w, h = imgs[0].size
    text_h = 26
    out = Image.new("RGB", (len(imgs) * (w + 2), h + text_h), "white")
    draw = ImageDraw.Draw(out)
    for i, (img, (_, top, bottom)) in enumerate(zip(imgs, tiles)):
        out.paste(img, (i * (w + 2), 0))
        draw.text((i * (w + 2) + 2, h + 1), top, fill="black")
        draw.text((i * (w + 2) + 2, h + 13), bottom, fill="black")
    return out


def gif_bytes(frames: Tensor, size: int = 128, duration_ms: int = 150) -> bytes:
    """Animated GIF of ``[K, C, H, W]`` frames, forward then back, looping."""

    # Gray frames stay single-channel: a GIF palette then holds every gray level exactly.
    u8 = to_uint8(frames)
    arr = [np.asarray(upscale(f[..., 0] if f.shape[-1] == 1 else f, size)) for f in u8]
    return animated_gif(arr, duration_ms)


def plot_png(lambdas: Sequence[float], probs: Sequence[float], flip: int, target: str) -> bytes:
    """Probability of ``target`` against λ (matplotlib, Agg), the 0.5 line and the flip marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6, 1.9), dpi=80)
    ax = fig.add_subplot()
    ax.plot(lambdas, probs, "o-", color="#1f5fa8", ms=3)
    ax.axhline(0.5, color="#888", lw=0.8, ls="--")
    if flip >= 0:
        ax.plot([lambdas[flip]], [probs[flip]], "o", color="#c0392b", ms=6)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("λ")
    ax.set_ylabel(f"p({target})")
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def grade_plot_png(
    lambdas: Sequence[float],
    grades: Sequence[float],
    argmax: Sequence[int],
    num_grades: int,
    xlabel: str = "λ",
) -> bytes:
    """Expected grade (line) and most probable grade (steps) against λ along an ordinal walk."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6, 1.9), dpi=80)
    ax = fig.add_subplot()
    ax.step(lambdas, argmax, where="mid", color="#c0392b", lw=1, label="argmax")
    ax.plot(lambdas, grades, "o-", color="#1f5fa8", ms=3, label="Σk·p_k")
    ax.set_ylim(-0.2, num_grades - 0.8)
    ax.set_yticks(range(num_grades))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("grade")
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_row_files(row: Row, folder: Path, target: str, size: int = 96) -> dict[str, Any]:
    """Write one image's PNGs (input, reconstruction, frames, difference, overlays), strip, GIF
    and plot into ``folder``; return their paths relative to ``folder.parent.parent``."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = f"{folder.parent.name}/{folder.name}"
    files: dict[str, Any] = {"frames": [], "maps": {}}

    def put(name: str, img: Image.Image) -> str:
        _save_png(img, folder / name)
        return f"{rel}/{name}"

    files["input"] = put("input.png", upscale(input_rgb(row), size))
    for name, (m, signed) in row.maps.items():
        files["maps"][name] = put(f"map_{name}.png", upscale(_map_rgb(row, name, m, signed), size))
    files["strip"] = put("strip.png", strip_image(row, size))
    if row.concepts is not None and row.concepts.images is not None:
        files["concepts"] = {}
        for k, (name, pic) in enumerate(zip(row.concepts.names, gray_rgb(row.concepts.images))):
            buf = io.BytesIO()
            upscale(pic, size).save(buf, format="PNG")
            write_bytes(folder / f"capsule_{k:02d}.png", buf.getvalue())
            files["concepts"][name] = f"{rel}/capsule_{k:02d}.png"
    if row.report is not None:
        files["words"] = {
            col: put(
                f"{col}.png",
                upscale(overlay(row.image[None], wm.attention[None, None], False)[0], size),
            )
            for col, wm in row.report.word_columns()
        }
    if row.has_counterfactual:
        files["reconstruction"] = put(
            "reconstruction.png", upscale(gray_rgb(row.reconstruction[None])[0], size)
        )
        for k, frame in enumerate(gray_rgb(row.frames)):
            files["frames"].append(put(f"frame_{k:02d}.png", upscale(frame, size)))
        if row.difference is not None:
            diff = colorize(row.difference[None], signed=True)[0]
            files["difference"] = put("difference.png", upscale(diff, size))
        if row.effect is not None:
            effect = colorize(row.effect[None], signed=True)[0]
            files["effect"] = put("effect.png", upscale(effect, size))
        if row.focused is not None:
            files["focused"] = put("focused.png", upscale(gray_rgb(row.focused[None])[0], size))
        gif = gif_bytes(row.frames, size)
        write_bytes(folder / "sequence.gif", gif)
        files["gif"] = f"{rel}/sequence.gif"
        png = plot_png(list(row.lambdas), list(row.frame_probs), row.flip, target)
        write_bytes(folder / "plot.png", png)
        files["plot"] = f"{rel}/plot.png"
        if row.is_ordinal:
            assert row.frame_grades is not None and row.frame_argmax is not None
            png = grade_plot_png(
                list(row.lambdas),
                list(row.frame_grades),
                list(row.frame_argmax),
                len(row.grade_names),
            )
            write_bytes(folder / "grade_plot.png", png)
            files["grade_plot"] = f"{rel}/grade_plot.png"
    files["attributes"] = [
        put(f"attribute_{k}.png", attribute_strip_image(a, size))
        for k, a in enumerate(row.attributes)
    ]
    return files


# ----------------------------------------------------------------------------- HTML


def _figure(src: str, caption: str, cls: str = "") -> str:
    return (
        f'<figure class="{cls}"><img src="{esc(src)}" alt="{esc(caption)}" loading="eager">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def row_html(row: Row, files: Mapping[str, Any], index: int) -> str:
    """One gallery row; ``data-*`` attributes carry what the page sorts and filters by."""
    flip = "n/a" if not row.has_counterfactual else ("yes" if row.flip >= 0 else "no")
    attrs = {
        "data-index": index,
        "data-name": row.name,
        "data-true": row.true if row.true is not None else "unknown",
        "data-pred": row.pred,
        "data-flip": flip,
        "data-prob": f"{row.prob:.6f}",
        "data-guard": row.status,
    }
    head = " ".join(f'{k}="{esc(v)}"' for k, v in attrs.items())
    cells = [_figure(files["input"], f"input · p={row.prob:.2f}", "input")]
    if row.has_counterfactual:
        rp = f" · p={row.recon_prob:.2f}" if row.recon_prob is not None else ""
        cells.append(_figure(files["reconstruction"], f"G(E(x)){rp}"))
        for k, (src, lam) in enumerate(zip(files["frames"], row.lambdas)):
            mark = " ★" if k == row.flip and not row.is_ordinal else ""
            cells.append(_figure(src, f"λ={lam:+.1f} {row.frame_caption(k)}{mark}", "frame"))
        if "difference" in files:
            cells.append(_figure(files["difference"], "flip − G(E(x))"))
        if "effect" in files:
            cells.append(_figure(files["effect"], "what f reacts to"))
        if "focused" in files:
            cells.append(_figure(files["focused"], f"only that · {row.focused_caption}"))
    for name, src in files["maps"].items():
        cells.append(_figure(src, name, "map"))
    if row.has_counterfactual:
        cells.append(_figure(files["plot"], "p vs λ", "plot"))
        if "grade_plot" in files:
            cells.append(_figure(files["grade_plot"], "grade vs λ", "plot"))
        cells.append(_figure(files["gif"], "sequence", "gif"))
    for name, src in files.get("concepts", {}).items():
        cells.append(_figure(src, f"capsule {name}", "capsule"))
    facts = [f"true: {esc(attrs['data-true'])}", f"pred: {esc(row.pred)}", f"flip: {flip}"]
    written = _report_html(row, files)
    facts += [f"guard: {esc(row.status)}"]
    facts += [f"{esc(k)}: {esc(fmt(v))}" for k, v in row.metrics.items()]
    flagged = row.guard is not None and row.guard.flagged
    return (
        f'<section class="row{" flagged" if flagged else ""}" {head}>\n'
        f"{guard_banner(row)}"
        f'<h3>{esc(row.name)}</h3><p class="facts">{" · ".join(facts)}'
        f' · <a href="{esc(files["strip"])}">strip</a></p>\n'
        f'<div class="cells">{"".join(cells)}</div>\n{concepts_html(row)}{written}'
        f"{attributes_html(row, files)}</section>\n"
    )


def _report_html(row: Row, files: Mapping[str, Any]) -> str:
    """The generated report under the image, and a heatmap per finding word (its sentence's
    attention; the word is the caption, with "(absent)" when its sentence denies it)."""
    if row.report is None:
        return ""
    figures = [
        _figure(files["words"][col], wm.word + ("" if wm.present else " (absent)"), "word")
        for col, wm in row.report.word_columns()
    ]
    return (
        f'<div class="report"><p class="report-text"><b>report:</b> {esc(row.report.text)}</p>'
        f'<div class="cells words">{"".join(figures)}</div></div>\n'
    )


def _bar(value: float) -> str:
    return f'<span class="bar" style="width:{max(0.0, min(1.0, value)) * 60:.0f}px"></span>'


def concepts_html(row: Row) -> str:
    """The attribute table of a capsule classifier's row (empty for other classifiers): each
    attribute's reading (with a bar) beside its ground truth, then its reading in every
    counterfactual frame."""
    c = row.concepts
    if c is None:
        return ""
    head = ["attribute", "reading", "truth"]
    if c.frames is not None and row.lambdas is not None:
        head += [
            f"λ={lam:+.1f}" + (" ★" if k == row.flip else "") for k, lam in enumerate(row.lambdas)
        ]
    lines = ["<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for a, name in enumerate(c.names):
        cells = [esc(name), f"{_bar(c.values[a])} {c.values[a]:.2f}"]
        cells.append("n/a" if c.truth is None else f"{_bar(c.truth[a])} {c.truth[a]:.2f}")
        if c.frames is not None and row.lambdas is not None:
            cells += [f"{frame[a]:.2f}" for frame in c.frames]
        lines.append(
            f'<tr data-attribute="{esc(name)}">' + "".join(f"<td>{v}</td>" for v in cells) + "</tr>"
        )
    return f'<table class="concepts">{"".join(lines)}</table>\n'


def answer_changes(probs: Sequence[float]) -> bool:
    """Whether some frame of an attribute strip lands on the other side of p = 0.5 from its
    middle frame (the reconstruction): the attribute alone changes the decision."""
    mid = probs[len(probs) // 2] >= 0.5
    return any((float(p) >= 0.5) != mid for p in probs)


def attributes_html(row: Row, files: Mapping[str, Any]) -> str:
    """The attribute strips of a row: one figure per attribute, p(target) from -d to +d, and
    whether it alone changes the decision."""
    if not row.attributes:
        return ""
    figs = []
    for k, (a, src) in enumerate(zip(row.attributes, files["attributes"])):
        probs = json.dumps([round(float(p), 4) for p in a.probs])
        flips = answer_changes(a.probs)
        figs.append(
            f'<figure class="attribute" data-attribute="{esc(a.label)}" data-probs="{esc(probs)}"'
            f' data-flips="{int(flips)}"><img src="{esc(src)}" alt="{esc(a.label)}" loading="eager">'
            f"<figcaption>{k + 1}. {esc(a.label)} · p {a.probs[0]:.2f} → {a.probs[-1]:.2f}"
            f"{' · flips the decision' if flips else ''}</figcaption></figure>"
        )
    return f'<div class="attributes">{"".join(figs)}</div>\n'


def guard_banner(row: Row) -> str:
    """The warning at the top of a flagged row: the status in plain words and its reasons."""
    if row.guard is None or not row.guard.flagged:
        return ""
    reasons = "".join(f"<li>{esc(r)}</li>" for r in row.guard.reasons)
    return (
        f'<div class="guard-banner" role="alert"><b>⚠ {esc(row.guard.status.capitalize())}.</b> '
        f"{esc(WARNINGS[row.guard.status])}<ul>{reasons}</ul></div>\n"
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
header{border-bottom:1px solid #ccc;margin-bottom:1em}
header table{border-collapse:collapse}header td{padding:1px 8px 1px 0;vertical-align:top}
.controls{margin:.6em 0}.controls button{margin:0 3px 3px 0;padding:2px 8px;border:1px solid #999;
background:#fff;border-radius:3px;cursor:pointer}.controls button.on{background:#1f5fa8;color:#fff}
.row{background:#fff;border:1px solid #ddd;border-radius:4px;margin:.6em 0;padding:.4em .6em}
.row h3{margin:.1em 0;font-size:15px}.facts{margin:.1em 0 .4em;color:#555;font-size:12px}
.cells{display:flex;flex-wrap:wrap;gap:4px}figure{margin:0;text-align:center}
figure img{display:block;width:96px;height:auto;image-rendering:pixelated}
figure.plot img{width:auto;height:96px;image-rendering:auto}
.attributes{display:flex;flex-direction:column;gap:2px;margin-top:4px}
figure.attribute{text-align:left}figure.attribute img{width:auto;height:122px}
figure.attribute figcaption{max-width:none}
figcaption{font-size:11px;color:#444;max-width:110px}.frame figcaption{font-variant-numeric:tabular-nums}
.note{color:#8a5300}
.row.flagged{border:2px solid #c0392b}.guard-banner{background:#fdecea;color:#7b1f14;
border-left:6px solid #c0392b;padding:.4em .6em;margin:.2em 0 .4em;font-size:14px}
.guard-banner ul{margin:.2em 0 0 1.2em;padding:0;font-size:12px}
table.concepts{border-collapse:collapse;font-size:12px;margin:.4em 0 .2em;font-variant-numeric:tabular-nums}
table.concepts td,table.concepts th{border:1px solid #ddd;padding:1px 6px;text-align:left}
table.concepts th{background:#f2f2f2}.bar{display:inline-block;height:8px;background:#1f5fa8;vertical-align:middle}
.report{margin:.3em 0 .1em}.report-text{margin:.1em 0 .3em;font-size:13px}
"""

_SCRIPT = """
(function(){
  var rows=Array.prototype.slice.call(document.querySelectorAll('section.row'));
  var active={true:'all',pred:'all',flip:'all',guard:'all'};
  var list=document.getElementById('rows'), count=document.getElementById('count');
  function apply(){
    var shown=0;
    rows.forEach(function(r){
      var ok=Object.keys(active).every(function(k){
        return active[k]==='all'||r.getAttribute('data-'+k)===active[k];});
      r.style.display=ok?'':'none'; if(ok){shown++;}
    });
    count.textContent=shown+' of '+rows.length+' shown';
  }
  document.querySelectorAll('.controls button[data-filter]').forEach(function(b){
    b.addEventListener('click',function(){
      var k=b.getAttribute('data-filter'); active[k]=b.getAttribute('data-value');
      document.querySelectorAll('.controls button[data-filter="'+k+'"]').forEach(function(o){
        o.classList.toggle('on',o===b);});
      apply();
    });
  });
  document.getElementById('sort').addEventListener('change',function(e){
    var key=e.target.value;
    rows.sort(function(a,b){
      if(key==='prob'){return parseFloat(b.getAttribute('data-prob'))-parseFloat(a.getAttribute('data-prob'));}
      if(key==='index'){return parseInt(a.getAttribute('data-index'))-parseInt(b.getAttribute('data-index'));}
      return a.getAttribute('data-'+key).localeCompare(b.getAttribute('data-'+key));
    });
    rows.forEach(function(r){list.appendChild(r);});
  });
  apply();
})();
"""


def _buttons(key: str, label: str, values: Sequence[str]) -> str:
    out = [f"<span>{esc(label)}:</span>"]
    for v in ["all", *values]:
        on = ' class="on"' if v == "all" else ""
        out.append(
            f'<button type="button" data-filter="{key}" data-value="{esc(v)}"{on}>{esc(v)}</button>'
        )
    return " ".join(out)


def page_html(
    header: Mapping[str, Any],
    rows: str,
    facets: Mapping[str, Sequence[str]],
    notes: Sequence[str] = (),
    links: Mapping[str, str] | None = None,
) -> str:
    """The whole page: a header table (run, classifier, metric summary), links (label -> relative
    href, e.g. the run's evaluation), filter buttons for every value seen in ``facets`` (true,
    pred, flip), a sort menu, and the rows."""
    note_html = notes_html(notes) + "".join(
        f'<p><a href="{esc(href)}">{esc(label)}</a></p>' for label, href in (links or {}).items()
    )
    controls = "<br>".join(
        _buttons(k, lbl, facets.get(k, []))
        for k, lbl in (
            ("guard", "guard"),
            ("true", "true label"),
            ("pred", "predicted"),
            ("flip", "flip"),
        )
    )
    body = (
        f'<div class="controls">{controls}<br><label>sort by <select id="sort">'
        '<option value="index">order</option><option value="prob">probability</option>'
        '<option value="name">name</option><option value="true">true label</option>'
        '<option value="pred">predicted</option><option value="flip">flip</option></select></label>'
        ' <span id="count"></span></div>\n'
        f'<main id="rows">\n{rows}</main>\n<script>{_SCRIPT}</script>\n'
    )
    title = f"cfexplain · {header.get('run', '')}"
    return page(title, _CSS, "cfexplain gallery", facts_table(header) + note_html, body)


def concept_columns(row: Row) -> dict[str, Any]:
    """``concept_<name>`` (the reading) and ``concept_<name>_true`` (the ground truth, None when
    unknown: an empty CSV cell) of a capsule classifier's row; {} for other classifiers."""
    c = row.concepts
    if c is None:
        return {}
    out: dict[str, Any] = {}
    for a, name in enumerate(c.names):
        out[f"concept_{name}"] = c.values[a]
        out[f"concept_{name}_true"] = None if c.truth is None else c.truth[a]
    return out


def _attribute_cells(row: Row) -> dict[str, Any]:
    """Per attribute of a row: its name and p(target) at every frame (JSON)."""
    out: dict[str, Any] = {}
    for k, a in enumerate(row.attributes):
        out[f"attribute_{k}_name"] = a.label
        out[f"attribute_{k}_probs"] = json.dumps([round(float(p), 4) for p in a.probs])
    return out


def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @`` (a formula to
    Excel or LibreOffice) gets a leading apostrophe. Numbers are left alone."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


# ----------------------------------------------------------------------------- streaming writer


class GalleryWriter:
    """Writes a gallery into ``out`` one batch at a time.

    ``index.html`` is rewritten after every :meth:`add_batch`, so an interrupted run still leaves
    a browsable page of what was done; :meth:`close` adds the final header and ``summary.json``.
    """

    def __init__(
        self, out: str | Path, target: str, size: int = 96, links: Mapping[str, str] | None = None
    ) -> None:
        self.out = Path(out)
        self.links = dict(links or {})
        self.out.mkdir(parents=True, exist_ok=True)
        self.target, self.size = target, size
        self.count = 0
        self.facets: dict[str, set[str]] = {
            "true": set(),
            "pred": set(),
            "flip": set(),
            "guard": set(),
        }
        self.metric_columns: list[str] | None = None
        (self.out / ROWS_FILE).write_text("", encoding="utf-8")
        self.table_rows: list[dict[str, Any]] = []  # small: names, numbers and file paths

    def add_batch(
        self, rows: Sequence[Row], header: Mapping[str, Any], notes: Sequence[str] = ()
    ) -> None:
        threads = torch.get_num_threads()
        # Drawing runs many tiny tensor ops: with several intra-op threads on a busy CPU each one
        # costs milliseconds of thread wake-up; one thread is ~1000x faster for them.
        torch.set_num_threads(1)
        try:
            self._add(rows, header, notes)
        finally:
            torch.set_num_threads(threads)

    def _add(self, rows: Sequence[Row], header: Mapping[str, Any], notes: Sequence[str]) -> None:
        fragments = []
        for row in rows:
            folder = self.out / "images" / f"{self.count:05d}"
            files = write_row_files(row, folder, self.target, self.size)
            fragments.append(row_html(row, files, self.count))
            self._csv(row, files)
            self.facets["true"].add(row.true if row.true is not None else "unknown")
            self.facets["pred"].add(row.pred)
            self.facets["guard"].add(row.status)
            self.facets["flip"].add(
                "n/a" if not row.has_counterfactual else ("yes" if row.flip >= 0 else "no")
            )
            self.table_rows.append(self._table_row(row, files))
            self.count += 1
        with open(self.out / ROWS_FILE, "a", encoding="utf-8") as f:
            f.write("".join(fragments))
        self.write_index(header, notes)

    def _csv(self, row: Row, files: Mapping[str, Any]) -> None:
        base = {
            "index": self.count,
            "name": row.name,
            "true": row.true if row.true is not None else "",
            "pred": row.pred,
            "prob": row.prob,
            "flip_index": row.flip if row.has_counterfactual else "",
            "flip_lambda": row.lambdas[row.flip]
            if row.has_counterfactual and row.flip >= 0
            else "",
            "guard_status": row.status,
            "guard_reasons": "; ".join(row.guard.reasons) if row.guard is not None else "",
        }
        written = {"report": row.report.text} if row.report is not None else {}
        extra = {**concept_columns(row), **written, **_attribute_cells(row)}
        values = {**base, **row.metrics, **extra, "strip": files["strip"]}
        path = self.out / "metrics.csv"
        if self.metric_columns is None:
            self.metric_columns = list(values)
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.metric_columns)
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([csv_safe(values.get(c, "")) for c in self.metric_columns])

    def _table_row(self, row: Row, files: Mapping[str, Any]) -> dict[str, Any]:
        """One W&B table row by column: Paths of PNGs (shown as images there), numbers, strings."""
        out = self.out
        cells: dict[str, Any] = {
            "name": row.name,
            "true": row.true if row.true is not None else "",
            "pred": row.pred,
            "prob": row.prob,
            "input": out / files["input"],
            "strip": out / files["strip"],
            "guard_status": row.status,
            "guard_reasons": "; ".join(row.guard.reasons) if row.guard is not None else "",
        }
        if row.has_counterfactual:
            cells["reconstruction"] = out / files["reconstruction"]
            cells |= {f"frame_{k}": out / f for k, f in enumerate(files["frames"])}
            cells["frame_probs"] = json.dumps([round(float(p), 4) for p in row.frame_probs])
            cells["flip_index"] = row.flip
            if "effect" in files:
                cells["effect"] = out / files["effect"]
            if "focused" in files:
                cells["focused"] = out / files["focused"]
                cells["focused_score"] = row.focused_score
        if row.is_ordinal:
            assert row.frame_grades is not None and row.frame_argmax is not None
            cells["frame_grades"] = json.dumps([round(float(g), 4) for g in row.frame_grades])
            cells["frame_argmax"] = json.dumps([int(k) for k in row.frame_argmax])
            cells["grade_plot"] = out / files["grade_plot"]
        cells |= {m: out / files["maps"][m] for m in files["maps"]}
        cells |= concept_columns(row)
        cells |= {f"capsule_{n}": out / f for n, f in files.get("concepts", {}).items()}
        if row.concepts is not None and row.concepts.frames is not None:
            frames = [[round(v, 4) for v in f] for f in row.concepts.frames]
            cells["frame_concepts"] = json.dumps(dict(zip(row.concepts.names, zip(*frames))))
        if row.report is not None:
            cells["report"] = row.report.text
            cells |= {col: out / path for col, path in files["words"].items()}
        cells |= {f"attribute_{k}": out / f for k, f in enumerate(files["attributes"])}
        return cells | _attribute_cells(row) | dict(row.metrics)

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)`` of the W&B table: every column any row has, None where a row lacks it."""
        columns: list[str] = []
        for cells in self.table_rows:
            columns += [c for c in cells if c not in columns]
        return columns, [[cells.get(c) for c in columns] for cells in self.table_rows]

    def write_index(self, header: Mapping[str, Any], notes: Sequence[str] = ()) -> Path:
        rows = (self.out / ROWS_FILE).read_text(encoding="utf-8")
        facets = {k: sorted(v) for k, v in self.facets.items()}
        page = page_html(header, rows, facets, notes, self.links)
        return write_text(self.out / "index.html", page)

    def close(
        self, header: Mapping[str, Any], summary: Mapping[str, Any], notes: Sequence[str] = ()
    ) -> Path:
        """Final ``index.html`` and ``summary.json``; the rows file is removed."""
        index = self.write_index(header, notes)
        write_json(self.out / "summary.json", {**summary, "images": self.count})
        (self.out / ROWS_FILE).unlink(missing_ok=True)
        return index
