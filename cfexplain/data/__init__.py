"""Datasets: built-in phantoms with ground truth, and readers of real formats.

A sample is ``{"image": float32 [C, H, W] in [-1, 1], "label": int, "meta": {...}}``.
``build_dataset(cfg.data, split)`` is the one door the stages use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
PHANTOMS = ("knee", "histology")


def build_dataset(data: Mapping[str, Any], split: str) -> Dataset:
    """The ``split`` of the dataset that the ``data`` config describes.

    With ``data.root`` set, files are read (the phantom is never used); otherwise ``data.name``
    must be a built-in phantom. The dataset's ``source`` attribute says which data it is.
    """
    from cfexplain.data.readers import DataError, open_dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data.get("root"):
        return open_dataset(
            data["root"],
            split,
            format=data.get("format", "auto"),
            resolution=int(data["resolution"]),
            channels=int(data["channels"]),
            classes=list(data["classes"]) if data.get("classes") else None,
            on_bad_file=data.get("on_bad_file", "error"),
        )
    name = data.get("name")
    if name not in PHANTOMS:
        raise DataError(
            f"data.root is not set and data.name={name!r} is not a built-in phantom {PHANTOMS}"
        )
    from cfexplain.data.phantoms import HistologyPhantom, KneePhantom

    n = int(data[f"n_{split}"])
    common = dict(
        n=n, resolution=int(data["resolution"]), seed=int(data.get("seed", 0)), split=split
    )
    if name == "knee":
        ds = KneePhantom(
            **common,
            task=data.get("task", "binary"),
            shortcut_rate=float(data.get("shortcut_rate", 0.0)),
        )
    else:
        ds = HistologyPhantom(**common)
    if ds.channels != int(data["channels"]):
        raise DataError(
            f"data.channels={data['channels']} but the {name} phantom has {ds.channels} channel(s)"
        )
    ds.source = f"{name} phantom (procedural, seed {common['seed']}), split {split}: {n} images at {common['resolution']} px"
    return ds


def collate(samples: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images [N, C, H, W], labels [N] int64, metas)``: metas stay a list of dicts."""
    images = torch.stack([s["image"] for s in samples])
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return images, labels, [s.get("meta", {}) for s in samples]
