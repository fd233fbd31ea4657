"""Class maximisation (Simonyan et al. 2014): the input that the classifier finds most ``target``.

Input space: projected gradient ascent on ``S_c(x) - l2 · mean(x²)`` with x clamped to the image
range [-1, 1] after every step (Adam steps; the paper used plain gradient steps, Adam needs no
tuning of the step size to the logit scale). The mean instead of the paper's sum keeps ``l2``
independent of the resolution. Alone, this finds high-frequency patterns that no radiograph has;
the image priors of Yosinski et al. 2015 make it readable: a random shift of up to ``jitter``
pixels before every step (the pattern must work wherever it lands) and a Gaussian blur of
``blur_sigma`` pixels every ``blur_every`` steps.

Generator-constrained: the same ascent in W, ``S_c(G(w)) - l2 · mean((w - w0)²)``, so the image
stays one that G can draw (a natural-image prior). ``w0`` is ``w_avg`` or ``E(x)`` of an image.
Gradients are taken with respect to the input only: the models' ``.grad`` stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ClassMax:
    """The result of one ascent of ``N`` starts."""

    images: Tensor  # [N, C, H, W] in [-1, 1]
    logits: Tensor  # [steps + 1, N] target logit at the start, after every step
    w: Tensor | None = None  # [N, num_ws, w_dim] for the generator-constrained variant


def _target_logit(model: nn.Module, x: Tensor, target: int) -> Tensor:
    logits = model(x)
    assert logits.ndim == 2 and 0 <= target < logits.shape[1], (
        f"target={target} but the classifier gives logits {tuple(logits.shape)}"
    )
    return logits[:, target]


def maximise_input(
    model: nn.Module,
    target: int,
    shape: tuple[int, int, int, int],
    *,
    steps: int = 100,
    lr: float = 0.05,
    l2: float = 0.5,
    start: Tensor | None = None,
    seed: int = 0,
    jitter: int = 0,
    blur_every: int = 0,
    blur_sigma: float = 1.0,
) -> ClassMax:
    """Ascent on images of ``shape [N, C, H, W]`` from ``start`` (default: mid-gray plus a little
    seeded noise, so the N starts differ); ``jitter``, ``blur_every``, ``blur_sigma``: the image
    priors above (0: off)."""
    from cfexplain.explain.attribution import isolated
    from cfexplain.utils.images import gaussian_blur

    device = next(model.parameters()).device
    if start is None:
        gen = torch.Generator().manual_seed(seed)
        start = 0.05 * torch.randn(shape, generator=gen)
    x = start.detach().to(device).float().clamp(-1, 1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    trajectory = []
    shifts = torch.Generator().manual_seed(seed + 1)
    with isolated(model):
        for step in range(steps):
            dy, dx = (
                torch.randint(-jitter, jitter + 1, (2,), generator=shifts) if jitter else (0, 0)
            )
            seen = torch.roll(x, shifts=(int(dy), int(dx)), dims=(-2, -1)) if jitter else x
            logit = _target_logit(model, seen, target)
            trajectory.append(logit.detach().cpu())
            objective = logit.sum() - l2 * x.pow(2).flatten(1).mean(1).sum()
            (grad,) = torch.autograd.grad(objective, x)
            opt.zero_grad(set_to_none=True)
            x.grad = -grad  # Adam minimises; we ascend
            opt.step()
            with torch.no_grad():
                if blur_every and (step + 1) % blur_every == 0:
                    x.copy_(gaussian_blur(x, blur_sigma))
                x.clamp_(-1, 1)
        with torch.no_grad():
            trajectory.append(_target_logit(model, x, target).cpu())
    return ClassMax(images=x.detach().cpu(), logits=torch.stack(trajectory))


def maximise_latent(
    G: nn.Module,
    model: nn.Module,
    target: int,
    w0: Tensor,
    *,
    steps: int = 100,
    lr: float = 0.02,
    l2: float = 0.1,
) -> ClassMax:
    """Ascent in W from ``w0 [N, num_ws, w_dim]``; images are ``G.synthesis(w)`` clamped to
    [-1, 1], which is also what the classifier sees."""
    from cfexplain.explain.attribution import isolated

    device = next(G.parameters()).device
    assert w0.ndim == 3 and w0.shape[1:] == (G.num_ws, G.w_dim), (
        f"w0 must be [N, {G.num_ws}, {G.w_dim}], got {tuple(w0.shape)}"
    )
    w0 = w0.detach().to(device).float()
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    trajectory = []

    def render(w: Tensor) -> Tensor:
        return G.synthesis(w, noise_mode="const").clamp(-1, 1)

    was_training = G.training
    try:
        G.eval()
        with isolated(model):
            for _ in range(steps):
                logit = _target_logit(model, render(w), target)
                trajectory.append(logit.detach().cpu())
                objective = logit.sum() - l2 * (w - w0).pow(2).flatten(1).mean(1).sum()
                (grad,) = torch.autograd.grad(objective, w)
                opt.zero_grad(set_to_none=True)
                w.grad = -grad
                opt.step()
            with torch.no_grad():
                images = render(w)
                trajectory.append(_target_logit(model, images, target).cpu())
    finally:
        G.train(was_training)
    return ClassMax(images=images.cpu(), logits=torch.stack(trajectory), w=w.detach().cpu())


def w_average(G: nn.Module, n: int) -> Tensor:
    """``[n, num_ws, w_dim]`` copies of the mapping network's running mean ``w_avg``."""
    w_avg = G.mapping.w_avg.detach().float()
    return w_avg.expand(n, G.num_ws, G.w_dim).clone()
