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
from cfexplain.utils.seeding import Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Signals on the validation split → thresholds; the flagged share of the test split."""
    d = distributed.setup(cfg.device)
    c, seed = cfg.guard, int(cfg.seed)
    models = _models(cfg, run, d.device)
    train_ds = build_dataset(cfg.data, "train")
    n_train = min(int(c.feature_images), len(train_ds))
    train_x = sample_images(train_ds, n_train, seed, Stream.GUARD_FEATURES)
    mean, precision = guard.feature_model(models.features.features(train_x))
    val = guard.image_signals(models, _images(cfg, "val"), mean, precision)
    kind = str(c.normative) if models.normative is not None else None
    generated = {"evidence_loss": _generated_evidence(models, len(val["evidence_loss"]), seed)}
    calibration = guard.calibrate(
        val,
        mean,
        precision,
        float(c.quantile),
        float(c.margin),
        kind,
        generated,
        float(c.evidence_gap),
    )
    metrics: dict[str, Any] = {}
    for split, signals in (("val", val), ("test", None)):
        if signals is None:
            signals = guard.image_signals(models, _images(cfg, split), mean, precision)
        verdicts = guard.assess(signals, calibration)
        metrics[f"{split}/flagged_share"] = sum(v.flagged for v in verdicts) / len(verdicts)
        metrics[f"{split}/images"] = len(verdicts)
    for name, stats in calibration.stats.items():
        metrics |= {f"{name}/{k}": v for k, v in stats.items()}
    metrics["evidence_gap"] = calibration.evidence_gap
    if run.is_main:
        calibration.save(run.dir / guard.GUARD_FILE)
        run.log({k: v for k, v in metrics.items() if isinstance(v, float)})
        run.summary(metrics)
        log.info(f"[guard] thresholds {calibration.thresholds}")
        note = guard.evidence_note(calibration)
        if note:
            log.warning(f"[guard] {note}")
    info = {"signals": sorted(calibration.thresholds), "normative": kind, "feature_images": n_train}
    artifact = write_artifact(run, metrics, {"guard": guard.GUARD_FILE}, info)
    d.barrier()
    return artifact


@torch.no_grad()
def _generated_evidence(models: guard.Models, n: int, seed: int) -> torch.Tensor:
    """``evidence_loss [n]`` of G's own samples: what re-encoding costs when G can draw it all."""
    G = models.generator
    z = torch.randn(n, G.z_dim, generator=generator(seed, Stream.GUARD_SAMPLES))
    y = torch.cat([G(b.to(models.device), noise_mode="const") for b in z.split(models.batch)])
    rec, _ = guard.reconstruct(G, models.encoder, y, batch=models.batch)
    return guard.evidence_loss(models.classifier, y, rec, batch=models.batch)[0]


def _images(cfg: DictConfig, split: str) -> torch.Tensor:
    """The first ``guard.images`` images ``[N, C, R, R]`` of ``split``."""
    ds = build_dataset(cfg.data, split)
    n = min(int(cfg.guard.images), len(ds))
    return collate([ds[i] for i in range(n)])[0]


def _models(cfg: DictConfig, run: Run, device: torch.device) -> guard.Models:
    """The trained models the signals read: f, G, E, the encoder's LPIPS, a normative model."""
    encoder = run.inputs["encoder"]
    normative = None
    if cfg.guard.normative and "normative" in run.inputs:  # an optional input of the stage
        normative = load_normative(run.inputs["normative"].dir, device)[str(cfg.guard.normative)]
    return guard.Models(
        classifier=load_classifier(run.inputs["classifier"].dir, device),
        generator=load_generator(run.inputs["generator"].dir, device),
        encoder=load_encoder(encoder.dir, device),
        perceptual=build_perceptual(str(encoder.info.get("perceptual", "auto")), device),
        normative=normative,
        device=device,
        batch=int(cfg.guard.batch_size),
    )
