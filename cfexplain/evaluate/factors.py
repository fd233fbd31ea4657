"""What a counterfactual changed, factor by factor, read by a :class:`FactorOracle`.

- change: ``|oracle(after) - oracle(before)| / scale`` per factor; ``scale`` is the factor's std
  on the phantom (``oracle.change_scale``), 1 for binary factors (a change of probability);
- causal/nuisance ratio: mean change of the ``CAUSAL`` factors over that of the ``NUISANCE``
  ones, pooled over images (see :func:`causal_nuisance_ratio`);
- MNAC: the number of factors whose change exceeds a threshold, as the "mean number of
  attributes changed" of the DiME / ACE evaluations (see :func:`mnac`);
- realism: classifier-feature Fréchet distance of frames vs real images
  (:class:`cfexplain.utils.quality.FeatureStats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cfexplain.evaluate.oracles import CAUSAL, NUISANCE, FactorOracle
from cfexplain.explain.counterfactual import Counterfactuals
from cfexplain.utils.quality import FeatureStats

if TYPE_CHECKING:
    from cfexplain.explain.attributes import StyleLayout

# Half a standard deviation of the factor on the phantom: below one KL step of every disease
# factor, yet above the reading noise of a demo-scale oracle for most images. For binary factors
# the change is one of probability, so 0.5 means the reading moved across most of [0, 1]. How
# often noise alone crosses it, for a given oracle, is the MNAC of the nuisance-only edits of
# :func:`true_counterfactual_ratios` (the causal factors did not change there).
MNAC_THRESHOLD = 0.5

# Where the knee phantom burns its lead marker: the corners, clockwise from top left.
CORNERS = ("top left", "top right", "bottom right", "bottom left")


@torch.no_grad()
def read_factors(oracle: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Oracle readings ``[..., F]`` of images ``[..., C, H, W]`` (any leading dims), batched."""
    assert images.ndim >= 4, f"expected images [..., C, H, W], got {tuple(images.shape)}"
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    device = next(oracle.parameters()).device
    was = oracle.training
    oracle.eval()
    out = torch.cat([oracle(b.to(device)).float().cpu() for b in flat.split(batch_size)])
    oracle.train(was)
    return out.reshape(*lead, out.shape[-1])


def factor_changes(oracle: nn.Module, before: Tensor, after: Tensor, scale: Tensor) -> Tensor:
    """``[N, F]`` standardised changes ``|oracle(after) - oracle(before)| / scale`` of images
    ``before, after [N, C, H, W]``; ``scale [F]`` (e.g. ``oracle.change_scale``)."""
    assert before.shape == after.shape, f"{tuple(before.shape)} vs {tuple(after.shape)}"
    return _standardise(read_factors(oracle, after) - read_factors(oracle, before), scale)


def _standardise(delta: Tensor, scale: Tensor) -> Tensor:
    scale = scale.detach().float().cpu()
    assert scale.shape == delta.shape[-1:], (
        f"scale must be [F={delta.shape[-1]}], got {tuple(scale.shape)}"
    )
    return delta.abs() / scale


def _columns(factors: Sequence[str], names: Sequence[str]) -> list[int]:
    return [j for j, f in enumerate(factors) if f in names]


def causal_nuisance_ratio(
    changes: Tensor,
    factors: Sequence[str],
    causal: Sequence[str] = CAUSAL,
    nuisance: Sequence[str] = NUISANCE,
) -> float:
    """Mean standardised change of the causal factors over that of the nuisance factors.

    Pooled: each mean runs over all images and factors of its group before the division. A
    per-image ratio explodes on images whose nuisance change is near 0 (the common case for a
    good counterfactual), so its mean would be ruled by a few images. ``changes [N, F]`` with
    columns named by ``factors``. ``inf`` when nothing nuisance changed but something causal did,
    NaN when neither changed or a group has no column.
    """
    assert changes.ndim == 2 and changes.shape[1] == len(factors), (
        f"changes must be [N, F={len(factors)}], got {tuple(changes.shape)}"
    )
    c, n = _columns(factors, causal), _columns(factors, nuisance)
    if not c or not n or not len(changes):
        return math.nan
    num = changes[:, c].double().mean().item()
    den = changes[:, n].double().mean().item()
    if den == 0.0:
        return math.inf if num > 0 else math.nan
    return num / den


def mnac(changes: Tensor, threshold: float | Tensor = MNAC_THRESHOLD) -> Tensor:
    """``[N]`` number of factors whose standardised change exceeds ``threshold`` (a float, or one
    per factor ``[F]``), from ``changes [N, F]``; its mean over images is the MNAC."""
    thr = torch.as_tensor(threshold, dtype=changes.dtype, device=changes.device)
    return (changes > thr).sum(dim=-1)


def counterfactual_factors(
    oracle: FactorOracle,
    cf: Counterfactuals,
    scale: Tensor | None = None,
    threshold: float | Tensor = MNAC_THRESHOLD,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Factor changes between each reconstruction G(E(x)) and its flipping frame.

    Images that did not flip are compared with their last frame towards a flip
    (:meth:`Counterfactuals.flip_frame`); ``flipped`` says which did, and ``ratio_flipped`` / ``mnac_flipped``
    use the flipped images alone. ``scale [F]`` defaults to ``oracle.change_scale``.

    Returns ``factors`` (names), ``before`` / ``after`` ``[N, F]`` readings, ``changes [N, F]``,
    ``frame_index [N]``, ``flipped [N]``, ``ratio``, ``ratio_flipped``, ``mnac [N]``,
    ``mnac_mean``, ``mnac_flipped``, and with a ``marker`` factor ``marker_changed [N]`` bool:
    the marker reading is on the other side of 0.5 from the reconstruction's in any frame of
    the sequence (both directions of λ: removing the marker exposes a shortcut as well as
    adding it), and ``marker_frame [N]``: the first such frame from the reconstruction (least
    |λ|), -1 where there is none.
    """
    names = list(oracle.factors)
    scale = oracle.change_scale if scale is None else scale
    before = read_factors(oracle, cf.reconstruction, batch_size)  # [N, F]
    frames = read_factors(oracle, cf.images, batch_size)  # [N, K, F]
    index, flipped = cf.flip_frame()
    index, flipped = index.cpu(), flipped.cpu()
    after = frames[torch.arange(len(index)), index]
    changes = _standardise(after - before, scale)
    counts = mnac(changes, threshold)
    out: dict[str, Any] = {
        "factors": names,
        "before": before,
        "after": after,
        "changes": changes,
        "frame_index": index,
        "flipped": flipped,
        "ratio": causal_nuisance_ratio(changes, names),
        "ratio_flipped": causal_nuisance_ratio(changes[flipped], names),
        "mnac": counts,
        "mnac_mean": counts.float().mean().item() if len(counts) else math.nan,
        "mnac_flipped": counts[flipped].float().mean().item() if flipped.any() else math.nan,
    }
    if "marker" in names:
        j = names.index("marker")
        present = frames[..., j] > 0.5  # [N, K]
        differs = present != (before[:, j] > 0.5)[:, None]
        out["marker_changed"] = differs.any(dim=1)
        dist = torch.where(differs, cf.lambdas.abs().cpu(), torch.full(differs.shape, math.inf))
        out["marker_frame"] = torch.where(out["marker_changed"], dist.argmin(dim=1), -1)
    return out


# Ground-truth edits of the phantom: (name, kind, overrides before, overrides after).
TRUE_EDITS = (
    ("osteophyte", "disease", {"osteophyte": 0.0}, {"osteophyte": 0.1}),
    ("sclerosis", "disease", {"sclerosis": 0.0}, {"sclerosis": 0.8}),
    (
        "narrowing",
        "disease",
        {"jsw_medial": 0.07, "jsw_lateral": 0.07},
        {"jsw_medial": 0.025, "jsw_lateral": 0.045},
    ),
    ("rotation", "nuisance", {"rotation": -6.0}, {"rotation": 6.0}),
    ("exposure", "nuisance", {"exposure": 0.8}, {"exposure": 1.25}),
    ("marker", "nuisance", {"marker": 0.0}, {"marker": 1.0}),
)


def true_counterfactual_ratios(
    oracle: FactorOracle, n: int = 64, seed: int = 0, batch_size: int = 256
) -> dict[str, dict[str, Any]]:
    """The causal/nuisance ratio and MNAC of true counterfactuals, per edit of ``TRUE_EDITS``.

    Pairs of knee phantoms that differ in one factor only (same anatomy and noise,
    :meth:`KneePhantom.render`) show what the metrics read when the truth is known: a
    disease-only edit should give a large ratio, a nuisance-only edit a small one; the latter
    is the floor that the oracle's reading noise sets. Images: split ``val`` of the oracle's
    seed (:data:`ORACLE_SEED_OFFSET` + ``seed``), which it was neither trained nor tested on.
    Returns ``{edit: {"kind", "ratio", "mnac_mean", "changes": {factor: mean change}}}`` and
    ``"signed_changes"``, the mean signed change per factor.
    """
    from cfexplain.data.phantoms.knee import KneePhantom
    from cfexplain.evaluate.oracles import ORACLE_SEED_OFFSET

    ds = KneePhantom(n, oracle.resolution, seed=ORACLE_SEED_OFFSET + seed, split="val", cache=False)
    out = {}
    for name, kind, a, b in TRUE_EDITS:
        before = torch.stack([ds.render(i, a)["image"] for i in range(n)])
        after = torch.stack([ds.render(i, b)["image"] for i in range(n)])
        delta = read_factors(oracle, after, batch_size) - read_factors(oracle, before, batch_size)
        ch = _standardise(delta, oracle.change_scale)
        signed = delta / oracle.change_scale.detach().float().cpu()
        out[name] = {
            "kind": kind,
            "ratio": causal_nuisance_ratio(ch, oracle.factors),
            "mnac_mean": mnac(ch).float().mean().item(),
            "changes": dict(zip(oracle.factors, ch.mean(0).tolist())),
            "signed_changes": dict(zip(oracle.factors, signed.mean(0).tolist())),
        }
    return out


def realism_fd(features: FeatureStats, frames: Tensor, real: Tensor) -> float:
    """Classifier-feature Fréchet distance of frames ``[..., C, H, W]`` (e.g. all counterfactual
    frames ``[N, K, C, H, W]`` or the flipping ones ``[N, C, H, W]``) vs real images
    ``[M, C, H, W]``; both sets need more images than one to have a covariance."""
    fake = frames.reshape(-1, *frames.shape[-3:])
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(
            f"realism_fd needs at least 2 frames and 2 real images, got {len(fake)} and {len(real)}"
        )
    return features.compare(features.features(fake), features.features(real))["fd_classifier"]


# ----------------------------------------------------------------------------- attributes


def dominant_factor(mean_abs_change: dict[str, float]) -> tuple[str, float]:
    """``(factor, specificity)``: the factor with the largest mean |change| and the share of the
    summed mean |changes| that falls on it (1: the change is that factor alone)."""
    total = sum(abs(v) for v in mean_abs_change.values())
    name = max(mean_abs_change, key=lambda f: abs(mean_abs_change[f]))
    return name, (abs(mean_abs_change[name]) / total if total > 0 else math.nan)


@torch.no_grad()
def attribute_factors(
    oracle: FactorOracle,
    G: nn.Module,
    s: Tensor,
    attributes: Sequence[Any],
    steps: Sequence[float],
    has_marker: Tensor | None = None,
    batch_size: int = 64,
    before: Tensor | None = None,
    corner: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Every factor read before (``before [N, F]`` when already read) and after each attribute's
    change, over the images ``s [N, S]``.

    ``attributes[i]`` (an :class:`~cfexplain.explain.attributes.Attribute`) moves its coordinate
    by ``steps[i]`` (``sign · d · σ``: its counterfactual); the opposite move is read too. Per
    attribute: ``change`` (mean standardised change per factor, signed, towards the class),
    ``abs_change`` (mean |change|), the ``dominant`` factor and its ``specificity`` (share of
    the summed mean |changes|; ``dominant_mean`` and ``specificity_mean`` the same of the
    mean signed changes), and with a marker factor ``marker_toggled``: the share of the
    images (with a marker, ``has_marker [N]``, when given) whose marker reading crosses 0.5 at
    +d or at -d; with ``corner [N]`` (:func:`marker_corners`) also ``marker_toggled_by_corner``,
    the same share among the images with their marker in each corner (None: no such image).
    """
    from cfexplain.explain.attributes import render

    names = list(oracle.factors)

    def read(styles: Tensor) -> Tensor:
        imgs = torch.cat([render(G, b) for b in styles.split(batch_size)])
        return read_factors(oracle, imgs, batch_size)

    before = read(s) if before is None else before
    out = []
    for a, step in zip(attributes, steps):
        after = {}
        for sign in (1.0, -1.0):
            moved = s.clone()
            moved[:, a.coordinate] += sign * step
            after[sign] = read(moved)
        delta = (after[1.0] - before) / oracle.change_scale.float().cpu()
        abs_change = dict(zip(names, delta.abs().mean(0).tolist()))
        factor, specificity = dominant_factor(abs_change)
        # Of the mean signed changes: the reading noise of single images averages out here.
        signed_factor, signed_specificity = dominant_factor(
            dict(zip(names, delta.mean(0).tolist()))
        )
        row: dict[str, Any] = {
            "attribute": a.label(),
            "class": a.cls,
            "rank": a.rank,
            "layer": a.layer,
            "channel": a.channel,
            "sign": a.sign,
            "change": dict(zip(names, delta.mean(0).tolist())),
            "abs_change": abs_change,
            "dominant": factor,
            "specificity": specificity,
            "dominant_mean": signed_factor,
            "specificity_mean": signed_specificity,
        }
        if "marker" in names:
            j = names.index("marker")
            was = before[:, j] > 0.5
            toggled = ((after[1.0][:, j] > 0.5) != was) | ((after[-1.0][:, j] > 0.5) != was)
            pool = has_marker.cpu() if has_marker is not None else torch.ones_like(was)
            row["marker_toggled"] = float(toggled[pool].float().mean()) if pool.any() else math.nan
            row["marker_toggled_all"] = float(toggled.float().mean())
            if corner is not None:
                row["marker_toggled_by_corner"] = _by_corner(toggled, corner.cpu())
        out.append(row)
    return out


def marker_corners(masks: Tensor) -> Tensor:
    """``[N]`` long: the corner of each image's lead marker (0-3 clockwise from top left, as
    :data:`CORNERS` names them) from its mask ``masks [N, H, W]``; -1 without a marker."""
    from cfexplain.data.phantoms.knee import marker_places

    places = marker_places(masks.shape[-1]).to(masks.device)
    overlap = (masks[:, None].bool() & places[None]).flatten(2).sum(-1)  # [N, 4]
    return torch.where(overlap.amax(1) > 0, overlap.argmax(1), -1)


def _by_corner(toggled: Tensor, corner: Tensor) -> list[float | None]:
    return [
        float(toggled[corner == c].float().mean()) if (corner == c).any() else None
        for c in range(len(CORNERS))
    ]


def marker_by_corner(rows: Sequence[dict[str, Any]], corner: Tensor) -> dict[str, Any]:
    """Which attribute removes the marker in each corner: of ``rows`` (:func:`attribute_factors`
    with ``corner``), per corner the one that toggles the marker in most of the images with it
    there (chosen and scored on the same images; None when none toggles it, or no image has its
    marker there), and ``toggled``: the share of all the images with a marker whose marker the
    attribute of its corner toggles.

    A style coordinate scales one channel of one layer, and a generator may draw each corner's
    marker with its own channels: then one attribute toggles the marker of one corner only."""
    corners, hits = [], 0.0
    for c, name in enumerate(CORNERS):
        n = int((corner == c).sum())
        entry: dict[str, Any] = {"corner": name, "images": n, "attribute": None, "toggled": None}
        if n and rows:  # the rows' share for this corner is a number exactly when n > 0
            best = max(rows, key=lambda r: r["marker_toggled_by_corner"][c])
            entry["toggled"] = best["marker_toggled_by_corner"][c]
            hits += n * entry["toggled"]
            if entry["toggled"] > 0:
                entry |= {"attribute": best["attribute"], "class": best["class"],
                          "rank": best["rank"]}  # fmt: skip
        corners.append(entry)
    marked = int((corner >= 0).sum())
    return {"corners": corners, "toggled": hits / marked if marked and rows else math.nan}


@torch.no_grad()
def factor_coordinates(
    oracle: FactorOracle,
    G: nn.Module,
    s: Tensor,
    step: Tensor,
    layout: StyleLayout,
    has_marker: Tensor | None = None,
    batch_size: int = 64,
    min_change: float = MNAC_THRESHOLD,
    before: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Per factor, the single style coordinate that moves it most: every coordinate of
    ``s [N, S]`` shifted by ``±step [S]`` (``d · σ``) alone, every factor read before and after.

    What AttFind could at best find for that factor, whatever the classifier reads: when even
    the best coordinate is unspecific (or, for the marker, toggles it in few images), the
    generator has no attribute for the factor and no classifier-driven search can surface one.
    Per factor: ``layer``, ``channel``, ``sign``, ``change`` (that factor's mean |standardised
    change|), ``specificity`` (its share of the coordinate's summed mean |changes|), and for the
    marker ``marker_toggled`` (share of the images with a marker, ``has_marker [N]``, whose
    reading crosses 0.5 at +d or -d; the coordinate is chosen on it); and ``most_specific``: of
    the (coordinate, sign) pairs that move the factor by at least ``min_change``, the one whose
    change falls most on it (None when none moves it that far). ``N · 2S`` renders (and ``N``
    more unless ``before [N, F]``, the factors of G(s), is given)."""
    from cfexplain.explain.attributes import one_at_a_time, render

    names, (n, S) = list(oracle.factors), s.shape
    scale = oracle.change_scale.float().cpu()
    if before is None:
        before = read_factors(oracle, torch.cat([render(G, b) for b in s.split(batch_size)]))
    rows = torch.arange(S).repeat(2)
    signs = torch.cat([torch.ones(S), -torch.ones(S)])
    moved_abs = torch.zeros(2 * S, len(names))
    flips = torch.zeros(2, S, n, dtype=torch.bool)  # the marker reading crosses 0.5
    j = names.index("marker") if "marker" in names else None
    for i in range(n):
        after = torch.cat(
            [
                read_factors(oracle, render(G, sb), batch_size)
                for sb in one_at_a_time(s[i], rows, signs, step, batch_size)
            ]
        )
        moved_abs += ((after - before[i]) / scale).abs()
        if j is not None:
            flips[:, :, i] = ((after[:, j] > 0.5) != (before[i, j] > 0.5)).view(2, S)
    mean = (moved_abs / n).view(2, S, len(names))
    pool = has_marker.cpu() if has_marker is not None else torch.ones(n, dtype=torch.bool)
    toggled = (flips[0] | flips[1])[:, pool].float().mean(1) if pool.any() else None
    out = []
    for f, name in enumerate(names):
        if name == "marker" and toggled is not None:
            c = int(toggled.argmax())
            sign = 0 if mean[0, c, f] >= mean[1, c, f] else 1
        else:
            sign, c = divmod(int(mean[:, :, f].flatten().argmax()), S)
        row = {"factor": name, **_coordinate(layout, mean, sign, c, f)}
        if name == "marker" and toggled is not None:
            row["marker_toggled"] = float(toggled[c])
        share = mean[:, :, f] / mean.sum(-1).clamp_min(1e-12)
        strong = mean[:, :, f] >= min_change
        row["most_specific"] = None
        if strong.any():
            sign, c = divmod(int(share.where(strong, -1.0).flatten().argmax()), S)
            row["most_specific"] = _coordinate(layout, mean, sign, c, f)
        out.append(row)
    return out


def _coordinate(layout: StyleLayout, mean: Tensor, sign: int, c: int, f: int) -> dict[str, Any]:
    """Coordinate ``c`` moved with sign index ``sign`` (0: +d) as factor ``f`` sees it in
    ``mean [2, S, F]`` (mean |standardised change|)."""
    layer, channel = layout.locate(c)
    return {
        "coordinate": c,
        "layer": layer,
        "channel": channel,
        "sign": 1 if sign == 0 else -1,
        "change": float(mean[sign, c, f]),
        "specificity": float(mean[sign, c, f] / mean[sign, c].sum().clamp_min(1e-12)),
    }


def calibration_rows(calibration: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The true one-factor edits of :func:`true_counterfactual_ratios` as rows of the attribute
    × factor table: what a perfectly specific change reads through the same oracles."""
    rows = []
    for edit, r in calibration.items():
        factor, specificity = dominant_factor(r["changes"])
        row = {
            "attribute": f"true edit: {edit}",
            "abs_change": r["changes"],
            "dominant": factor,
            "specificity": specificity,
        }
        if "signed_changes" in r:
            row["change"] = r["signed_changes"]
            row["dominant_mean"], row["specificity_mean"] = dominant_factor(r["signed_changes"])
        rows.append(row)
    return rows
