"""Mimer-style per-image report (Hicks et al. 2018): one self-contained page for a non-technical reader.

:func:`write_report` writes ONE HTML file: images embedded as base64 PNG/GIF data URIs, inline
CSS, no script and no network, every string that came from a file name or a config HTML-escaped.
Plain-language sections: what the model said, where it looked (guided grad-CAM), what would change
its mind (the counterfactual sequence), how unusual the image is (normative residual), where this
came from (run provenance). A PDF goes beside it: printed by headless chromium when it is
installed (the same page), else drawn with matplotlib (the same content, simpler layout).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cfexplain.utils.artifacts import atomic_write, write_text
from cfexplain.utils.markup import esc, page

log = logging.getLogger("cfexplain")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PDF_MODES = ("auto", "chromium", "matplotlib", "none")
_SIZE = 224  # displayed side of the main images, pixels

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:52rem;
margin:2rem auto;padding:0 1rem;color:#1d1d1f;line-height:1.5}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.note{color:#555;font-size:.92rem} .answer{font-size:1.25rem}
.figs{display:flex;flex-wrap:wrap;gap:1rem} figure{margin:0;text-align:center}
figure img{image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:.85rem;color:#444;max-width:14rem}
.strip figure img{width:96px;height:96px} .flip img{border:3px solid #d62728}
table{border-collapse:collapse;font-size:.9rem} td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#f5f5f7}
.bar{display:inline-block;height:.8rem;background:#1f77b4;vertical-align:middle}
.guard-banner{background:#fdecea;color:#7b1f14;border-left:8px solid #c0392b;padding:.6rem 1rem;
margin:1rem 0;font-size:1.05rem}
@media print{body{margin:0}}
"""


def _uri(arr: np.ndarray) -> str:
    """uint8 ``[H, W, 3]`` -> a PNG data URI."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, caption: str, cls: str = "", size: int = _SIZE) -> str:
    return (
        f'<figure class="{cls}"><img src="{src}" width="{size}" height="{size}" alt="{esc(caption)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _as_map(t: Tensor | None, field: str, hw: tuple[int, int]) -> Tensor | None:
    """A map ``[1, H, W]`` or ``[H, W]`` -> ``[1, 1, H, W]`` float; the error names the field."""
    if t is None:
        return None
    t = torch.as_tensor(t).detach().float().cpu()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] != 1 or tuple(t.shape[-2:]) != hw:
        raise ValueError(
            f"write_report: {field} must be [1, {hw[0]}, {hw[1]}], got {tuple(t.shape)}"
        )
    return t[None]


def _percent(p: float) -> str:
    return f"{100 * p:.0f}%" if 0.01 <= p <= 0.99 else f"{100 * p:.1f}%"


def write_report(
    path: str | Path,
    *,
    name: str,
    image: Tensor,
    prediction: int,
    probability: float,
    class_names: Sequence[str],
    guided_gradcam: Tensor,
    counterfactual_frames: Tensor | None = None,
    frame_probs: Sequence[float] | Tensor | None = None,
    frame_target: int | None = None,
    frame_grades: Sequence[float] | None = None,
    frame_argmax: Sequence[int] | None = None,
    normative_residual: Tensor | None = None,
    provenance: Mapping[str, Any],
    pdf: str = "auto",
    reference_prob: float | None = None,
    target_prob: float | None = None,
    guard: Any = None,
    concepts: Any = None,
    written_report: Any = None,
    attributes: Sequence[Any] = (),
) -> Path:
    """Write the report of one image to ``path`` (HTML, atomically); returns ``path``.

    Args:
        name: the image's display name (a file name or ``test #i``); escaped.
        image: ``[C, H, W]`` in [-1, 1], C = 1 or 3.
        prediction: index of the predicted class in ``class_names``.
        probability: the model's probability of that class.
        guided_gradcam: raw guided grad-CAM map ``[1, H, W]`` for the predicted class (signed).
        counterfactual_frames: ``[K, C, H, W]`` in [-1, 1], the image changed step by step.
        frame_probs: ``[K]`` probability of ``class_names[frame_target]`` for every frame.
        frame_target: the class ``frame_probs`` refer to; the predicted class when None.
        frame_grades, frame_argmax: ordinal walks: ``[K]`` Σ k·p_k and argmax grade per frame.
        normative_residual: ``[1, H, W]`` residual of a healthy-only autoencoder (unsigned).
        provenance: run facts (run folder, checkpoints, config, versions); shown escaped.
        pdf: ``"auto"`` (chromium when installed, else matplotlib), ``"chromium"``,
            ``"matplotlib"`` or ``"none"``; the PDF is ``path`` with the suffix ``.pdf``.
        reference_prob: p(``frame_target``) of the redrawing G(E(x)) the frames start from
            (a frame flips on the other side of 0.5).
        target_prob: p(``frame_target``) of the image itself, shown beside it.
        guard: the guard's ``Verdict`` (None: unchecked); flagged pages open with a warning.
        concepts: a capsule classifier's readings (``gallery.Concepts``); None for others.
        written_report: the generated report (``reporter.WrittenReport``): text, word maps.
        attributes: StyleSpace attribute walks (gallery ``AttributeStrip``s: ``label``,
            ``frames [F, C, H, W]``, ``probs [F]`` of ``frame_target``), a strip each.
    """
    path = Path(path)
    if pdf not in PDF_MODES:
        raise ValueError(f"write_report: pdf must be one of {PDF_MODES}, got {pdf!r}")
    image = _as_image(image)
    hw = tuple(image.shape[-2:])
    names = [str(c) for c in class_names]
    _check_answer(int(prediction), float(probability), names)
    gg = _as_map(guided_gradcam, "guided_gradcam", hw)
    residual = _as_map(normative_residual, "normative_residual", hw)
    frames, probs, target, grades = _walk(
        counterfactual_frames, frame_probs, frame_target, (frame_grades, frame_argmax),
        image.shape[0], int(prediction), names,
    )  # fmt: skip
    # What a classifier or method adds beside the classic sections.
    extras = {
        "concepts": concepts,
        "written_report": written_report,
        "attributes": list(attributes),
    }
    content = _Content(
        name=str(name), image=image, prediction=int(prediction), probability=float(probability),
        class_names=names, guided_gradcam=gg, frames=frames, probs=probs, frame_target=target,
        grades=grades, residual=residual, provenance=dict(provenance),
        written=time.strftime("%Y-%m-%d %H:%M"),
        reference_prob=None if reference_prob is None else float(reference_prob),
        target_prob=None if target_prob is None else float(target_prob), guard=guard, **extras,
    )  # fmt: skip
    write_text(path, report_html(content))
    if pdf != "none":
        write_pdf(path, content, mode=pdf)
    return path


def _as_image(image: Tensor) -> Tensor:
    image = torch.as_tensor(image).detach().float().cpu()
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"write_report: image must be [1|3, H, W], got {tuple(image.shape)}")
    return image


def _check_answer(prediction: int, probability: float, names: list[str]) -> None:
    if not 0 <= prediction < len(names):
        raise ValueError(
            f"write_report: prediction {prediction} is not an index into class_names {names}"
        )
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"write_report: probability must be in [0, 1], got {probability}")


def _frames(frames: Tensor | None, probs: Any, channels: int) -> tuple[Tensor | None, list[float]]:
    if frames is None:
        return None, []
    frames = torch.as_tensor(frames).detach().float().cpu()
    if frames.ndim != 4 or frames.shape[1] != channels:
        raise ValueError(
            f"write_report: counterfactual_frames must be [K, {channels}, H, W], got {tuple(frames.shape)}"
        )
    if probs is None:
        raise ValueError("write_report: counterfactual_frames needs frame_probs (one per frame)")
    p = [float(v) for v in torch.as_tensor(probs).flatten().tolist()]
    if len(p) != len(frames):
        raise ValueError(
            f"write_report: {len(frames)} counterfactual_frames but {len(p)} frame_probs"
        )
    return frames, p


def _walk(
    frames: Tensor | None,
    probs: Any,
    target: int | None,
    ordinal: tuple[Sequence[float] | None, Sequence[int] | None],
    channels: int,
    prediction: int,
    names: list[str],
) -> tuple[Tensor | None, list[float], int, list[tuple[float, int]] | None]:
    """The counterfactual steps checked: frames, their probabilities, the class those refer
    to, and for an ordinal walk ``[(expected grade, most probable grade)]`` per frame."""
    frames, p = _frames(frames, probs, channels)
    target = int(prediction if target is None else target)
    if not 0 <= target < len(names):
        raise ValueError(f"write_report: frame_target {target} is not an index into {names}")
    grades, argmax = ordinal
    if grades is None and argmax is None:
        return frames, p, target, None
    if grades is None or argmax is None or len(grades) != len(p) or len(argmax) != len(p):
        raise ValueError(
            "write_report: an ordinal walk needs frame_grades and frame_argmax, one per frame "
            f"({len(p)})"
        )
    if any(not 0 <= int(a) < len(names) for a in argmax):
        raise ValueError(f"write_report: frame_argmax {list(argmax)} is not an index into {names}")
    return frames, p, target, [(float(g), int(a)) for g, a in zip(grades, argmax)]


class _Content:
    """The validated inputs of one report, shared by the HTML and the matplotlib PDF."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    @property
    def answer(self) -> str:
        return self.class_names[self.prediction]

    def flips(self) -> list[bool]:
        """Per frame: is the model's answer about ``frame_target`` the opposite of its answer
        for the starting picture (the redrawing G(E(x)); the image itself when unknown)?"""
        if self.reference_prob is not None:
            return [(p > 0.5) != (self.reference_prob > 0.5) for p in self.probs]
        yes = self.frame_target == self.prediction
        return [(p >= 0.5) != yes for p in self.probs]

    def warning(self) -> str | None:
        """The flagged image's warning in plain words (None when it passed or went unchecked)."""
        if self.guard is None or not self.guard.flagged:
            return None
        from cfexplain.explain.gallery import WARNINGS

        return WARNINGS[self.guard.status]


# ----------------------------------------------------------------------------- HTML


def _section_warning(c: _Content) -> str:
    if c.guard is None:
        return (
            '<p class="note">This image was not checked against the images the model was '
            "trained on (the run has no guard).</p>"
        )
    warning = c.warning()
    if warning is None:
        return ""
    reasons = "".join(f"<li>{esc(r)}</li>" for r in c.guard.reasons)
    return (
        f'<div class="guard-banner" role="alert"><b>⚠ Warning.</b> {esc(warning)} '
        "Everything below is shown only so that the problem can be examined."
        f'<ul class="note">{reasons}</ul></div>'
    )


def _section_said(c: _Content) -> str:
    return (
        "<h2>What the model said</h2>"
        f'<p class="answer">The model\'s answer: <b>{esc(c.answer)}</b>, '
        f"with a probability of <b>{_percent(c.probability)}</b>.</p>"
        f'<p class="note">Possible answers: {", ".join(esc(n) for n in c.class_names)}. '
        "This is the output of a computer model, not a diagnosis: read it together with "
        "the rest of this page.</p>"
    )


def _section_concepts(c: _Content) -> str:
    """A capsule classifier's findings: each attribute's reading beside its ground truth, the
    picture its capsule alone redraws, and how the reading moves along the counterfactual."""
    from cfexplain.explain.gallery import gray_rgb
    from cfexplain.utils.images import upscale

    k = c.concepts
    if k is None:
        return ""
    head = "<tr><th>finding</th><th>the model's reading</th><th>ground truth</th>"
    moves = k.frames is not None and len(k.frames) > 1
    head += "<th>along the steps below</th></tr>" if moves else "</tr>"
    rows = []
    for a, name in enumerate(k.names):
        bar = f'<span class="bar" style="width:{100 * k.values[a]:.0f}px"></span>'
        truth = "not known" if k.truth is None else f"{k.truth[a]:.2f}"
        cells = [esc(name), f"{bar} {k.values[a]:.2f}", truth]
        if moves:
            cells.append(f"{k.frames[0][a]:.2f} → {k.frames[-1][a]:.2f}")
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    figs = ""
    if k.images is not None:
        pics = [np.asarray(upscale(p, 96)) for p in gray_rgb(k.images)]
        figs = "".join(_img(_uri(p), f"{n} capsule", size=96) for n, p in zip(k.names, pics))
        figs = f'<div class="figs strip">{figs}</div>'
    return (
        "<h2>What it saw, finding by finding</h2>"
        '<p class="note">This model reads named findings first and decides from them. Each '
        "reading is between 0 (absent) and 1 (severe); 0.5 means definite. The pictures show "
        "what each finding's part of the model redraws on its own.</p>"
        f"<table>{head}{''.join(rows)}</table>{figs}"
    )


def _section_looked(c: _Content) -> str:
    from cfexplain.explain.gallery import outlined_rgb, overlay
    from cfexplain.utils.images import upscale

    x = c.image[None]
    original = _uri(np.asarray(upscale(outlined_rgb(c.image, c.guard), _SIZE)))
    heat = _uri(np.asarray(upscale(overlay(x, c.guided_gradcam, signed=True)[0], _SIZE)))
    caption = "The image"
    if getattr(c.guard, "cell", None) is not None:
        caption += " (red box: a region the generator does not redraw)"
    return (
        "<h2>Where it looked</h2>"
        f'<div class="figs">{_img(original, caption)}'
        f"{_img(heat, f'Evidence for {c.answer}')}</div>"
        f'<p class="note">Coloured areas are the details the model relied on (guided grad-CAM): '
        f"red pushed it towards “{esc(c.answer)}”, blue pushed it away. Uncoloured areas "
        "played little part.</p>"
    )


def _section_written(c: _Content) -> str:
    """The report a second model wrote for the image, and where it looked for each finding."""
    written = getattr(c, "written_report", None)
    if written is None:
        return ""
    from cfexplain.explain.gallery import overlay
    from cfexplain.utils.images import upscale

    figs = []
    for wm in written.words:
        heat = overlay(c.image[None], wm.attention[None, None].float(), signed=False)[0]
        caption = f"“{wm.word}”" + ("" if wm.present else " (said to be absent)")
        figs.append(_img(_uri(np.asarray(upscale(heat, _SIZE))), caption))
    return (
        "<h2>What a report-writing model wrote</h2>"
        f'<p class="answer">{esc(written.text)}</p>'
        f'<div class="figs">{"".join(figs)}</div>'
        '<p class="note">A second model, trained to write reports, wrote this text. Under each '
        "finding word: where that model looked while writing the word's sentence (bright: "
        "most attention). It is not a diagnosis.</p>"
    )


def _section_change(c: _Content) -> str:
    from cfexplain.explain.gallery import gif_bytes, gray_rgb
    from cfexplain.utils.images import upscale

    head = "<h2>What would change its mind</h2>"
    if c.frames is None:
        return (
            head
            + '<p class="note">Not available for this run (it has no counterfactual stages).</p>'
        )
    target = c.class_names[c.frame_target]
    if c.grades is not None:
        return head + _ordinal_change(c)
    figs = []
    for i, (frame, p, flip) in enumerate(zip(gray_rgb(c.frames), c.probs, c.flips(), strict=True)):
        cap = f"step {i + 1}: {_percent(p)} {target}"
        figs.append(_img(_uri(np.asarray(upscale(frame, 96))), cap, "flip" if flip else "", 96))
    gif = "data:image/gif;base64," + base64.b64encode(gif_bytes(c.frames, 160)).decode("ascii")
    start = ""
    if c.reference_prob is not None:
        start = f" The model gives the redrawing {_percent(c.reference_prob)} “{esc(target)}”"
        if c.target_prob is not None:
            start += f", and the image itself {_percent(c.target_prob)}"
        start += "."
    return (
        head
        + '<p class="note">A generative model redrew this image and then changed its redrawing '
        "a little at a time, keeping it realistic, and the model was asked again at every step."
        f"{start} Under each picture: the model's probability of “{esc(target)}”. A red frame "
        "marks the steps where its answer differs from its answer for the redrawing; what "
        "differs between the redrawing and those steps is what the decision rests on.</p>"
        f'<div class="figs strip">{"".join(figs)}</div>'
        f'<div class="figs" style="margin-top:1rem">{_img(gif, "The steps as an animation", size=160)}</div>'
    )


def _section_attributes(c: _Content) -> str:
    """One strip per attribute (a single style feature of the generator), with p under each frame."""
    from cfexplain.explain.gallery import gray_rgb
    from cfexplain.utils.images import upscale

    if not c.attributes:
        return ""
    target = c.class_names[c.frame_target]
    strips = []
    for k, a in enumerate(c.attributes):
        figs = [
            _img(_uri(np.asarray(upscale(frame, 80))), f"{_percent(float(p))} {target}", size=80)
            for frame, p in zip(gray_rgb(a.frames), a.probs, strict=True)
        ]
        strips.append(
            f'<h3 class="attribute">{k + 1}. {esc(a.label)}</h3>'
            f'<p class="note">{esc(attribute_verdict([float(p) for p in a.probs], target))}</p>'
            f'<div class="figs strip">{"".join(figs)}</div>'
        )
    return (
        "<h2>Single features that would change its mind</h2>"
        '<p class="note">Each row changes one feature of the redrawing (one style channel of '
        "the generative model) from less to more, with the model's probability of "
        f"“{esc(target)}” under each picture; the middle picture is the redrawing itself. The "
        "features are those that moved the model most over many images.</p>" + "".join(strips)
    )


def attribute_verdict(probs: Sequence[float], target: str, barely: float = 0.05) -> str:
    """What one attribute strip does to the model, in words: p(``target``) from the first frame
    to the last, and whether some frame lands on the other side of 50% from the middle frame
    (the redrawing); a change under ``barely`` says the model does not react to the feature."""
    from cfexplain.explain.gallery import answer_changes

    first, last, mid = probs[0], probs[-1], probs[len(probs) // 2]
    moved = f"{_percent(first)} → {_percent(last)} “{target}”"
    if answer_changes(probs):
        return f"The model changes its answer along this row ({moved})."
    if max(probs) - min(probs) < barely:
        return (
            f"The model barely reacts ({moved}): the picture changes, but this feature is not "
            "what its answer rests on here."
        )
    if mid >= 0.5:
        return (
            f"The probability moves ({moved}) but stays above 50%: this feature alone does not "
            f"take the model off “{target}”; it also rests on something else in this image."
        )
    return (
        f"The probability moves ({moved}) but stays below 50%: this feature alone does not "
        f"bring the model to “{target}”; it would take more than this feature here."
    )


def _ordinal_change(c: _Content) -> str:
    """The ordinal walk: the image redrawn from the lowest grade to the highest, with the
    model's expected grade and its most probable grade under every step, and their plot."""
    from cfexplain.explain.gallery import gif_bytes, grade_plot_png, gray_rgb
    from cfexplain.utils.images import upscale

    assert c.grades is not None
    figs = []
    for i, (frame, (g, a)) in enumerate(zip(gray_rgb(c.frames), c.grades, strict=True)):
        cap = f"step {i + 1}: grade {g:.1f} (most likely {c.class_names[a]})"
        figs.append(_img(_uri(np.asarray(upscale(frame, 96))), cap, "", 96))
    plot = grade_plot_png(
        list(range(1, len(c.grades) + 1)),
        [g for g, _ in c.grades],
        [a for _, a in c.grades],
        len(c.class_names),
        xlabel="step",
    )
    plot_uri = "data:image/png;base64," + base64.b64encode(plot).decode("ascii")
    gif = "data:image/gif;base64," + base64.b64encode(gif_bytes(c.frames, 160)).decode("ascii")
    return (
        '<p class="note">A generative model redrew this image and then moved its redrawing '
        f"step by step from the lowest grade ({esc(c.class_names[0])}) towards the highest "
        f"({esc(c.class_names[-1])}), and the model was asked again at every step. Under each "
        "picture: the grade the model expects (its probabilities weighted by grade) and the grade "
        "it finds most likely. What changes from step to step is what the model reads as "
        "disease progressing.</p>"
        f'<div class="figs strip">{"".join(figs)}</div>'
        '<div class="figs" style="margin-top:1rem"><figure>'
        f'<img src="{plot_uri}" width="208" alt="Grade at every step">'
        "<figcaption>Grade at every step</figcaption></figure>"
        f"{_img(gif, 'The steps as an animation', size=160)}</div>"
    )


def _section_unusual(c: _Content) -> str:
    from cfexplain.explain.gallery import overlay
    from cfexplain.utils.images import upscale

    head = "<h2>How unusual the image is</h2>"
    if c.residual is None:
        return head + '<p class="note">Not available for this run (it has no normative model).</p>'
    heat = _uri(np.asarray(upscale(overlay(c.image[None], c.residual, signed=False)[0], _SIZE)))
    score = float(c.residual.abs().mean())
    return (
        head + f'<div class="figs">{_img(heat, "Differences from healthy images")}</div>'
        '<p class="note">A second model learnt what healthy images look like and redrew this '
        "image as a healthy one. Bright areas are where the two differ most: regions that look "
        f"unusual for a healthy image. Average difference: {score:.3g} "
        "(0 would be a perfect match).</p>"
    )


def _value(v: Any) -> str:
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(v, default=str, sort_keys=True)
    return str(v)


def _section_provenance(c: _Content) -> str:
    rows = [("image", c.name), *((str(k), _value(v)) for k, v in c.provenance.items())]
    rows.append(("report written", c.written))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return (
        "<h2>Where this came from</h2>"
        '<p class="note">The facts needed to reproduce this page: which trained models made it '
        "and with what settings.</p>"
        f"<table>{body}</table>"
    )


def report_html(c: _Content) -> str:
    """The whole page as one string (inline CSS, data URIs, no script)."""
    sections = (
        _section_warning(c),
        _section_said(c),
        _section_concepts(c),
        _section_looked(c),
        _section_written(c),
        _section_change(c),
        _section_attributes(c),
        _section_unusual(c),
        _section_provenance(c),
    )
    intro = '<p class="note">What an image classifier concluded about one image, and why.</p>'
    title = f"Report: {c.name}"
    return page(title, _CSS, title, intro, "".join(sections))


# ----------------------------------------------------------------------------- PDF


def write_pdf(html_path: Path, content: _Content, mode: str = "auto") -> Path | None:
    """``html_path`` with the suffix ``.pdf``: chromium's print of the page, or matplotlib's
    drawing of ``content`` (``mode="auto"`` falls back to matplotlib when chromium fails)."""
    out = html_path.with_suffix(".pdf")
    chromium = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if mode == "chromium" and chromium is None:
        raise FileNotFoundError(
            f"write_report: pdf='chromium' but none of {CHROMIUM_NAMES} is on PATH"
        )
    if mode in ("auto", "chromium") and chromium is not None:
        try:
            return atomic_write(out, lambda tmp: _chromium_pdf(chromium, html_path, Path(tmp)))
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            if mode == "chromium":
                raise
            log.warning(
                f"[report] chromium could not print {html_path} ({e}); drawing the PDF with matplotlib"
            )
    return atomic_write(out, lambda tmp: _matplotlib_pdf(content, Path(tmp)))


def _chromium_pdf(chromium: str, html_path: Path, out: Path) -> None:
    # A throwaway profile: never touch the user's browser profile, never leave one behind.
    with tempfile.TemporaryDirectory(prefix="cfexplain-chromium-") as profile:
        r = subprocess.run(
            [
                chromium,
                "--headless",
                "--disable-gpu",
                "--no-sandbox",  # needed as root (containers); the page has no script
                "--no-pdf-header-footer",
                f"--user-data-dir={profile}",
                f"--print-to-pdf={out}",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if r.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium exited with {r.returncode}: {r.stderr.strip()[-300:]}")


def _text(fig: Any, x: float, y: float, s: str, size: float, **kw: Any) -> None:
    # parse_math=False everywhere: a "$" in a file name or config must print as itself.
    fig.text(x, y, s, fontsize=size, va="top", parse_math=False, **kw)


def _show(fig: Any, rect: tuple[float, float, float, float], arr: np.ndarray, title: str) -> None:
    ax = fig.add_axes(rect)
    ax.imshow(arr, interpolation="nearest")
    ax.set_title(title, fontsize=8, parse_math=False)
    ax.set_axis_off()


def _matplotlib_pdf(c: _Content, out: Path) -> None:
    """One A4 page: the same sections as the HTML, drawn without a browser."""
    from matplotlib.figure import Figure

    from cfexplain.explain.gallery import gray_rgb, overlay

    fig = Figure(figsize=(8.27, 11.69))
    _text(fig, 0.06, 0.99, f"WARNING: {c.warning()}" if c.warning() else "", 9, color="#c0392b")
    _text(fig, 0.06, 0.965, f"Report: {c.name}", 15, weight="bold")
    said = f"What the model said: {c.answer}, with a probability of {_percent(c.probability)}."
    _text(fig, 0.06, 0.935, said, 11)
    _text(fig, 0.06, 0.915, "A computer model's output, not a diagnosis.", 8)
    x = c.image[None]
    _text(fig, 0.06, 0.89, "Where it looked", 12, weight="bold")
    _show(fig, (0.06, 0.66, 0.25, 0.21), gray_rgb(x)[0], "The image")
    evidence = overlay(x, c.guided_gradcam, True)[0]
    _show(fig, (0.36, 0.66, 0.25, 0.21), evidence, f"Evidence for {c.answer}")
    if c.residual is not None:
        _text(fig, 0.66, 0.89, "How unusual the image is", 12, weight="bold")
        residual = overlay(x, c.residual, False)[0]
        _show(fig, (0.66, 0.66, 0.25, 0.21), residual, "Differences from healthy")
    _pdf_change(fig, c)
    _text(fig, 0.06, 0.44, "Where this came from", 12, weight="bold")
    rows = [("image", c.name), *((str(k), _value(v)) for k, v in c.provenance.items())]
    rows.append(("report written", c.written))
    y = 0.415
    for key, val in rows[:30]:
        val = val if len(val) <= 95 else val[:92] + "..."
        _text(fig, 0.06, y, f"{key}: {val}", 7.5, family="monospace")
        y -= 0.013
    fig.savefig(out, format="pdf")


def _pdf_change(fig: Any, c: _Content) -> None:
    """The PDF's "What would change its mind": the counterfactual frames and their probabilities."""
    from cfexplain.explain.gallery import gray_rgb

    _text(fig, 0.06, 0.63, "What would change its mind", 12, weight="bold")
    if c.frames is None:
        _text(fig, 0.06, 0.605, "Not available for this run.", 9)
        return
    k = len(c.frames)
    w = min(0.11, 0.88 / k)
    target = c.class_names[c.frame_target]
    for i, (frame, p, flip) in enumerate(zip(gray_rgb(c.frames), c.probs, c.flips(), strict=True)):
        title = f"{_percent(p)}" + (" *" if flip else "")
        if c.grades is not None:
            title = f"{c.grades[i][0]:.1f} ({c.class_names[c.grades[i][1]]})"
        _show(fig, (0.06 + i * w, 0.5, w * 0.95, w * 0.95 * 8.27 / 11.69), frame, title)
    legend = (
        f"Under each step: the probability of {target}; * marks an answer that differs from "
        "the model's answer for the redrawn starting picture."
    )
    if c.grades is not None:
        legend = (
            "Under each step: the grade the model expects (probabilities weighted by grade) and, "
            "in brackets, the grade it finds most likely."
        )
    _text(fig, 0.06, 0.48, legend, 8)
