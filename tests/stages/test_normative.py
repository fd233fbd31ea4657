"""Normative stage: smoke run and loading, healthy-only training, metrics, kill then resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cfexplain.data import build_dataset, collate
from cfexplain.nn.normative import ConvAAE, ConvVAE, load_normative
from cfexplain.stages import normative as stage
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact, torch_load
from tests.conftest import kill_when, run_train, smoke_train


def test_smoke_run_writes_the_artifact_and_both_models_load(smoke_cfg):
    cfg = smoke_cfg("stages=[normative]", "normative.aae.net.latent_channels=1")
    art = run_chain(cfg)["normative"]
    assert art.dir.name == "normative" and art.info["models"] == ["vae", "aae"]
    assert art.info["train_healthy"] + art.info["train_excluded"] == cfg.data.n_train
    assert art.info["train_healthy"] > 0 and art.info["train_excluded"] > 0
    for name in ("vae", "aae"):
        m = art.metrics
        assert 0.0 <= m[f"{name}/test/image_auc"] <= 1.0
        assert (
            0.0 <= m[f"{name}/test/pixel_auroc"] <= 1.0 and 0.0 < m[f"{name}/test/best_dice"] <= 1.0
        )
        assert m[f"{name}/test/n_healthy"] + m[f"{name}/test/n_diseased"] == cfg.data.n_test
        assert m[f"{name}/steps"] == cfg.normative.steps
        assert art.path(f"{name}_examples").is_file()
    models = load_normative(art.dir)
    assert isinstance(models["vae"], ConvVAE) and isinstance(models["aae"], ConvAAE)
    # normative.aae.net overrides the shared normative.net for the AAE alone.
    assert models["aae"].latent_shape == (1, 8, 8) and models["vae"].latent_shape == (2, 8, 8)
    x = collate([build_dataset(cfg.data, "test")[i] for i in range(4)])[0]
    for model in models.values():
        recon, residual, score = model.anomaly(x)
        assert recon.shape == x.shape and residual.shape == (4, 1, 32, 32) and score.shape == (4,)
        assert residual.min() >= 0 and torch.isfinite(score).all()
    # The saved metric is what the loaded model computes.
    again = stage.evaluate(
        models["aae"], build_dataset(cfg.data, "test"), [0], 64, torch.device("cpu")
    )
    assert again["image_auc"] == pytest.approx(art.metrics["aae/test/image_auc"])


def test_training_never_sees_a_diseased_image(smoke_cfg, monkeypatch):
    ds = build_dataset(smoke_cfg().data, "train")
    subset, counts = stage.healthy_subset(ds, [0])
    labels = [int(ds[i]["label"]) for i in range(len(ds))]
    assert {int(subset[i]["label"]) for i in range(len(subset))} == {0}
    assert counts == {"train_healthy": labels.count(0), "train_excluded": labels.count(1)}
    # The loop checks every batch: a filter that lets diseased images through stops the stage.
    monkeypatch.setattr(stage, "healthy_subset", lambda ds, healthy: (ds, {}))
    with pytest.raises(AssertionError, match=r"labels \[1\] reached training"):
        run_chain(smoke_cfg("stages=[normative]"))


def test_pathology_mask_of_knee_and_histology_phantoms(smoke_cfg):
    knee = build_dataset(smoke_cfg().data, "test")
    grades = [knee[i]["meta"]["grade"] for i in range(len(knee))]
    sick = next(i for i, g in enumerate(grades) if g >= 3)
    clean = next(i for i, g in enumerate(grades) if g == 0)
    assert stage.pathology_mask(knee[sick]["meta"]).any()
    assert not stage.pathology_mask(knee[clean]["meta"]).any()
    masks = knee[sick]["meta"]["masks"]
    assert not (
        stage.pathology_mask(knee[sick]["meta"]) & masks["marker"] & ~masks["osteophyte"]
    ).any()
    histo = build_dataset(smoke_cfg(dataset="histology").data, "test")
    tumour = next(i for i in range(len(histo)) if histo[i]["label"] == 1)
    assert torch.equal(
        stage.pathology_mask(histo[tumour]["meta"]), histo[tumour]["meta"]["masks"]["tumour"]
    )


def test_best_dice_on_known_maps():
    truth = np.array([1, 1, 0, 0, 0, 1], dtype=bool)
    perfect = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.7])
    assert stage.best_dice(perfect, truth) == (1.0, 0.7)
    # Best cut keeps the top two: Dice = 2 * 2 / (2 + 3).
    mixed = np.array([0.9, 0.8, 0.7, 0.2, 0.3, 0.1])
    assert stage.best_dice(mixed, truth)[0] == pytest.approx(0.8)
    assert np.isnan(stage.best_dice(perfect, np.zeros(6, dtype=bool))[0])


def _train_cmd(runs):
    return smoke_train(runs, "stages=[normative]", "normative.steps=14", "checkpoint_every=2")


def _aae_started(state_file) -> bool:
    try:
        models = torch_load(state_file)["models"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return False
    return "aae" in models and not models["aae"]["loop"]["finished"]


@pytest.mark.slow
def test_kill_in_the_second_model_then_resume_gives_the_same_weights(tmp_path):
    run_train(_train_cmd(tmp_path / "ref"))
    runs = tmp_path / "killed"
    state = runs / "knee" / ".normative.partial" / "state.pt"
    kill_when(_train_cmd(runs), lambda: _aae_started(state))
    assert not (runs / "knee" / "normative").exists()
    run_train(_train_cmd(runs))
    art = Artifact.load(runs / "knee" / "normative")
    where = art.info["resumed_from_steps"]
    assert where["vae"] == 14 and 0 < where["aae"] < 14
    ref_art = Artifact.load(tmp_path / "ref" / "knee" / "normative")
    for name in ("vae", "aae"):
        a, b = load_file(str(ref_art.path(name))), load_file(str(art.path(name)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert art.metrics["aae/test/image_auc"] == ref_art.metrics["aae/test/image_auc"]


def test_a_resume_logs_every_step_once(smoke_cfg, monkeypatch):
    overrides = ("stages=[normative]", "normative.steps=14", "checkpoint_every=8")
    real_lr_at, seen = stage.lr_at, []

    def crash_at_aae_step_12(step, **kw):
        seen.append(step)
        if seen.count(12) == 2:  # the VAE's step 12 was the first: past the AAE's log at 10
            raise RuntimeError("power cut")
        return real_lr_at(step, **kw)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="power cut"):
        patch.setattr(stage, "lr_at", crash_at_aae_step_12)
        run_chain(smoke_cfg(*overrides))
    art = run_chain(smoke_cfg(*overrides))["normative"]
    assert art.info["resumed_from_steps"] == {"vae": 14, "aae": 8}
    rows = [json.loads(line) for line in (art.dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["step"] is not None]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    # The models' steps count on: the AAE's step 10 is the stage's step 14 + 10, logged once.
    assert [r["step"] for r in rows if "aae/train/recon" in r] == [24]
    assert [r["step"] for r in rows if "vae/train/recon" in r] == [10]
