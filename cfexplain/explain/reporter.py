"""Generated reports and what they are measured by: BLEU-4, the findings read back from the
text against the factors, and word-level pointing (does a finding word's attention peak fall in
that finding's ground-truth mask, and how much of its attention mass lies there).

Used by the ``reporter`` stage (its test metrics), ``explain methods=[...,report]`` (the report
and its word maps under each image) and ``evaluate`` (the evaluation page).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cfexplain.data.reports import (
    FINDING_MASKS,
    findings_of,
    parse_report,
    sample_kind,
    tokenize,
)
from cfexplain.nn.reporter import Decoded, ReporterNet, attention_at

DECODERS = ("greedy", "beam")


def generate(
    model: ReporterNet, x: Tensor, decode: str = "greedy", beam_size: int = 3
) -> list[Decoded]:
    """The report of each image of ``x [N, C, H, W]`` with its words' attention maps."""
    if decode not in DECODERS:
        raise ValueError(f"decode={decode!r}: expected one of {DECODERS}")
    x = x.to(next(model.parameters()).device)
    return model.greedy(x) if decode == "greedy" else model.beam(x, beam_size)


# ----------------------------------------------------------------------------- BLEU


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002), one reference per hypothesis: the geometric mean of
    the clipped 1- to 4-gram precisions pooled over the corpus, times the brevity penalty
    ``exp(1 - r / c)`` when the hypotheses are shorter (``c``) than the references (``r``).
    0 when some n-gram order has no match."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    matched, total = [0] * 4, [0] * 4
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for n in range(1, 5):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matched[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_p)


# ----------------------------------------------------------------------------- findings


def finding_scores(
    kind: str, texts: Sequence[str], factors: Sequence[Mapping[str, float]]
) -> dict[str, float]:
    """Findings read back from ``texts`` against each sample's factors: ``finding_accuracy``
    (over every finding of every report; an unstated finding counts as wrong), the accuracy
    of each finding (``accuracy/<finding>``) and the share of findings stated (``stated``)."""
    right: Counter = Counter()
    stated: Counter = Counter()
    n = len(texts)
    for text, f in zip(texts, factors):
        truth, said = findings_of(kind, f), parse_report(kind, text)
        for name, level in truth.items():
            stated[name] += name in said
            right[name] += said.get(name) == level
    names = list(findings_of(kind, factors[0])) if n else []
    out = {f"accuracy/{k}": right[k] / n for k in names}
    out["finding_accuracy"] = sum(right.values()) / max(1, n * len(names))
    out["stated"] = sum(stated.values()) / max(1, n * len(names))
    return out


# ----------------------------------------------------------------------------- word maps


SPANS = ("sentence", "peak", "word")


@dataclass
class WordMap:
    """A clinically meaningful word of a generated report: its position in ``words``, the mask
    it points at, whether its sentence states the finding as present, and its attention map
    ``[H, W]`` at image size (sums to 1)."""

    word: str
    position: int
    mask: str
    present: bool
    attention: Tensor


def word_maps(
    kind: str, decoded: Decoded, size: tuple[int, int], span: str = "peak"
) -> list[WordMap]:
    """The finding words of a report with their attention maps at image ``size``.

    ``span="word"``: the attention of the step that wrote the word. A decoder looks for the
    evidence of a finding at the word that decides it ("no", "large"); the finding word itself
    often follows once the state already holds the answer, so the sentence is the unit:
    ``span="sentence"``: the mean attention of the steps that wrote the word's sentence;
    ``span="peak"``: the attention of the sentence's step that looked hardest (the highest
    single weight), the step where the decoder read the image for this sentence (the default).
    """
    if span not in SPANS:
        raise ValueError(f"span={span!r}: expected one of {SPANS}")
    out = []
    start = 0
    for i, w in enumerate([*decoded.words, "."]):
        if w != ".":
            continue
        sentence = decoded.words[start:i]
        said = parse_report(kind, " ".join(sentence))
        present = any(v > 0 for k, v in said.items() if k != "kl_grade")
        for j, word in enumerate(sentence, start=start):
            if word in FINDING_MASKS:
                maps = attention_at(_span_map(decoded.attention, start, i, j, span), size)
                out.append(WordMap(word, j, FINDING_MASKS[word], present, maps))
        start = i + 1
    return out


def _span_map(attention: Tensor, start: int, stop: int, at: int, span: str) -> Tensor:
    """The grid map ``[h, w]`` of the word at ``at`` of the sentence ``start:stop``."""
    if span == "word":
        return attention[at]
    steps = attention[start:stop]
    if span == "peak":
        return steps[int(steps.flatten(1).amax(1).argmax())]
    return steps.mean(0)


def pointing(
    words: Iterable[WordMap], masks: Mapping[str, Tensor], tolerance: int = 0
) -> list[dict[str, Any]]:
    """Per present finding word whose mask is non-empty: ``hit`` (the attention's peak lies in
    the mask), ``near`` (... in the mask dilated by ``tolerance`` px), ``mass`` (the share of
    the attention in the mask) and ``area`` (the mask's share of the image: the mass of a
    uniform map)."""
    rows = []
    for wm in words:
        mask = masks.get(wm.mask)
        if not wm.present or mask is None or not bool(mask.any()):
            continue
        m = mask.bool()
        k = 2 * tolerance + 1
        near = F.max_pool2d(m[None, None].float(), k, 1, tolerance)[0, 0] > 0
        peak = int(wm.attention.flatten().argmax())
        rows.append(
            {
                "word": wm.word,
                "mask": wm.mask,
                "hit": bool(m.flatten()[peak]),
                "near": bool(near.flatten()[peak]),
                "tolerance": tolerance,
                "mass": float(wm.attention[mask.bool()].sum()),
                "area": float(mask.float().mean()),
            }
        )
    return rows


def pointing_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per mask: the hit rate (``pointing/<mask>``), the hit rate within the tolerance
    (``pointing_<t>px/<mask>``), the mean attention mass in the mask (``mass/``), the mean mask
    area (``area/``), the words scored (``words/``)."""
    out: dict[str, float] = {}
    for name in sorted({r["mask"] for r in rows}):
        mine = [r for r in rows if r["mask"] == name]
        out[f"pointing/{name}"] = sum(r["hit"] for r in mine) / len(mine)
        out[f"pointing_{mine[0]['tolerance']}px/{name}"] = sum(r["near"] for r in mine) / len(mine)
        out[f"mass/{name}"] = sum(r["mass"] for r in mine) / len(mine)
        out[f"area/{name}"] = sum(r["area"] for r in mine) / len(mine)
        out[f"words/{name}"] = len(mine)
    return out


# ----------------------------------------------------------------------------- all together


@torch.no_grad()
def evaluate_reports(
    model: ReporterNet,
    samples: Sequence[Mapping[str, Any]],
    batch: int = 64,
    decode: str = "greedy",
    beam_size: int = 3,
    tolerance: int = 0,
    span: str = "peak",
) -> dict[str, float]:
    """BLEU-4 against the samples' reports, finding scores (phantoms) and word pointing
    (samples with masks) of the reports ``model`` writes for ``samples`` (dataset items)."""
    refs, hyps, texts, factors, rows = [], [], [], [], []
    kind = sample_kind(samples[0]["meta"]) if samples else None
    for s in range(0, len(samples), batch):
        chunk = samples[s : s + batch]
        x = torch.stack([c["image"] for c in chunk])
        for item, dec in zip(chunk, generate(model, x, decode, beam_size)):
            meta = item["meta"]
            refs.append(tokenize(meta.get("report") or ""))
            hyps.append(dec.words)
            texts.append(" ".join(dec.words))
            if kind is not None:
                factors.append(meta["factors"])
                masks = meta.get("masks") or {}
                rows += pointing(word_maps(kind, dec, x.shape[-2:], span), masks, tolerance)
    out = {"bleu4": bleu(refs, hyps), "images": len(samples)}
    if kind is not None:
        out |= finding_scores(kind, texts, factors)
        out |= pointing_scores(rows)
    return out


# ----------------------------------------------------------------------------- under each image


@dataclass
class WrittenReport:
    """The report written for one image: its text and its finding words with their maps."""

    text: str
    words: list[WordMap]

    def word_columns(self) -> list[tuple[str, WordMap]]:
        """``(column name, word map)`` per finding word: ``report_<word>``, numbered when a
        word comes again (``report_narrowing_2``)."""
        seen: Counter = Counter()
        out = []
        for wm in self.words:
            seen[wm.word] += 1
            n = seen[wm.word]
            out.append((f"report_{wm.word}" + (f"_{n}" if n > 1 else ""), wm))
        return out


def write_reports(
    model: ReporterNet,
    x: Tensor,
    kind: str,
    decode: str = "greedy",
    beam_size: int = 3,
    span: str = "peak",
) -> list[WrittenReport]:
    """The report of each image of ``x`` with a map per finding word (at the images' size)."""
    from cfexplain.data.reports import detokenize

    out = []
    for dec in generate(model, x, decode, beam_size):
        out.append(WrittenReport(detokenize(dec.words), word_maps(kind, dec, x.shape[-2:], span)))
    return out


def report_map(written: WrittenReport, size: tuple[int, int]) -> Tensor:
    """One map ``[1, H, W]`` for a report: the mean of its present findings' word maps (of all
    its finding words when none is present; zeros when it has none)."""
    chosen = [w.attention for w in written.words if w.present] or [
        w.attention for w in written.words
    ]
    if not chosen:
        return torch.zeros(1, *size)
    return torch.stack(chosen).mean(0)[None]
