"""Counterfactual metrics: pure functions of a :class:`Counterfactuals` result.

- flip rate: share of images whose decision crosses 0.5 inside the λ range;
- monotonicity: Spearman correlation of λ and the target probability along each sequence;
- proximity: L1 and LPIPS of the first flipping frame to the reconstruction G(E(x));
- fidelity: the reconstruction error carried by the result;
- ordinal walks: monotonicity of the expected grade Σ k·p_k along λ, and the argmax grades at
  the two ends;
- COUT (Khorram & Fuxin 2022, "Cycle-Consistent Counterfactuals by Latent Transformations"):
  pixels move from the query image to its counterfactual in order of attribution, and the area
  under the curve of the counterfactual class's probability minus that under the query class's
  probability is the score, in [-1, 1] (:func:`cout`, :func:`counterfactual_cout`);
- which of a counterfactual's changes the classifier reacts to (:func:`square_values`): G
  changes more than the classifier reads (a walk can move a marker the classifier ignores), so
  each square of the change gets its share of the classifier's move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cfexplain.explain.counterfactual import Counterfactuals, expected_grade


def flip_rate(cf: Counterfactuals) -> float:
    """Share of images with at least one frame on the other side of 0.5 from the reconstruction."""
    return (cf.flip_index() >= 0).float().mean().item()


def average_ranks(x: Tensor) -> Tensor:
    """Ranks along dim 1 of ``[N, P]`` (ties share their mean rank), float64, O(P log P)."""
    n, p = x.shape
    s, order = x.sort(dim=1, stable=True)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = (new.cumsum(1) - 1) + torch.arange(n, device=x.device)[:, None] * p
    pos = torch.arange(p, dtype=torch.float64, device=x.device).expand(n, p).reshape(-1)
    g = group.reshape(-1)
    total = torch.zeros(n * p, dtype=torch.float64, device=x.device).index_add_(0, g, pos)
    count = torch.zeros(n * p, dtype=torch.float64, device=x.device).index_add_(
        0, g, torch.ones_like(pos)
    )
    sorted_ranks = (total / count.clamp_min(1))[group]
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of ``a`` and ``b`` ``[N, K]`` row by row ``[N]``; 0 where a row is
    constant. (λ sequences, and heatmaps in the randomisation check: ranks cost O(K log K).)"""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    return torch.where(
        den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den)
    ).float()


def monotonicity(cf: Counterfactuals) -> Tensor:
    """``[N]`` Spearman(λ, probability of the target) of every sequence (1 = strictly rising)."""
    return spearman(cf.lambdas, cf.probs)


def proximity(cf: Counterfactuals, perceptual: nn.Module | None = None) -> dict[str, Tensor]:
    """``{"l1": [N], "lpips": [N]}`` of the first flipping frame vs the reconstruction; NaN where
    no frame flips (``lpips`` only with a perceptual model)."""
    idx = cf.flip_index()
    flipped = idx >= 0
    frame = cf.images[torch.arange(len(idx)), idx.clamp_min(0)]  # [N, C, H, W]
    nan = torch.full((len(idx),), math.nan)
    l1 = (frame - cf.reconstruction).abs().flatten(1).mean(1).float().cpu()
    out = {"l1": torch.where(flipped.cpu(), l1, nan)}
    if perceptual is not None:
        with torch.no_grad():
            lp = perceptual(frame, cf.reconstruction).float().cpu()
        out["lpips"] = torch.where(flipped.cpu(), lp, nan)
    return out


def summary(
    cf: Counterfactuals, perceptual: nn.Module | None = None, threshold: float = 0.9
) -> dict[str, float]:
    """All counterfactual metrics of one result as plain floats."""
    mono = monotonicity(cf)
    out = {
        "flip_rate": flip_rate(cf),
        "monotonicity_mean": mono.mean().item(),
        f"monotonicity_share_{threshold:g}": (mono >= threshold).float().mean().item(),
        "recon_error": cf.recon_error.mean().item(),
        "recon_decision_agreement": ((cf.recon_probs > 0.5) == (cf.input_probs > 0.5))
        .float()
        .mean()
        .item()
        if cf.recon_probs is not None
        else math.nan,
    }
    for k, v in proximity(cf, perceptual).items():
        out[f"proximity_{k}"] = v.nanmean().item() if (~v.isnan()).any() else math.nan
    return out


# Two consecutive frames whose expected grades differ by less than this count as level, not
# falling: saturated ends of a walk wobble by a few thousandths.
GRADE_TOLERANCE = 0.01


def grade_rises(grades: Tensor, tolerance: float = GRADE_TOLERANCE) -> Tensor:
    """``[N]`` bool: the expected grades ``[N, K]`` never fall by more than ``tolerance``
    from one frame to the next (frames ordered by λ)."""
    return (grades.diff(dim=1) >= -tolerance).all(dim=1)


def ordinal_metrics(cf: Counterfactuals) -> dict[str, Tensor]:
    """Per image ``[N]`` of an ordinal walk: ``grade_monotonicity`` (Spearman of λ and the
    expected grade), ``grade_rises`` (1 when the expected grade never falls along λ),
    ``grade_first`` / ``grade_last`` (expected grade of the first and last frame) and
    ``argmax_first`` / ``argmax_last`` (their most probable grades)."""
    g, top = cf.grades().float().cpu(), cf.argmax_grades().cpu()
    return {
        "grade_monotonicity": spearman(cf.lambdas.cpu(), g),
        "grade_rises": grade_rises(g).float(),
        "grade_first": g[:, 0],
        "grade_last": g[:, -1],
        "argmax_first": top[:, 0].float(),
        "argmax_last": top[:, -1].float(),
    }


def _trapezoid(curve: Tensor) -> Tensor:
    """Area under ``[N, S + 1]`` values sampled at S equal steps over [0, 1]."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


@torch.no_grad()
def cout(
    model: nn.Module,
    query: Tensor,
    counterfactual: Tensor,
    attribution: Tensor,
    source: Tensor,
    target: Tensor,
    steps: int = 50,
    batch_size: int = 64,
) -> Tensor:
    """COUT ``[N]`` (Khorram & Fuxin 2022) of counterfactuals ``[N, C, H, W]`` for ``query``.

    Pixels (all channels of a position at once) move from the query to the counterfactual in
    descending order of ``attribution [N, 1, H, W]``, in ``steps`` equal parts; along that path
    the classifier's probabilities of ``source [N]`` (the query's class) and ``target [N]`` (the
    counterfactual's) are read, and COUT is the area under the target curve minus the area under
    the source curve (trapezoids over the share of pixels moved, 0..1). 1: the very first pixels
    already carry the full change; -1: the change only comes at the end and the wrong way.
    """
    assert query.shape == counterfactual.shape and query.ndim == 4, (
        f"query and counterfactual must be the same [N, C, H, W], got {tuple(query.shape)} "
        f"and {tuple(counterfactual.shape)}"
    )
    n, _, h, w = query.shape
    assert attribution.shape == (n, 1, h, w), (
        f"attribution must be [N, 1, H, W] = {(n, 1, h, w)}, got {tuple(attribution.shape)}"
    )
    if steps < 1:
        raise ValueError(f"cout: steps must be >= 1, got {steps}")
    device = query.device
    order = attribution.flatten(1).argsort(dim=1, descending=True, stable=True)  # [N, H*W]
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(h * w, device=device).expand(n, -1).contiguous()
    )
    # Path s moves the pixels of rank < round(s / steps * H*W): [S+1, N, 1, H, W] masks.
    counts = torch.round(torch.arange(steps + 1, device=device) / steps * (h * w)).long()
    masks = (rank[None] < counts[:, None, None]).view(steps + 1, n, 1, h, w).to(query.dtype)
    path = query[None] + masks * (counterfactual - query)[None]  # [S+1, N, C, H, W]
    flat = path.transpose(0, 1).reshape(-1, *query.shape[1:])
    probs = torch.cat([torch.softmax(model(b), 1) for b in flat.split(batch_size)])
    probs = probs.view(n, steps + 1, -1)
    rows = torch.arange(n, device=device)
    p_src = probs[rows, :, source.to(device)]
    p_tgt = probs[rows, :, target.to(device)]
    return (_trapezoid(p_tgt) - _trapezoid(p_src)).float().cpu()


def counterfactual_cout(
    model: nn.Module, cf: Counterfactuals, steps: int = 50, batch_size: int = 64
) -> Tensor:
    """COUT ``[N]`` of each sequence's judged frame (:meth:`Counterfactuals.flip_frame`) against
    the reconstruction G(E(x)) it starts from, pixels ordered by |frame − reconstruction| (the
    published "abs" order). Source: the reconstruction's decision about ``cf.target``; target:
    the other side (a binary decision: ``target`` against the rest, as the flip is defined)."""
    idx, _ = cf.flip_frame()
    rows = torch.arange(len(idx), device=cf.images.device)
    frame = cf.images[rows, idx.to(cf.images.device)]
    rec = cf.reconstruction
    attribution = (frame - rec).abs().sum(1, keepdim=True)
    ref = cf.recon_probs if cf.recon_probs is not None else cf.input_probs
    on_target = (ref > 0.5).to(rec.device)
    with torch.no_grad():
        k = int(model(rec[:1]).shape[1])
    if k != 2:
        # Multi-class: the reconstruction's argmax against the target (or, where the
        # reconstruction already is the target, the frame's argmax).
        with torch.no_grad():
            top_rec = torch.cat([model(b).argmax(1) for b in rec.split(batch_size)])
            top_frame = torch.cat([model(b).argmax(1) for b in frame.split(batch_size)])
        t = torch.full_like(top_rec, cf.target)
        source, target = top_rec, torch.where(top_rec == t, top_frame, t)
    else:
        t = torch.full((len(idx),), cf.target, dtype=torch.long, device=rec.device)
        source = torch.where(on_target, t, 1 - t)
        target = 1 - source
    return cout(model, rec, frame, attribution, source, target, steps, batch_size)


# Squares per side of the change grid of :func:`square_values` (8 px at 64 px): 2 * 64 + 2
# classifier passes per image whatever the resolution.
EFFECT_GRID = 8
# Share of the squares' positive values that the focused counterfactual keeps
# (:func:`focused_change`).
FOCUS_KEEP = 0.8


def strongest_frame(cf: Counterfactuals) -> Tensor:
    """``[N]`` index of the frame whose probability of the target (on an ordinal walk: whose
    expected grade) is farthest from the reconstruction's: the sequence's strongest
    counterfactual, with every change on the way."""
    if cf.ordinal:
        assert cf.recon_class_probs is not None, "an ordinal walk carries the reconstruction's"
        grades = cf.grades()
        ref = expected_grade(cf.recon_class_probs.to(grades.device))
        return (grades - ref[:, None]).abs().argmax(dim=1)
    ref = cf.recon_probs if cf.recon_probs is not None else cf.input_probs
    return (cf.probs - ref[:, None]).abs().argmax(dim=1)


@torch.no_grad()
def readout(model: nn.Module, x: Tensor, target: int | None, batch_size: int = 256) -> Tensor:
    """``[N]`` the classifier's probability of ``target`` for ``x [N, C, H, W]``, or with
    ``target`` None its expected grade Σ k·p_k (ordinal walks), in batches."""

    def one(b: Tensor) -> Tensor:
        p = torch.softmax(model(b).float(), 1)
        return expected_grade(p) if target is None else p[:, target]

    return torch.cat([one(b) for b in x.split(batch_size)])


@torch.no_grad()
def region_values(
    model: nn.Module,
    before: Tensor,
    after: Tensor,
    regions: Tensor,
    target: int | None,
    batch_size: int = 256,
) -> Tensor:
    """``[N, R]``: how much of the classifier's move from ``before`` to ``after`` (``[N, C, H,
    W]``) each region's change carries: its Shapley value in a game of two players, the region
    and the rest of the change,

        ½ [(p(the region changed alone) − p(before)) + (p(after) − p(all but the region changed))],

    p the probability of ``target`` (``None``: the expected grade). ``regions`` bool
    ``[N or 1, R, 1, H, W]``. The whole move for a region that holds everything the classifier
    reads, 0 for one whose change it ignores however large, and the mean of the two marginal
    contributions in between."""

    def prob(x: Tensor) -> Tensor:
        return readout(model, x, target, batch_size)

    n, r = len(before), regions.shape[1]
    p0, p1 = prob(before), prob(after)
    per = max(1, batch_size // r)  # images per chunk: about batch_size renders at a time
    out = []
    for start in range(0, n, per):
        sl = slice(start, start + per)
        m = regions if len(regions) == 1 else regions[sl]
        b, a = before[sl, None], after[sl, None]
        alone = prob(torch.where(m, a, b).flatten(0, 1)).view(-1, r)
        rest = prob(torch.where(m, b, a).flatten(0, 1)).view(-1, r)
        out.append(0.5 * ((alone - p0[sl, None]) + (p1[sl, None] - rest)))
    return torch.cat(out)


def square_index(h: int, w: int, grid: int, device: torch.device | str = "cpu") -> Tensor:
    """``[H, W]`` long: which of ``grid`` × ``grid`` squares (row-major) each pixel lies in."""
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return rows[:, None] * grid + cols[None, :]


@torch.no_grad()
def square_values(
    model: nn.Module,
    before: Tensor,
    after: Tensor,
    target: int | None,
    *,
    grid: int = EFFECT_GRID,
    batch_size: int = 256,
) -> Tensor:
    """``[N, grid²]``: where the classifier reacts to the change from ``before`` to ``after``
    (``[N, C, H, W]``, a reconstruction and a counterfactual frame). The image is cut into
    ``grid`` × ``grid`` squares (:func:`square_index`), each with its :func:`region_values`
    value, signed towards the classifier's move (positive: the square carries it where the
    counterfactual takes it): 0 for a square that did not change, and for one whose change the
    classifier ignores, however large. :func:`spread_values` draws them as a map."""
    h, w = before.shape[-2:]
    square = square_index(h, w, grid, before.device)
    masks = square[None] == torch.arange(grid * grid, device=before.device)[:, None, None]
    values = region_values(model, before, after, masks[None, :, None], target, batch_size)
    move = readout(model, after, target, batch_size) - readout(model, before, target, batch_size)
    return values * torch.where(move >= 0, 1.0, -1.0)[:, None]


def spread_values(values: Tensor, before: Tensor, after: Tensor, grid: int) -> Tensor:
    """``[N, 1, H, W]``: each square's value (``values [N, grid²]``) over its pixels, in
    proportion to how much each changed from ``before`` to ``after``, so a square's pixels add
    up to its value and an unchanged pixel is 0."""
    n, _, h, w = before.shape
    square = square_index(h, w, grid, before.device).flatten()
    change = (after - before).abs().mean(1)  # [N, H, W]
    per_square = torch.zeros(n, grid * grid, device=before.device)
    per_square.index_add_(1, square, change.flatten(1))
    index = square.expand(n, -1)
    weight = change / per_square.gather(1, index).view(n, h, w).clamp_min(1e-12)
    return (values.gather(1, index).view(n, h, w) * weight)[:, None]


def focused_change(
    before: Tensor, after: Tensor, values: Tensor, grid: int, keep: float = FOCUS_KEEP
) -> Tensor:
    """``[N, C, H, W]``: ``before`` with only the changes the classifier reacts to taken from
    ``after``: the fewest squares, by decreasing value (``values [N, grid²]``, as
    :func:`square_values`), whose values add up to ``keep`` of the sum of the positive ones.
    Where no square carries the move, ``before`` itself."""
    n, _, h, w = before.shape
    v = values.clamp_min(0)
    ranked, order = v.sort(dim=1, descending=True)
    earlier = ranked.cumsum(1) - ranked  # the value of the squares ranked above each
    chosen = (earlier < keep * ranked.sum(1, keepdim=True)) & (ranked > 0)
    take = torch.zeros_like(chosen).scatter_(1, order, chosen)
    square = square_index(h, w, grid, before.device).flatten().expand(n, -1)
    mask = take.gather(1, square).view(n, 1, h, w)
    return torch.where(mask, after, before)


@dataclass
class ChangeEffects:
    """What the classifier reacts to in each counterfactual (on the CPU).

    Attributes:
        map: ``[N, 1, H, W]`` :func:`square_values` from the reconstruction to the sequence's
            strongest frame, drawn by :func:`spread_values`.
        focused: ``[N, C, H, W]`` the reconstruction with only those changes
            (:func:`focused_change`): the counterfactual reduced to what moves f.
        focused_scores: ``[N]`` f's probability of the target for ``focused`` (ordinal walks:
            its expected grade).
        sufficiency: ``[N]`` the share of f's move (reconstruction to strongest frame) that the
            focused image reproduces; NaN where f does not move (less than 0.01).
    """

    map: Tensor
    focused: Tensor
    focused_scores: Tensor
    sufficiency: Tensor


@torch.no_grad()
def counterfactual_effects(
    model: nn.Module, cf: Counterfactuals, *, grid: int = EFFECT_GRID, batch_size: int = 256
) -> ChangeEffects:
    """:class:`ChangeEffects` between each reconstruction and its sequence's strongest frame
    (:func:`strongest_frame`), in f's probability of the target, or on an ordinal walk in its
    expected grade."""
    k = strongest_frame(cf).to(cf.images.device)
    after = cf.images[torch.arange(len(k), device=k.device), k]
    before = cf.reconstruction
    target = None if cf.ordinal else cf.target
    values = square_values(model, before, after, target, grid=grid, batch_size=batch_size)
    focused = focused_change(before, after, values, grid)
    p = [readout(model, x, target, batch_size) for x in (before, after, focused)]
    move = p[1] - p[0]
    sufficiency = torch.where(move.abs() >= 0.01, (p[2] - p[0]) / move, torch.nan)
    return ChangeEffects(
        map=spread_values(values, before, after, grid).cpu(),
        focused=focused.cpu(),
        focused_scores=p[2].cpu(),
        sufficiency=sufficiency.cpu(),
    )
