"""Concept annotations: named visual attributes in [0, 1] derived from a phantom's factors.

``meta["concepts"]`` of a phantom sample is ``{name: float in [0, 1]}``, the targets of the
attribute capsules (``classifier=capsules``). Each value is a piecewise-linear grade of one
factor, with its knots at the phantom's own clinical thresholds, so that **0.5 always means
"definite"**: the Kellgren-Lawrence thresholds for the knee (definite narrowing, definite
osteophyte, some sclerosis, deformity present), the midpoint between the normal and the tumour
ranges for histology. :data:`PRESENT` is that cut; :func:`attribute_metrics` binarises the
ground truth there (AUC) and compares the readings with it (MAE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cfexplain.data.phantoms.knee import (
    DEF_PRESENT,
    JSW_DEFINITE,
    JSW_DOUBTFUL,
    JSW_MARKED,
    OST_DEFINITE,
    OST_LARGE,
    OST_MODERATE,
    SCL_SEVERE,
    SCL_SOME,
)

# A concept is present (for AUC) when its ground truth is at least this: "definite".
PRESENT = 0.5

KNEE_CONCEPTS = (
    "narrowing_medial",
    "narrowing_lateral",
    "osteophytes",
    "sclerosis",
    "deformity",
)
HISTOLOGY_CONCEPTS = ("nuclear_size", "pleomorphism", "density")

# (factor value, grade) knots, factor values increasing. Joint-space width shrinks with
# disease, so its grades fall: 0.064 is the narrowest healthy width of the phantom's subjects.
_JSN = ((0.0, 1.0), (JSW_MARKED, 0.75), (JSW_DEFINITE, 0.5), (JSW_DOUBTFUL, 0.25), (0.064, 0.0))
_OST = ((0.0, 0.0), (OST_DEFINITE, 0.5), (OST_MODERATE, 2 / 3), (OST_LARGE, 5 / 6), (0.12, 1.0))
_SCL = ((0.0, 0.0), (SCL_SOME, 0.5), (SCL_SEVERE, 0.75), (1.0, 1.0))
_DEF = ((0.0, 0.0), (DEF_PRESENT, 0.5), (1.0, 1.0))
# Histology: the knots at 0.5 sit between the normal and the tumour ranges of
# cfexplain.data.phantoms.histology._sample_factors (radius 0.016-0.022 vs 0.027-0.038; spread
# 0.12 vs 0.25-0.45; 35-60 vs 90-140 nuclei per unit area).
_SIZE = ((0.016, 0.0), (0.0245, 0.5), (0.038, 1.0))
_PLEO = ((0.12, 0.0), (0.185, 0.5), (0.45, 1.0))
_DENS = ((35.0, 0.0), (75.0, 0.5), (140.0, 1.0))
# The nuclear spread of normal nuclei (histology._nucleus_groups draws them with 0.12).
_NORMAL_SPREAD = 0.12


def _grade(value: float, knots: Sequence[tuple[float, float]]) -> float:
    """``value`` through the piecewise-linear ``knots``, clamped to the end grades."""
    xs, ys = zip(*knots)
    return float(np.clip(np.interp(float(value), xs, ys), 0.0, 1.0))


def knee_concepts(factors: Mapping[str, float]) -> dict[str, float]:
    """The knee's concepts from its disease factors (``KneePhantom`` ``meta["factors"]``).

    Joint-space narrowing per compartment from the width (``jsw_medial``, ``jsw_lateral``),
    ``osteophytes`` from the largest spur, ``sclerosis`` and ``deformity`` from theirs; 0.5 is
    the threshold :func:`~cfexplain.data.phantoms.knee.kl_grade` calls definite.
    """
    return {
        "narrowing_medial": _grade(factors["jsw_medial"], _JSN),
        "narrowing_lateral": _grade(factors["jsw_lateral"], _JSN),
        "osteophytes": _grade(factors["osteophyte"], _OST),
        "sclerosis": _grade(factors["sclerosis"], _SCL),
        "deformity": _grade(factors["deformity"], _DEF),
    }


def histology_concepts(factors: Mapping[str, float]) -> dict[str, float]:
    """The tile's nuclear concepts from its factors (``HistologyPhantom`` ``meta["factors"]``).

    As a pathologist grades the worst area: the tumour nuclei's size, pleomorphism and density
    when the tile holds a tumour, the normal nuclei's otherwise. 0.5 separates the two ranges.
    """
    tumour = factors["tumour"] >= 0.5
    kind = "tumour" if tumour else "normal"
    spread = factors["pleomorphism"] if tumour else _NORMAL_SPREAD
    return {
        "nuclear_size": _grade(factors[f"{kind}_nucleus_radius"], _SIZE),
        "pleomorphism": _grade(spread, _PLEO),
        "density": _grade(factors[f"{kind}_density"], _DENS),
    }


def concept_targets(metas: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """``float32 [N, A]``: ``meta["concepts"][name]`` of every sample; a ValueError naming the
    sample and the concept when one is missing."""
    out = np.empty((len(metas), len(names)), dtype=np.float32)
    for i, meta in enumerate(metas):
        concepts = meta.get("concepts")
        if concepts is None:
            where = meta.get("path", f"sample {meta.get('index', i)}")
            raise ValueError(
                f"{where}: no concept annotations (meta['concepts']); the attribute capsules need "
                "them (a phantom, or data.attributes for a CSV) or classifier.attribute_weight=0"
            )
        for j, name in enumerate(names):
            if name not in concepts:
                where = meta.get("path", f"sample {meta.get('index', i)}")
                raise ValueError(
                    f"{where}: no concept {name!r} in its annotations {sorted(concepts)}"
                )
            out[i, j] = float(concepts[name])
    return out


def attribute_metrics(
    pred: np.ndarray, truth: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Per concept: ``<name>/mae`` of the readings ``pred [N, A]`` against ``truth [N, A]``, and
    ``<name>/auc`` of the readings for "present" (truth >= :data:`PRESENT`); NaN when the split
    holds only one of the two. Plus their means ``mae`` and ``auc`` over the concepts."""
    from sklearn.metrics import roc_auc_score

    assert pred.shape == truth.shape and pred.shape[1] == len(names), (pred.shape, truth.shape)
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        present = truth[:, j] >= PRESENT
        out[f"{name}/mae"] = float(np.abs(pred[:, j] - truth[:, j]).mean())
        both = 0 < present.sum() < len(present)
        out[f"{name}/auc"] = float(roc_auc_score(present, pred[:, j])) if both else float("nan")
    aucs = [out[f"{n}/auc"] for n in names if not np.isnan(out[f"{n}/auc"])]
    out["mae"] = float(np.mean([out[f"{n}/mae"] for n in names]))
    out["auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return out
