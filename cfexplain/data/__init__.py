"""Datasets: built-in phantoms with ground truth, and readers of real formats.

A sample is ``{"image": float32 [C, H, W] in [-1, 1], "label": int, "meta": {...}}``.
``build_dataset(cfg.data, split)`` is the one door the stages use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

PHANTOMS = ("knee", "histology")


class ImageDataset(Dataset):
    """What every dataset here is: N samples as in the module docstring, with these attributes
    (``source`` says in one line which data it is)."""

    num_classes: int
    class_names: list[str]
    channels: int
    resolution: int
    source: str

    def __len__(self) -> int:
        raise NotImplementedError


def build_dataset(data: Mapping[str, Any], split: str) -> ImageDataset:
    """The ``split`` of the dataset that the ``data`` config describes.

    With ``data.root`` set, files are read (the phantom is never used); otherwise ``data.name``
    must be a built-in phantom. The dataset's ``source`` attribute says which data it is.
    The keys of conf/base/dataset.yaml are read directly: a config without one is an error.
    """
    from cfexplain.data.readers import DataError, check_split, open_dataset

    check_split(split)
    if data["root"]:
        ds = open_dataset(
            data["root"],
            split,
            format=data["format"],
            resolution=int(data["resolution"]),
            channels=int(data["channels"]),
            classes=list(data["classes"]) if data["classes"] else None,
            on_bad_file=data["on_bad_file"],
            # Only the CSV config has them: concept annotations for classifier=capsules.
            attributes=list(data["attributes"]) if data.get("attributes") else None,
            attributes_file=data.get("attributes_file"),
            reports=data.get("reports"),
        )
        return _binarise(ds, data) if data["task"] == "binary" else ds
    name = data["name"]
    if name not in PHANTOMS:
        raise DataError(
            f"data.root is not set and data.name={name!r} is not a built-in phantom {PHANTOMS}"
        )
    from cfexplain.data.phantoms import HistologyPhantom, KneePhantom

    n, resolution, seed = int(data[f"n_{split}"]), int(data["resolution"]), int(data["seed"])
    if name == "knee":
        ds = KneePhantom(
            n=n,
            resolution=resolution,
            seed=seed,
            split=split,
            task=data["task"],
            shortcut_rate=float(data["shortcut_rate"]),
            decorrelate=float(data.get("decorrelate", 0.0)),
        )
    else:
        ds = HistologyPhantom(n=n, resolution=resolution, seed=seed, split=split)
    if ds.channels != int(data["channels"]):
        raise DataError(
            f"data.channels={data['channels']} but the {name} phantom has {ds.channels} channel(s)"
        )
    ds.source = (
        f"{name} phantom (procedural, seed {seed}), split {split}: {n} images at {resolution} px"
    )
    if isinstance(ds, KneePhantom) and ds.decorrelate:
        ds.source += f", disease factors decorrelated ({ds.decorrelate})"
    return ds


class Binarised(ImageDataset):
    """A multi-class dataset seen as binary: labels ``>= positive_from`` are positive.

    The public knee datasets store KL grades 0-4; ``data.positive_from=2`` gives KL >= 2.
    """

    def __init__(self, ds: ImageDataset, positive_from: int) -> None:
        self.ds, self.positive_from = ds, positive_from
        names = list(ds.class_names)
        self.class_names = [f"<{names[positive_from]}", f">={names[positive_from]}"]
        self.num_classes, self.channels, self.resolution = 2, ds.channels, ds.resolution
        self.skipped = getattr(ds, "skipped", [])
        self.source = f"{ds.source}; binary: class >= {names[positive_from]!r} is positive"

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.ds[i]
        return {
            **sample,
            "label": int(sample["label"] >= self.positive_from),
            "meta": {**sample["meta"], "original_label": sample["label"]},
        }


def _binarise(ds: ImageDataset, data: Mapping[str, Any]) -> ImageDataset:
    from cfexplain.data.readers import DataError

    # Only the real-data configs whose files may hold more than two classes define it.
    positive_from = data.get("positive_from")
    if ds.num_classes == 2 and positive_from is None:
        return ds
    if positive_from is None:
        raise DataError(
            f"data.task=binary but {data['root']} has {ds.num_classes} classes {list(ds.class_names)}: "
            "set data.positive_from=<first positive class index> (e.g. 2 for KL >= 2) or data.task=multiclass"
        )
    if not 0 < int(positive_from) < ds.num_classes:
        raise DataError(
            f"data.positive_from={positive_from} must be in 1..{ds.num_classes - 1} for classes {list(ds.class_names)}"
        )
    return Binarised(ds, int(positive_from))


def collate(samples: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images [N, C, H, W], labels [N] int64, metas)``: metas stay a list of dicts."""
    images = torch.stack([s["image"] for s in samples])
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return images, labels, [s.get("meta", {}) for s in samples]
