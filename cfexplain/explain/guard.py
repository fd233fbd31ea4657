"""The out-of-distribution and fidelity guard: never explain with confidence what the models
cannot see.

Every explained image gets five signals, each compared with a threshold calibrated on the run's
own validation split when the run was trained (the ``guard`` stage), so nothing is recomputed
at explain time:

- ``recon_error``: LPIPS(x, G(E(x))): how badly the generator can draw the image;
- ``feature_distance``: Mahalanobis distance of the classifier's penultimate features to the
  training images' (Ledoit-Wolf covariance): how unlike the training data f finds it;
- ``normative_score``: the normative autoencoder's anomaly score, when the run has one;
- ``recon_prob_gap``: the largest change of a class probability between f(x) and
  f(G(E(x))): whether f reads the reconstruction, which the counterfactual frames start from, as it reads the input;
- ``evidence_loss``: the largest change of f's decision margin when one cell of a 4x4 grid of x
  is replaced by the same cell of G(E(x)): evidence f reads in one region that the generator
  does not redraw (a marker it never learnt), which no counterfactual frame can then show.

The first three say *unlike the training data*; the last two say *reconstruction read
differently* (the counterfactual would explain another image). A threshold is the validation
quantile ``quantile`` of the signal plus ``margin`` times its validation interquartile range;
``evidence_loss``'s comes from G's own samples instead (G can redraw whatever it drew), since a
generator that misses a feature misses it on the validation images too. The ratio of the
validation median to the samples' median is the run's ``evidence_gap``: far above 1, the
generator does not draw something the classifier uses on real images, and explain says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

IN_DISTRIBUTION = "in distribution"
UNLIKE_TRAINING = "unlike the training data"
READ_DIFFERENTLY = "reconstruction read differently"
STATUSES = (IN_DISTRIBUTION, UNLIKE_TRAINING, READ_DIFFERENTLY)

DISTRIBUTION_SIGNALS = ("recon_error", "feature_distance", "normative_score")
FIDELITY_SIGNALS = ("recon_prob_gap", "evidence_loss")
EVIDENCE_GRID = 4  # evidence_loss swaps the cells of a 4x4 grid
EVIDENCE_LIMIT = 2.5  # default evidence_gap above which explain and evaluate warn
SIGNALS = DISTRIBUTION_SIGNALS + FIDELITY_SIGNALS
GUARD_FILE = "guard.safetensors"
MODES = ("off", "warn", "skip")

# What each signal means, in the words a page shows.
DESCRIPTIONS = {
    "recon_error": "the generator cannot draw it (reconstruction error)",
    "feature_distance": "the classifier's features are far from the training images'",
    "normative_score": "the normative model finds it anomalous",
    "recon_prob_gap": "the classifier reads the reconstruction differently from the input",
    "evidence_loss": "the generator does not redraw what the classifier reads in one region",
}


@dataclass
class Verdict:
    """The guard's word on one image."""

    status: str
    values: dict[str, float]
    reasons: list[str] = field(default_factory=list)  # "recon_error 0.31 > 0.070", ...
    cell: int | None = None  # evidence_loss's cell (row-major, EVIDENCE_GRID) when it is over

    @property
    def flagged(self) -> bool:
        return self.status != IN_DISTRIBUTION

    def describe(self) -> str:
        """One line for a page or a log."""
        if not self.flagged:
            return IN_DISTRIBUTION
        return f"{self.status}: {'; '.join(self.reasons)}"


@dataclass
class Calibration:
    """Thresholds per signal and the statistics they came from (validation split)."""

    thresholds: dict[str, float]
    feature_mean: Tensor  # [F]
    feature_precision: Tensor  # [F, F] inverse of the shrunk training covariance
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    quantile: float = 0.995
    margin: float = 1.0
    normative: str | None = None  # the normative model whose score is a signal
    evidence_gap: float | None = None  # validation median / G samples' median of evidence_loss
    evidence_limit: float = EVIDENCE_LIMIT  # the gap above which explain warns

    def save(self, path: str | Path) -> Path:
        from cfexplain.utils.artifacts import save_tensors

        meta = {
            "thresholds": json.dumps(self.thresholds),
            "stats": json.dumps(self.stats),
            "quantile": str(self.quantile),
            "margin": str(self.margin),
            "normative": self.normative or "",
            "evidence_gap": "" if self.evidence_gap is None else str(self.evidence_gap),
            "evidence_limit": str(self.evidence_limit),
        }
        tensors = {"feature_mean": self.feature_mean, "feature_precision": self.feature_precision}
        return save_tensors(path, {k: v.float() for k, v in tensors.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            thresholds={k: float(v) for k, v in json.loads(meta["thresholds"]).items()},
            feature_mean=tensors["feature_mean"],
            feature_precision=tensors["feature_precision"],
            stats=json.loads(meta["stats"]),
            quantile=float(meta["quantile"]),
            margin=float(meta["margin"]),
            normative=meta.get("normative") or None,
            evidence_gap=float(meta["evidence_gap"]) if meta.get("evidence_gap") else None,
            evidence_limit=float(meta.get("evidence_limit", EVIDENCE_LIMIT)),
        )


# ----------------------------------------------------------------------------- signals


def feature_model(features: Tensor, shrinkage: float | None = None) -> tuple[Tensor, Tensor]:
    """``(mean [F], precision [F, F])`` of training features ``[N, F]`` (Ledoit-Wolf shrinkage
    unless ``shrinkage`` is given): the Gaussian the Mahalanobis distance is measured against."""
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    x = features.double().cpu().numpy()
    est = LedoitWolf() if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage)
    est.fit(x)
    return (
        torch.as_tensor(est.location_, dtype=torch.float64),
        torch.as_tensor(est.get_precision(), dtype=torch.float64),
    )


def mahalanobis(features: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    """``[N]`` Mahalanobis distances of features ``[N, F]``."""
    d = features.double().cpu() - mean.double()
    return ((d @ precision.double()) * d).sum(1).clamp_min(0).sqrt()


@torch.no_grad()
def reconstruct(
    G: Any, E: Any, x: Tensor, perceptual: Any = None, batch: int = 64
) -> tuple[Tensor, Tensor]:
    """``(G(E(x)) [N, C, H, W], error [N])`` of images ``x [N, C, H, W]``: LPIPS with
    ``perceptual``, else the mean absolute difference (as the counterfactual engine measures)."""
    recs, errs = [], []
    for b in x.split(batch):
        rec = G.synthesis(E(b), noise_mode="const")
        err = perceptual(b, rec) if perceptual is not None else (b - rec).abs().flatten(1).mean(1)
        recs.append(rec)
        errs.append(err.float().cpu())
    return torch.cat(recs), torch.cat(errs)


@torch.no_grad()
def prob_gap(classifier: Any, x: Tensor, rec: Tensor, batch: int = 64) -> Tensor:
    """``[N]`` largest change of any class probability between images ``x`` and their
    reconstructions ``rec`` (both ``[N, C, H, W]``); for two classes, |f(x) - f(rec)|."""
    gaps = []
    for a, b in zip(x.split(batch), rec.split(batch)):
        pa = torch.softmax(classifier(a).float(), 1)
        pb = torch.softmax(classifier(b).float(), 1)
        gaps.append((pa - pb).abs().amax(1).cpu())
    return torch.cat(gaps)


def decision_margin(logits: Tensor, cls: Tensor) -> Tensor:
    """``[N]`` logit of class ``cls [N]`` minus the log-sum-exp of the other classes' (for two
    classes, the logit difference)."""
    others = logits.scatter(1, cls[:, None], float("-inf"))
    return logits.gather(1, cls[:, None])[:, 0] - others.logsumexp(1)


@torch.no_grad()
def evidence_loss(
    classifier: Any, x: Tensor, rec: Tensor, grid: int = EVIDENCE_GRID, batch: int = 64
) -> tuple[Tensor, Tensor]:
    """``(loss [N], cell [N])`` of images ``x`` and their reconstructions ``rec`` ``[N, C, H, W]``:
    the largest |change| of f's decision margin for the class f gives x when one cell of a
    ``grid`` x ``grid`` partition of x is replaced by the same cell of ``rec``, and that cell's
    row-major index."""
    h, w = x.shape[-2:]
    losses = []
    for a, b in zip(x.split(batch), rec.split(batch)):
        logits = classifier(a).float()
        cls = logits.argmax(1)
        base = decision_margin(logits, cls)
        per_cell = []
        for cell in range(grid * grid):
            rows, cols = cell_region(cell, h, w, grid)
            y = a.clone()
            y[..., rows, cols] = b[..., rows, cols]
            per_cell.append((decision_margin(classifier(y).float(), cls) - base).abs())
        losses.append(torch.stack(per_cell, 1).cpu())
    loss, cell = torch.cat(losses).max(1)
    return loss, cell


def cell_region(cell: int, h: int, w: int, grid: int = EVIDENCE_GRID) -> tuple[slice, slice]:
    """``(rows, columns)`` of cell ``cell`` (row-major) of a ``grid`` x ``grid`` partition of an
    ``h`` x ``w`` image."""
    r, c = divmod(int(cell), grid)
    return slice(r * h // grid, (r + 1) * h // grid), slice(c * w // grid, (c + 1) * w // grid)


def cell_name(cell: int, grid: int = EVIDENCE_GRID) -> str:
    """Where cell ``cell`` of a ``grid`` x ``grid`` partition lies, in words."""
    r, c = divmod(int(cell), grid)
    vert = "top" if r == 0 else "bottom" if r == grid - 1 else "middle"
    horiz = "left" if c == 0 else "right" if c == grid - 1 else "centre"
    return f"{vert} {horiz} (row {r + 1}, column {c + 1} of {grid}x{grid})"


@dataclass
class Models:
    """What the signals read: f, G, E, the LPIPS of the encoder stage, a normative model."""

    classifier: nn.Module
    generator: nn.Module
    encoder: nn.Module
    perceptual: nn.Module | None
    normative: nn.Module | None
    device: torch.device
    batch: int = 64

    def __post_init__(self) -> None:
        from cfexplain.utils.quality import FeatureStats

        self.features = FeatureStats(self.classifier, self.device, self.batch)


def image_signals(models: Models, x: Tensor, mean: Tensor, precision: Tensor) -> dict[str, Tensor]:
    """Every guard signal ``[N]`` of images ``x [N, C, H, W]`` (the normative score only with
    a normative model)."""
    x = x.to(models.device)
    rec, err = reconstruct(models.generator, models.encoder, x, models.perceptual, models.batch)
    loss, cell = evidence_loss(models.classifier, x, rec, batch=models.batch)
    signals = {
        "recon_error": err,
        "feature_distance": mahalanobis(models.features.features(x), mean, precision),
        "recon_prob_gap": prob_gap(models.classifier, x, rec, models.batch),
        "evidence_loss": loss,
        "evidence_cell": cell.float(),  # where: named in the reason, not a signal itself
    }
    if models.normative is not None:
        with torch.no_grad():
            signals["normative_score"] = torch.cat(
                [models.normative.anomaly(b)[2].float().cpu() for b in x.split(models.batch)]
            )
    return signals


def judge(models: Models, x: Tensor, calibration: Calibration) -> list[Verdict]:
    """The verdict on each image of ``x [N, C, H, W]``."""
    signals = image_signals(models, x, calibration.feature_mean, calibration.feature_precision)
    return assess(signals, calibration)


def evidence_note(calibration: Calibration | None) -> str | None:
    """The run-level warning when the generator misses evidence the classifier uses on real
    images (``evidence_gap`` above the calibration's ``evidence_limit``), else None (also for a
    run without a guard)."""
    if calibration is None:
        return None
    gap, limit = calibration.evidence_gap, calibration.evidence_limit
    if gap is None or not gap > limit:
        return None
    return (
        f"The generator does not redraw part of what the classifier reads in real images: "
        f"swapping one region of a validation image for its reconstruction moves the "
        f"classifier {gap:.1f}x as much as it does on the generator's own samples (guard "
        f"evidence_gap > {limit:g}). The counterfactuals cannot show a change of that feature; "
        f"flagged images name the region (evidence_loss)."
    )


# ----------------------------------------------------------------------------- calibration


def threshold(values: Tensor, quantile: float, margin: float) -> float:
    """The validation quantile of a signal plus ``margin`` interquartile ranges."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.25, 0.75, quantile], dtype=torch.float64))
    return float(q[2] + margin * (q[1] - q[0]))


def calibrate(
    val_signals: Mapping[str, Tensor],
    feature_mean: Tensor,
    feature_precision: Tensor,
    quantile: float = 0.995,
    margin: float = 1.0,
    normative: str | None = None,
    generated: Mapping[str, Tensor] | None = None,
    evidence_limit: float = EVIDENCE_LIMIT,
) -> Calibration:
    """Thresholds from the validation split's signals (``[N]`` each; absent signals skipped);
    a signal also in ``generated`` (the same signal of G's own samples) takes its threshold from
    those, and ``evidence_loss`` there gives the run's ``evidence_gap`` (explain warns above
    ``evidence_limit``)."""
    thresholds, stats = {}, {}
    generated = generated or {}
    for name in SIGNALS:
        if name not in val_signals:
            continue
        v = val_signals[name].double()
        ref = generated[name].double() if name in generated else v
        thresholds[name] = threshold(ref, quantile, margin)
        stats[name] = {
            "mean": float(v.mean()),
            "q50": float(v.quantile(0.5)),
            "q99": float(v.quantile(0.99)),
            "max": float(v.max()),
            "threshold": thresholds[name],
        }
        if name in generated:
            stats[name] |= {"generated_q50": float(ref.quantile(0.5))}
    gap = None
    if "evidence_loss" in stats and "evidence_loss" in generated:
        e = stats["evidence_loss"]
        gap = e["q50"] / max(e["generated_q50"], 1e-12)
    return Calibration(
        thresholds,
        feature_mean,
        feature_precision,
        stats,
        quantile,
        margin,
        normative,
        gap,
        evidence_limit,
    )


def assess(signals: Mapping[str, Tensor], calibration: Calibration) -> list[Verdict]:
    """One :class:`Verdict` per image from its signals (``[N]`` each). Being unlike the training
    data outranks a reconstruction read differently: both are listed in the reasons."""
    names = [n for n in SIGNALS if n in signals and n in calibration.thresholds]
    n = len(signals[names[0]]) if names else 0
    verdicts = []
    for i in range(n):
        values = {k: float(signals[k][i]) for k in names}
        over = [k for k in names if not values[k] <= calibration.thresholds[k]]  # NaN is over
        cell = None
        if "evidence_loss" in over and "evidence_cell" in signals:
            cell = int(signals["evidence_cell"][i])
        where = (
            {"evidence_loss": f": {cell_name(cell)}, outlined in red"} if cell is not None else {}
        )
        reasons = [
            f"{k} {values[k]:.3g} > {calibration.thresholds[k]:.3g} ({DESCRIPTIONS[k]}"
            f"{where.get(k, '')})"
            for k in over
        ]
        if any(k in DISTRIBUTION_SIGNALS for k in over):
            status = UNLIKE_TRAINING
        elif over:
            status = READ_DIFFERENTLY
        else:
            status = IN_DISTRIBUTION
        verdicts.append(Verdict(status, values, reasons, cell))
    return verdicts
