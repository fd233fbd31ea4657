"""Generator stage: a smoke run learns, divergence is caught, kill then resume continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cfexplain.data import build_dataset, collate
from cfexplain.nn.stylegan2 import Generator
from cfexplain.stages import generator as stage
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact, load_model
from tests.conftest import kill_when, run_train, smoke_train


def _moments(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean and std image of a batch ``[N, C, H, W]`` -> ``[2, C, H, W]``."""
    return torch.stack([x.mean(0), x.std(0)])


def _log(art: Artifact) -> list[dict]:
    return [json.loads(line) for line in (art.dir / "log.jsonl").read_text().splitlines()]


def test_smoke_run_learns_the_data_and_writes_everything(smoke_cfg):
    cfg = smoke_cfg(
        "stages=[classifier,generator]", "generator.kimg=0.6", "generator.snapshot_kimg=0.12"
    )
    arts = run_chain(cfg)
    art = arts["generator"]
    for name in ("G_ema", "G", "D", "grid"):
        assert art.path(name).is_file()
    for key in ("fd_classifier", "kid_classifier", "class_shares_generated", "kimg", "ada_p"):
        assert key in art.metrics
    assert art.metrics["kimg"] >= 0.6
    assert "fd_classifier_real_train_vs_test" in art.info

    # Samples moved toward the data: per-pixel moments of G_ema vs reals, trained vs untrained.
    reals = collate([build_dataset(cfg.data, "test")[i] for i in range(48)])[0]
    trained = load_model(art.path("G_ema"))
    fresh = Generator(**trained.init_kwargs)  # same architecture, initial weights
    z = torch.randn(48, trained.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d_trained = (_moments(trained(z)) - _moments(reals)).abs().mean()
        d_fresh = (_moments(fresh(z)) - _moments(reals)).abs().mean()
    assert d_trained < 0.5 * d_fresh, (d_trained, d_fresh)

    # keep=best: G_ema is the snapshot with the lowest validation FD; the last one is kept too.
    val_fds = [
        r["quality/fd_classifier_val"] for r in _log(art) if "quality/fd_classifier_val" in r
    ]
    assert len(val_fds) >= 4 and art.metrics["fd_classifier_val"] == min(val_fds)
    assert art.path("G_ema_last").is_file()
    kept, last = load_file(str(art.path("G_ema"))), load_file(str(art.path("G_ema_last")))
    same = all(torch.equal(kept[k], last[k]) for k in kept)
    assert same == (val_fds.index(min(val_fds)) == len(val_fds) - 1)

    # The log holds the losses, the D logit gap and ADA p at every logging step.
    rows = [r for r in _log(art) if "loss/D" in r]
    assert len(rows) >= 3 and all(0.0 <= r["ada/p"] <= 1.0 for r in rows)


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(smoke_cfg, monkeypatch):
    cfg = smoke_cfg("stages=[classifier,generator]", "generator.kimg=0.4", "checkpoint_every=2")
    calls = {"n": 0}
    real_loss = stage.gan.d_logistic_loss

    def poisoned(real_logits, fake_logits):
        calls["n"] += 1
        loss = real_loss(real_logits, fake_logits)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(stage.gan, "d_logistic_loss", poisoned)
    with pytest.raises(stage.DivergenceError, match=r"diverged at 0\.0[0-9]+ kimg.*untouched"):
        run_chain(cfg)
    partial = cfg.runs_dir + "/knee/.generator.partial/state.pt"
    saved = torch.load(partial, weights_only=True)
    assert saved["loop"]["step"] == 6  # the last good step's checkpoint, not the NaN one
    assert all(torch.isfinite(v).all() for v in saved["G"].values())


def _train_cmd(runs):
    return smoke_train(
        runs,
        "stages=[classifier,generator]",
        "generator.kimg=0.8",
        "generator.snapshot_kimg=0.4",
        "checkpoint_every=5",
    )


@pytest.mark.slow
def test_kill_then_resume_continues_from_the_same_kimg_and_ada_p(tmp_path):
    run_train(_train_cmd(tmp_path / "ref"))
    runs = tmp_path / "killed"
    state = runs / "knee" / ".generator.partial" / "state.pt"
    kill_when(_train_cmd(runs), state.exists, settle=0.3)  # past the first checkpoint
    assert not (runs / "knee" / "generator").exists()
    saved = torch.load(state, weights_only=True)
    kimg_at_kill, p_at_kill = saved["loop"]["nimg"] / 1000, float(saved["augment"]["p"])

    resumed = run_train(_train_cmd(runs))
    assert f"resumed from {state}" in resumed.stderr + resumed.stdout
    assert f"at {kimg_at_kill:.1f} kimg, ADA p={p_at_kill:.3f}" in resumed.stderr + resumed.stdout
    art = Artifact.load(runs / "knee" / "generator")
    assert kimg_at_kill > 0
    assert art.info["resumed_from_kimg"] == pytest.approx(kimg_at_kill, abs=1e-3)
    ref_art = Artifact.load(tmp_path / "ref" / "knee" / "generator")
    assert art.metrics["ada_p"] == ref_art.metrics["ada_p"]
    for name in ("G_ema", "D"):
        a, b = load_file(str(ref_art.path(name))), load_file(str(art.path(name)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_time_budget_stops_early_with_a_final_snapshot(smoke_cfg):
    cfg = smoke_cfg(
        "stages=[classifier,generator]", "generator.kimg=50", "generator.max_minutes=0.002"
    )
    art = run_chain(cfg)["generator"]
    assert art.metrics["stopped_by_time_budget"] is True
    assert 0 < art.metrics["kimg"] < 50 and art.path("grid").is_file()
    assert art.metrics["train_seconds"] >= 0.1  # 0.12 s, rounded to 0.1 s
