"""Counterfactual metrics: pure functions of a :class:`Counterfactuals` result.

- flip rate: share of images whose decision crosses 0.5 inside the λ range;
- monotonicity: Spearman correlation of λ and the target probability along each sequence;
- proximity: L1 and LPIPS of the first flipping frame to the reconstruction G(E(x));
- fidelity: the reconstruction error carried by the result.

COUT (Khorram & Fuxin 2022) is not computed: it needs a pixel-insertion curve per image that
the sequences here do not define.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cfexplain.explain.counterfactual import Counterfactuals


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
