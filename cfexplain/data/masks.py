"""Ground-truth masks of the phantoms' samples: the pathology a map should point at, and the
per-class masks a segmentation model learns (``meta['masks']``, bool ``[H, W]`` each)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cfexplain.data.phantoms.knee import JSW_DEFINITE


def pathology_mask(meta: Mapping[str, Any]) -> torch.Tensor | None:
    """Ground-truth pathology ``bool [H, W]`` of a phantom sample, or None without masks.

    Knee: osteophytes ∪ sclerosis ∪ the joint space when it is definitely narrowed (the
    narrower compartment at or below the KL 'definite narrowing' width). Histology: the tumour.
    """
    masks = meta.get("masks") or {}
    if "tumour" in masks:
        return masks["tumour"].bool()
    if "osteophyte" in masks and "sclerosis" in masks:
        m = masks["osteophyte"].bool() | masks["sclerosis"].bool()
        f = meta["factors"]
        if min(f["jsw_medial"], f["jsw_lateral"]) <= JSW_DEFINITE:
            m = m | masks["joint_space"].bool()
        return m
    return None


def mask_names(ds: Dataset, classes: Sequence[str] | None = None) -> list[str]:
    """The mask names to segment: ``classes`` when given (each must exist), else the dataset's."""
    available = list((ds[0].get("meta", {}).get("masks") or {}).keys())
    if not available:
        raise ValueError(
            f"segmentation: {getattr(ds, 'source', 'the dataset')} has no masks "
            "(meta['masks']); the built-in phantoms have them (+dataset=knee or histology)"
        )
    if classes is None:
        return available
    wanted = [str(c) for c in classes]
    unknown = [c for c in wanted if c not in available]
    if unknown or not wanted:
        raise ValueError(
            f"segmentation.classes={wanted}: expected a non-empty subset of {available}"
        )
    return wanted


def stack_masks(metas: Sequence[Mapping[str, Any]], classes: Sequence[str], size) -> torch.Tensor:
    """Bool ``[N, K, H, W]`` from each sample's ``meta['masks']``; a missing mask is empty.

    (The shared collate keeps metas as dicts; masks are batched here.)
    """
    h, w = size
    out = torch.zeros(len(metas), len(classes), h, w, dtype=torch.bool)
    for i, meta in enumerate(metas):
        masks = meta.get("masks") or {}
        for k, name in enumerate(classes):
            if name in masks:
                out[i, k] = masks[name].bool()
    return out
