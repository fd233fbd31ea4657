"""First-layer filters, feature maps of named layers, and the share of dead (all-zero) maps.

A channel whose map is zero for every image of a batch passes nothing on: after a ReLU it is a
dead unit, the training-problem signal the review (Huff et al. 2021, section 2) reads off feature
maps. Hooks live only inside :func:`feature_maps` and are removed also after an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """``(name, module)`` of the first ``Conv2d`` in ``model.named_modules()`` order."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"{type(model).__name__} has no Conv2d layer: no filters to show")


def filter_images(conv: nn.Conv2d) -> Tensor:
    """The filters of ``conv`` as images ``[O, C, k, k]`` in [-1, 1], ``C`` 3 for RGB input else 1.

    Each filter is scaled by its own largest |weight| so that zero stays mid-gray and a weak
    filter still shows its shape; inputs that are neither 1 nor 3 channels are averaged.
    """
    w = conv.weight.detach().float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return w / scale


def default_layers(model: nn.Module) -> list[str]:
    """Names of the output of each ResNet stage (``...layers.<i>``); other models: up to four
    ``Conv2d`` layers spread from first to last."""
    for name, m in model.named_modules():
        if hasattr(m, "cam_layer") and isinstance(getattr(m, "layers", None), nn.Sequential):
            prefix = f"{name}." if name else ""
            return [f"{prefix}layers.{i}" for i in range(len(m.layers))]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: set layers=[...] by name")
    if len(convs) <= 4:
        return convs
    return [convs[round(i * (len(convs) - 1) / 3)] for i in range(4)]


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}``; an unknown name raises a ValueError that lists some valid ones."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in modules or name == "":
            valid = [n for n in modules if n][:12]
            raise ValueError(f"layers: no module named {name!r} in the model; e.g. {valid}")
        out[name] = modules[name]
    return out


@torch.no_grad()
def feature_maps(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Outputs ``{name: [N, C, h, w]}`` of the named layers for images ``x [N, C, H, W]``.

    A layer whose output is not a 4-d tensor (a Linear, a pooled vector) raises a ValueError.
    """
    captured: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args, out) -> None:
            captured[name] = out.detach().float().cpu() if isinstance(out, Tensor) else out

        return fn

    was_training = model.training
    try:
        model.eval()
        for name, module in resolve_layers(model, layers).items():
            handles.append(module.register_forward_hook(hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name in layers:
        out = captured.get(name)
        if not isinstance(out, Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"layers: {name!r} gives {shape}, expected feature maps [N, C, h, w]")
    return {name: captured[name] for name in layers}


@dataclass
class DeadMaps:
    """Dead channels of one layer over a batch."""

    dead: Tensor  # [C] bool: the channel's map is zero for every image of the batch
    images: int  # N, the batch size the verdict rests on

    @property
    def count(self) -> int:
        return int(self.dead.sum())

    @property
    def share(self) -> float:
        return self.count / max(1, len(self.dead))


def dead_maps(maps: Tensor, eps: float = 0.0) -> DeadMaps:
    """Channels of ``maps [N, C, h, w]`` whose |value| never exceeds ``eps`` over batch and space."""
    assert maps.ndim == 4, f"expected maps [N, C, h, w], got {tuple(maps.shape)}"
    peak = maps.abs().amax(dim=(0, 2, 3))
    return DeadMaps(dead=peak <= eps, images=int(maps.shape[0]))


def map_images(maps: Tensor, limit: int = 64) -> Tensor:
    """The first ``limit`` channels of one image's maps ``[C, h, w]`` as images ``[c, 1, h, w]``
    in [-1, 1], each stretched over its own range (a constant map is drawn black)."""
    m = maps[:limit].float()
    lo = m.amin(dim=(1, 2), keepdim=True)
    span = (m.amax(dim=(1, 2), keepdim=True) - lo).clamp_min(1e-12)
    return ((m - lo) / span * 2 - 1)[:, None]
