"""StyleGAN2-ADA training maths as pure functions: losses, regularisers, EMA, lazy regularisation.

Published facts (Karras et al. 2020): non-saturating logistic loss, R1 on reals (gamma/2),
path-length regularisation with an EMA of the mean length, lazy regularisation (the
regulariser every I steps, scaled by I, with Adam's lr and betas adjusted by I/(I+1)), a G EMA
whose half-life is ``ema_kimg`` thousand images with a ramp-up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G loss ``softplus(-D(G(z)))``, mean over ``fake_logits [N, 1]``."""
    return F.softplus(-fake_logits).mean()


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D loss ``softplus(D(G(z))) + softplus(-D(x))``, means over ``[N, 1]`` logits."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||dD(aug(x))/dx||²`` ``[N]`` w.r.t. the un-augmented reals ``x`` (requires_grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3))


def path_length(images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per-sample path lengths ``[N]``: ``|J_w^T y|`` for image-space noise ``y`` ~ N(0, 1/(H·W)).

    ``images [N, C, H, W]`` must come from ``ws [N, num_ws, w_dim]`` (requires_grad).
    """
    h, w = images.shape[2:]
    noise = torch.randn_like(images) / math.sqrt(h * w)
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


def lazy_adam_hparams(
    lr: float, betas: tuple[float, float], interval: int
) -> tuple[float, tuple[float, float]]:
    """Adam settings for a loss whose regulariser runs every ``interval`` steps (0: never)."""
    if interval <= 0:
        return lr, betas
    ratio = interval / (interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


def ema_beta(batch: int, nimg: int, ema_kimg: float, rampup: float | None) -> float:
    """G EMA decay per step: half-life ``ema_kimg`` thousand images, ramped up over ``rampup × nimg``."""
    ema_nimg = ema_kimg * 1000
    if rampup is not None and rampup > 0:
        ema_nimg = min(ema_nimg, nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema ← model + beta (ema - model)`` for parameters; buffers are copied."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    assert len(ema_params) == len(params), f"{len(ema_params)} EMA parameters for {len(params)}"
    torch._foreach_lerp_(ema_params, params, 1 - beta)  # one call, not one per tensor
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def mixing_cutoff(num_ws: int, prob: float, generator: torch.Generator | None = None) -> int | None:
    """Style mixing: with probability ``prob`` a cutoff uniform in ``[1, num_ws)``, else None."""
    if prob <= 0 or num_ws < 2 or torch.rand((), generator=generator).item() >= prob:
        return None
    return int(torch.randint(1, num_ws, (), generator=generator).item())
