"""Encoder stage: E inverts G on its own samples, writes a complete artifact, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.nn.encoder import load_encoder
from cfexplain.nn.stylegan2 import Generator
from cfexplain.stages import encoder as stage
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact, fingerprint, save_model
from tests.conftest import run_train, smoke_train

SMOKE_G = dict(
    z_dim=32,
    w_dim=32,
    img_resolution=32,
    img_channels=1,
    mapping_layers=2,
    channel_base=256,
    channel_max=32,
)


def random_world(exp) -> None:
    """Finished classifier and generator stages with random weights (the smoke sizes) under ``exp``."""
    torch.manual_seed(0)
    G = Generator(**SMOKE_G)
    with torch.no_grad():
        G.mapping(torch.randn(512, G.z_dim), update_w_avg=True)
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2048, G.z_dim))[:, 0].mean(0))
    f = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1])
    for name, module, target, key, kwargs in (
        (
            "classifier",
            f,
            "cfexplain.nn.classifier.ResNetClassifier",
            "weights",
            dict(in_channels=1, num_classes=2, width=4, blocks=[1]),
        ),
        ("generator", G, "cfexplain.nn.stylegan2.Generator", "G_ema", SMOKE_G),
    ):
        save_model(exp / name / f"{key}.safetensors", module, target, kwargs)
        Artifact(name, exp / name, fingerprint(name), files={key: f"{key}.safetensors"}).write()


FAST = ("stages=[encoder]", "encoder.perceptual=stlpips_alex")


@pytest.mark.slow
def test_encoder_inverts_the_generator_far_better_than_chance(smoke_cfg, tmp_path):
    random_world(tmp_path / "runs" / "knee")
    cfg = smoke_cfg(
        *FAST,
        "encoder.steps=200",
        "encoder.real_steps=0",
        "encoder.batch_size=16",
        "encoder.pool_size=1024",
        "encoder.image_samples=0",
        "encoder.lr=2e-3",
        "encoder.eval_images=64",
    )
    art = run_chain(cfg)["encoder"]
    m = art.metrics
    # Measured on this smoke model (seed 0): latent NMSE 0.46 against 0.95 for predicting w_avg,
    # image L1 0.34 against 0.70 for the mean image.
    assert m["synthetic/latent_nmse"] < 0.6 * m["synthetic/latent_nmse_w_avg"], m
    assert m["synthetic/l1"] < 0.6 * m["synthetic/l1_w_avg"], m


def test_smoke_run_writes_a_complete_artifact_in_w_plus(smoke_cfg, tmp_path):
    random_world(tmp_path / "runs" / "knee")
    art = run_chain(smoke_cfg(*FAST, "encoder.model.space=wplus"))["encoder"]
    for key in (
        "test/lpips",
        "test/psnr",
        "test/ssim",
        "test/classifier_agreement",
        "test/classifier_prob_diff",
        "synthetic/latent_nmse",
        "synthetic/l1",
    ):
        assert key in art.metrics, key
    assert 0.0 <= art.metrics["test/classifier_agreement"] <= 1.0 and art.metrics["test/psnr"] > 0
    assert (
        art.info["perceptual"] == "stlpips_alex"
        and "stlpips_pytorch" in art.info["perceptual_note"]
    )
    assert art.info["space"] == "wplus" and (art.dir / "reconstructions.png").is_file()
    E = load_encoder(art.dir)
    w = E(torch.zeros(2, 1, 32, 32))
    assert w.shape == (2, 8, 32)  # num_ws of the smoke G at 32 px
    assert not torch.allclose(w[:, 0], w[:, 1])  # one w per layer
    # E's W statistics come from the generator it was trained against
    G_w_avg = load_file(str(tmp_path / "runs" / "knee" / "generator" / "G_ema.safetensors"))[
        "mapping.w_avg"
    ]
    assert torch.equal(E.w_avg, G_w_avg) and (E.w_std > 0).all()


def test_losses_are_pure_and_behave():
    a = torch.randn(4, 3, 8)
    assert (
        stage.latent_loss(a, a) == 0
        and stage.latent_loss(a, torch.zeros_like(a)) == a.square().mean()
    )
    inside = torch.full((2, 3, 8), 0.5)  # mean square 0.25 < 1: inside W's shell, no penalty
    outside = torch.full((2, 3, 8), 2.0)  # mean square 4: penalty 3
    assert stage.w_prior_loss(inside) == 0 and stage.w_prior_loss(outside) == pytest.approx(3.0)


def test_decision_loss_is_zero_for_the_same_reading_and_pulls_the_reconstruction():
    torch.manual_seed(0)
    f = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1]).eval()
    f.requires_grad_(False)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert stage.decision_loss(f, x.clone(), x).abs() < 1e-6
    rec = (-x).requires_grad_(True)
    loss = stage.decision_loss(f, rec, x)
    loss.backward()
    assert loss > 0 and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in f.parameters())  # the classifier stays frozen


@pytest.mark.slow
def test_decision_weight_trains_with_the_classifier_in_the_loop(smoke_cfg, tmp_path):
    random_world(tmp_path / "runs" / "knee")
    art = run_chain(smoke_cfg(*FAST, "encoder.decision_weight=1.0"))["encoder"]
    rows = [json.loads(line) for line in (art.dir / "log.jsonl").read_text().splitlines()]
    real = [r for r in rows if r.get("train/phase") == 1]
    assert real and all(r["train/decision"] > 0 for r in real)  # the term is on in phase 2 only
    assert all(r["train/decision"] == 0 for r in rows if r.get("train/phase") == 0)


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_weights(smoke_cfg, tmp_path, monkeypatch):
    overrides = (
        *FAST,
        "encoder.steps=8",
        "encoder.real_steps=4",
        "checkpoint_every=4",
        "encoder.eval_images=4",
    )
    ref_runs = tmp_path / "ref"
    random_world(ref_runs / "knee")
    ref = run_chain(smoke_cfg(*overrides, f"runs_dir={ref_runs}"))["encoder"]

    random_world(tmp_path / "runs" / "knee")
    real_lr_at = stage.lr_at

    def crash_at_step_10(step, **kw):
        if step == 10:  # inside the real-image phase, after the checkpoint at step 8
            raise RuntimeError("power cut")
        return real_lr_at(step, **kw)

    monkeypatch.setattr(stage, "lr_at", crash_at_step_10)
    with pytest.raises(RuntimeError, match="power cut"):
        run_chain(smoke_cfg(*overrides))
    monkeypatch.setattr(stage, "lr_at", real_lr_at)
    art = run_chain(smoke_cfg(*overrides))["encoder"]
    assert art.info["resumed_from_step"] == 8
    a, b = load_file(str(ref.path("encoder"))), load_file(str(art.path("encoder")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_cuts_both_phases_and_still_finishes(smoke_cfg, tmp_path):
    random_world(tmp_path / "runs" / "knee")
    art = run_chain(
        smoke_cfg(*FAST, "encoder.steps=50", "encoder.real_steps=50", "encoder.max_minutes=1e-5")
    )["encoder"]
    cut = art.info["stopped_by_time_budget"]
    assert len(cut) == 2 and "synthetic phase" in cut[0] and "real phase" in cut[1]
    assert (
        "at step 1" in cut[0] and "at step 51" in cut[1]
    )  # one step of each phase, then the budget
    assert "test/lpips" in art.metrics


@pytest.mark.slow
def test_two_gloo_processes_train_one_encoder(tmp_path):

    random_world(tmp_path / "knee")
    r = run_train(smoke_train(tmp_path, *FAST, processes=2))
    art = Artifact.load(tmp_path / "knee" / "encoder")
    assert art.info["processes"] == 2 and "test/lpips" in art.metrics
    assert (r.stdout + r.stderr).count("── encoder finished") == 1  # rank 0 alone reports
