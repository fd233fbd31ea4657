"""CLEAR-DR dominant-class maps (Kumar et al. 2019): per pixel, the class with the largest attribution.

Two maps from the per-class attributions ``A [N, K, H, W]``: the *dominant class* (argmax over
``K``) and the *dominant level* (that maximum). The registry method ``dominant_class``
(``attribution.DominantClass``) computes ``A`` with a base method (grad-CAM by default); this
module holds the maths and the drawing, kept apart: computing a map is separate from drawing it.

Binary models have two classes, so the map says per pixel whether the evidence for the negative
or the positive class is larger. For a base method linear in the logit (grad-CAM without ReLU,
saliency without ``abs``, integrated gradients, LRP-epsilon) ``A_1 - A_0`` is the attribution of
the margin ``z_1 - z_0`` that the softmax depends on, so class 1 dominates exactly where the
margin's attribution is positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Pixels where every class has this little attribution (relative to the image's top level) are
# drawn black: an argmax over zeros carries no information.
_LEVEL_FLOOR = 1e-6


def dominant_class_map(per_class: Tensor) -> tuple[Tensor, Tensor]:
    """``A [N, K, H, W]`` -> ``(classes LongTensor [N, H, W], levels [N, 1, H, W])``.

    ``classes`` is ``argmax_k A_k`` per pixel (ties go to the lowest index), ``levels`` the
    attribution of that class, in the base method's units (negative where every class is).
    """
    assert per_class.ndim == 4 and per_class.shape[1] >= 2, (
        f"expected per-class maps [N, K>=2, H, W], got {tuple(per_class.shape)}"
    )
    levels, classes = per_class.max(dim=1, keepdim=True)
    return classes[:, 0], levels


def class_colours(num_classes: int) -> np.ndarray:
    """A categorical colour per class: uint8 ``[K, 3]`` (matplotlib's tab10, tab20 beyond 10)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    if num_classes > cmap.N:
        raise ValueError(
            f"draw_dominant: at most {cmap.N} classes can be coloured, got {num_classes}"
        )
    return (np.asarray([cmap(k)[:3] for k in range(num_classes)]) * 255).round().astype(np.uint8)


def draw_dominant(
    classes: Tensor | np.ndarray, levels: Tensor | np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, list[tuple[str, tuple[int, int, int]]]]:
    """One image's dominant-class map as colour: ``classes [H, W]``, ``levels [H, W]`` (or
    ``[1, H, W]``) -> ``(RGB uint8 [H, W, 3], legend [(class name, (r, g, b)), ...])``.

    Hue is the dominant class; brightness its level, scaled by the image's top level (levels at or
    below zero are black: no class has positive evidence there).
    """
    cls = torch.as_tensor(np.asarray(classes) if isinstance(classes, np.ndarray) else classes)
    lev = torch.as_tensor(np.asarray(levels) if isinstance(levels, np.ndarray) else levels)
    cls, lev = cls.detach().cpu().long(), lev.detach().cpu().float()
    if lev.ndim == 3 and lev.shape[0] == 1:
        lev = lev[0]
    if cls.ndim != 2 or lev.shape != cls.shape:
        raise ValueError(
            f"draw_dominant: expected classes [H, W] and levels [H, W] of one image, got "
            f"{tuple(cls.shape)} and {tuple(lev.shape)}"
        )
    k = len(class_names)
    if cls.numel() and (int(cls.min()) < 0 or int(cls.max()) >= k):
        raise ValueError(
            f"draw_dominant: class indices {int(cls.min())}..{int(cls.max())} do not fit "
            f"{k} class_names {list(class_names)}"
        )
    colours = class_colours(k)
    lev = lev.clamp(min=0)
    top = float(lev.max()) if lev.numel() else 0.0
    bright = (lev / top).numpy() if top > _LEVEL_FLOOR else np.zeros(lev.shape, np.float32)
    rgb = (colours[cls.numpy()].astype(np.float32) * bright[..., None]).round()
    legend = [(str(name), tuple(int(v) for v in colours[i])) for i, name in enumerate(class_names)]
    return rgb.clip(0, 255).astype(np.uint8), legend


def class_shares(classes: Tensor, num_classes: int) -> Tensor:
    """Share of pixels each class dominates: ``classes [N, H, W]`` -> ``[N, K]``, rows summing to 1."""
    n = classes.shape[0]
    counts = torch.zeros(n, num_classes, dtype=torch.float64, device=classes.device)
    counts.scatter_add_(
        1, classes.flatten(1), torch.ones_like(classes.flatten(1), dtype=counts.dtype)
    )
    return (counts / counts.sum(1, keepdim=True).clamp(min=1)).float()
