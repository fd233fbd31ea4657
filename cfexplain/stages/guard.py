"""Guard stage: calibrate the out-of-distribution and fidelity guard on the validation split.

Reads the trained classifier, generator and encoder (and the normative models when the run has
them), computes every guard signal (:mod:`cfexplain.explain.guard`) on the validation images,
fits the Gaussian of the training images' classifier features, and writes the thresholds as
``guard.safetensors``. Explain then judges each image without recomputing any of it. The
test split is scored too: the share of in-distribution test images the guard flags is the
artifact's ``test/flagged_share`` (the defaults keep it at or below 1% on the phantoms).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from cfexplain.data import build_dataset, collate
from cfexplain.explain import guard
from cfexplain.nn.classifier import load_classifier
from cfexplain.nn.encoder import load_encoder, load_generator
from cfexplain.nn.normative import load_normative
from cfexplain.nn.perceptual import build_perceptual
from cfexplain.stages._shared import sample_images, write_artifact
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact
from cfexplain.utils.quality import FeatureStats
from cfexplain.utils.seeding import Stream
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Signals on the validation split → thresholds; the flagged share of the test split."""
    d = distributed.setup(cfg.device)
    c, seed = cfg.guard, int(cfg.seed)
    models = _models(cfg, run, d.device)
    train_ds = build_dataset(cfg.data, "train")
    train_x = sample_images(
        train_ds, min(int(c.feature_images), len(train_ds)), seed, Stream.GUARD_FEATURES
    )
    mean, precision = guard.feature_model(models["features"].features(train_x))
    metrics: dict[str, Any] = {}
    calibration = None
    for split in ("val", "test"):
        ds = build_dataset(cfg.data, split)
        n = min(int(c.images), len(ds))
        x = collate([ds[i] for i in range(n)])[0]
        signals = image_signals(models, x, mean, precision, int(c.batch_size))
        if split == "val":
            calibration = guard.calibrate(
                signals, mean, precision, float(c.quantile), float(c.margin)
            )
        assert calibration is not None
        verdicts = guard.assess(signals, calibration)
        metrics[f"{split}/flagged_share"] = sum(v.flagged for v in verdicts) / max(1, n)
        metrics[f"{split}/images"] = n
    assert calibration is not None
    for name, stats in calibration.stats.items():
        metrics |= {f"{name}/{k}": v for k, v in stats.items()}
    if run.is_main:
        calibration.save(run.dir / guard.GUARD_FILE)
        run.log({k: v for k, v in metrics.items() if isinstance(v, float)})
        run.summary(metrics)
    info = {"signals": sorted(calibration.thresholds), "normative": models["normative"] is not None}
    artifact = write_artifact(run, metrics, {"guard": guard.GUARD_FILE}, info)
    d.barrier()
    return artifact


def _models(cfg: DictConfig, run: Run, device: torch.device) -> dict[str, Any]:
    """The trained models the signals read: f (and its features), G, E, LPIPS, normative."""
    f = load_classifier(run.inputs["classifier"].dir, device)
    encoder = run.inputs["encoder"]
    normative = None
    if cfg.guard.normative and "normative" in run.inputs:  # an optional input of the stage
        normative = load_normative(run.inputs["normative"].dir, device)[str(cfg.guard.normative)]
    return {
        "f": f,
        "features": FeatureStats(f, device),
        "G": load_generator(run.inputs["generator"].dir, device),
        "E": load_encoder(encoder.dir, device),
        "perceptual": build_perceptual(str(encoder.info.get("perceptual", "auto")), device),
        "normative": normative,
        "device": device,
    }


def image_signals(
    models: dict[str, Any], x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """Every guard signal ``[N]`` of images ``x [N, C, H, W]``."""
    x = x.to(models["device"])
    rec, err = guard.reconstruct(models["G"], models["E"], x, models["perceptual"], batch)
    signals = {
        "recon_error": err,
        "feature_distance": guard.mahalanobis(models["features"].features(x), mean, precision),
        "recon_prob_gap": guard.prob_gap(models["f"], x, rec, batch),
    }
    if models["normative"] is not None:
        with torch.no_grad():
            signals["normative_score"] = torch.cat(
                [models["normative"].anomaly(b)[2].float().cpu() for b in x.split(batch)]
            )
    return signals
