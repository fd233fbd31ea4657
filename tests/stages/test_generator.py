"""Generator stage: a smoke run learns, divergence is caught, kill then resume continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cfexplain.data import build_dataset, collate
from cfexplain.nn.stylegan2 import Generator
from cfexplain.stages import generator as stage
from cfexplain.train import run_chain
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, file_checksum, load_model
from tests.conftest import compose_config, kill_when, run_train, smoke_train


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

    # The fixed yardsticks beside the classifier's: FD, precision and recall on FixedFeatures.
    for key in ("fd_fixed", "fd_fixed_val", "precision", "recall", "fd_classifier_ratio"):
        assert key in art.metrics, key
    assert 0.0 <= art.metrics["precision"] <= 1.0 and 0.0 <= art.metrics["recall"] <= 1.0
    assert art.info["fd_fixed_real_train_vs_test"] > 0
    assert art.metrics["collapse_rollbacks"] == 0 and art.metrics["lr_scale"] == 1.0

    # keep=best: G_ema is the snapshot with the lowest fixed-feature FD on the validation split
    # (keep_metric); the last one is kept too.
    val_fds = [r["quality/fd_fixed_val"] for r in _log(art) if "quality/fd_fixed_val" in r]
    assert len(val_fds) >= 4 and art.metrics["fd_fixed_val"] == min(val_fds)
    assert "lowest fd_fixed_val" in art.metrics["kept"]
    assert art.path("G_ema_last").is_file()
    kept, last = load_file(str(art.path("G_ema"))), load_file(str(art.path("G_ema_last")))
    same = all(torch.equal(kept[k], last[k]) for k in kept)
    assert same == (val_fds.index(min(val_fds)) == len(val_fds) - 1)

    # The log holds the losses, the D logit gap and ADA p at every logging step.
    rows = [r for r in _log(art) if "loss/D" in r]
    assert len(rows) >= 3 and all(0.0 <= r["ada/p"] <= 1.0 for r in rows)


TINY_ORACLE = (
    "generator.metrics.oracle={n_train: 64, n_test: 16, steps: 4, batch_size: 16, seed: 0}"
)


def test_factor_coverage_is_read_by_the_knee_oracles_at_every_snapshot(smoke_cfg):
    cfg = smoke_cfg("stages=[classifier,generator]", TINY_ORACLE)
    art = run_chain(cfg)["generator"]
    # One oracle cache beside the runs, the one evaluate reads (runs/oracles/knee_<R>px).
    assert (Path(cfg.runs_dir) / "oracles" / "knee_32px" / "oracle.safetensors").is_file()
    for factor in ("jsw_min", "osteophyte", "sclerosis", "deformity", "rotation", "exposure"):
        assert art.metrics[f"w1/{factor}"] >= 0.0, factor
    for rate in ("marker", "laterality"):
        for which in ("real", "generated"):
            assert 0.0 <= art.metrics[f"rate/{rate}/{which}"] <= 1.0
    rows = [r for r in _log(art) if "quality/w1/osteophyte" in r]
    assert len(rows) == 2  # every snapshot (0.128 and 0.256 kimg)
    # A second run reuses the cached oracle: the same readings of the same real images.
    again = run_chain(smoke_cfg("stages=[classifier,generator]", TINY_ORACLE, "experiment=again"))
    again = again["generator"]
    assert again.info["factor_oracle"]["reused"] is True
    assert again.metrics["rate/marker/real"] == art.metrics["rate/marker/real"]


def test_the_task_changes_the_judge_not_the_generator(smoke_cfg):
    """G never sees a label and its snapshot is kept on the fixed features, so the 5-grade task
    trains the same G as the binary one (no guard event at this length); only the classifier's
    verdict on it differs."""
    kw = ("stages=[classifier,generator]", "generator.kimg=0.384", "generator.snapshot_kimg=0.128")
    binary = run_chain(smoke_cfg(*kw))
    kl = run_chain(smoke_cfg(*kw, "data.task=kl", "experiment=kl"))
    assert kl["classifier"].metrics["test/auc"] != binary["classifier"].metrics["test/auc"]
    assert len(kl["generator"].metrics["class_shares_generated"]) == 5
    for name in ("G_ema", "G", "D"):
        digests = [file_checksum(r["generator"].path(name)) for r in (kl, binary)]
        assert digests[0] == digests[1], name
    for key in ("fd_fixed", "precision", "recall", "kept"):
        assert kl["generator"].metrics[key] == binary["generator"].metrics[key], key
    assert kl["generator"].metrics["fd_classifier"] != binary["generator"].metrics["fd_classifier"]


def test_shared_fakes_step_as_a_d_phase_then_a_g_phase_drawing_the_fakes_again(smoke_cfg):
    """One G pass per iteration: the G phase backpropagates through fakes drawn before D
    stepped (G's weights have not changed since), so the weights after the iteration are those
    of a D phase, then a G phase that draws the same fakes (same noise) in a pass of its own."""
    cfg = smoke_cfg("generator.shared_fakes=true")
    d = distributed.setup("cpu")
    shared, apart = stage._build(cfg, d), stage._build(cfg, d)
    before = {k: v.detach().clone() for k, v in shared.G.named_parameters()}
    res, n = int(cfg.data.resolution), int(cfg.generator.batch_size)
    torch.manual_seed(0)
    real, z = torch.rand(n, 1, res, res) * 2 - 1, torch.randn(n, shared.G.z_dim)
    passes = []
    shared.G.synthesis.register_forward_hook(lambda *_: passes.append(1))

    phases = stage._phases(cfg.generator, shared, stage._start(), d)
    assert [p.name for p in phases] == ["D", "G"]
    torch.manual_seed(7)  # the synthesis noise
    stage._run_phases(cfg.generator, shared, phases, stage._Batch(real.clone(), z), 1, d)
    assert len(passes) == 1

    g = OmegaConf.merge(cfg.generator, {"shared_fakes": False})
    published = stage._phases(g, apart, stage._start(), d)
    assert [p.name for p in published] == ["G", "D"]
    by_name = {p.name: p for p in published}
    b = stage._Batch(real.clone(), z)
    for name in ("D", "G"):
        torch.manual_seed(7)
        stage._run_phase(by_name[name], list(by_name.values()), b, 1, d)

    for mine, theirs in ((shared.D, apart.D), (shared.G, apart.G)):  # w_avg: one update, not two
        for (k, v), w in zip(mine.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)
    moved = max((v - before[k]).abs().max().item() for k, v in shared.G.named_parameters())
    assert moved > 1e-4  # G stepped on the gradient through the shared fakes


def _kick_after(monkeypatch, step: int) -> dict:
    """Plant a divergence: from ``step`` on, every iteration adds large noise to G and its EMA.
    Records what each rollback restored."""
    seen: dict = {"rollbacks": []}
    advance, roll_back = stage._advance, stage._roll_back

    def kicked(g, t, s, b, d):
        advance(g, t, s, b, d)
        if s["step"] >= step:
            gen = torch.Generator().manual_seed(s["step"])
            with torch.no_grad():
                for net in (t.G, t.G_ema):
                    for p in net.synthesis.parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 2.0)

    def recorded(t, s, lr_factor):
        roll_back(t, s, lr_factor)
        restored = all(
            torch.equal(v, t.best["G"][k].to(v.device)) for k, v in t.G.state_dict().items()
        )
        seen["rollbacks"].append(
            {"restored": restored, "lr": t.G_opt.param_groups[0]["lr"], "base": t.base_lrs["G_opt"]}
        )

    monkeypatch.setattr(stage, "_advance", kicked)
    monkeypatch.setattr(stage, "_roll_back", recorded)
    return seen


def test_collapse_guard_rolls_back_a_planted_divergence(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(
        "stages=[classifier,generator]",
        "generator.kimg=0.64",
        "generator.snapshot_kimg=0.064",  # a snapshot every 8 steps
        "generator.collapse.start_kimg=0",
        "generator.collapse.patience=1",
        "generator.collapse.max_rollbacks=2",
    )
    seen = _kick_after(monkeypatch, step=40)
    art = run_chain(cfg)["generator"]
    events = art.metrics["collapse_events"]
    rollbacks = [e for e in events if e["action"] == "rollback"]
    # The kicks go on, so it collapses again after each rollback, until none is left.
    assert len(rollbacks) == 2 == art.metrics["collapse_rollbacks"]
    assert events[-1]["action"] == "none"
    assert all(e["kimg"] >= 0.32 > e["to_kimg"] for e in rollbacks)
    assert any("fd_fixed_val" in r for e in events for r in e["reasons"])
    assert art.metrics["lr_scale"] == 0.25 and rollbacks[-1]["lr_scale"] == 0.25
    # Each rollback restored the best state and lowered the learning rate by half.
    assert [r["restored"] for r in seen["rollbacks"]] == [True, True]
    assert [r["lr"] / r["base"] for r in seen["rollbacks"]] == pytest.approx([0.5, 0.25])
    # What is kept is the best snapshot from before the kicks, never a collapsed one.
    assert art.metrics["kept_kimg"] < 0.32 and art.metrics["collapsed_at_end"] is True


def test_collapse_rule_counts_collapsed_snapshots_in_a_row():
    rule = stage.CollapseRule(class_gap=0.3, fd_ratio=2.0, patience=2, max_rollbacks=1)
    s = stage._start()
    best = {"kimg": 5.0, "fd_fixed_val": 1.0, "class_share_gap": 0.05}

    def add(fd: float, gap: float) -> bool:
        s["snapshots"].append({"kimg": 5.0 * (len(s["snapshots"]) + 2), "fd_fixed_val": fd,
                               "class_share_gap": gap})  # fmt: skip
        return stage._collapsed(rule, s, best, "fd_fixed_val")

    assert add(1.5, 0.1) is False and s["collapse_streak"] == 0  # fine
    assert add(2.5, 0.1) is False and s["collapse_streak"] == 1  # FD 2.5x: first in a row
    assert add(1.2, 0.1) is False and s["collapse_streak"] == 0  # recovered: the streak resets
    assert add(1.2, 0.4) is False and s["collapse_streak"] == 1  # class shares 40 points off
    assert add(3.0, 0.1) is True and s["collapse_streak"] == 2  # two in a row: roll back
    assert s["collapse_events"][-1]["action"] == "rollback"
    assert add(3.0, 0.5) is False  # the streak goes on, but no rollback is left
    assert s["collapse_events"][-1]["action"] == "none"
    assert len(s["collapse_events"][-1]["reasons"]) == 2
    off = stage.CollapseRule(enabled=False)
    assert stage._collapsed(off, s, best, "fd_fixed_val") is False
    # Before start_kimg a collapsed snapshot is flagged (never kept nor rolled back to: the
    # shortcut run's 45-point class gap at 25 kimg was the rollback target three times) but
    # counts toward no rollback.
    late = stage.CollapseRule(start_kimg=100.0, patience=1)
    streak, events = s["collapse_streak"], len(s["collapse_events"])
    s["snapshots"].append({"kimg": 50.0, "fd_fixed_val": 1.1, "class_share_gap": 0.45})
    assert stage._collapsed(late, s, best, "fd_fixed_val") is False
    assert s["snapshots"][-1]["collapsed"] is True
    assert s["collapse_streak"] == streak and len(s["collapse_events"]) == events
    s["snapshots"].append({"kimg": 55.0, "fd_fixed_val": 1.1, "class_share_gap": 0.05})
    assert stage._collapsed(late, s, best, "fd_fixed_val") is False
    assert s["snapshots"][-1]["collapsed"] is False


def test_class_shares_count_as_collapse_only_when_they_moved_and_the_yardstick_got_worse():
    rule = stage.CollapseRule.from_config(compose_config("+dataset=knee").generator.collapse)
    # The shortcut knee at batch 8: its classifier calls an image diseased by its marker, so while
    # G learned the knee but not yet the marker its shares sat ~40 points off with the fixed FD
    # falling; the absolute rule flagged 15 to 50 kimg and rolled back to states with no marker.
    trace = [(10.0, 0.1734, 0.02, 0.07), (15.0, 0.0828, 0.13, 0.33), (20.0, 0.0626, 0.22, 0.42),
             (40.0, 0.0145, 0.59, 0.39), (45.0, 0.0211, 0.61, 0.38), (50.0, 0.0218, 0.59, 0.36),
             (60.0, 0.0101, 0.73, 0.18)]  # fmt: skip
    best = None
    for kimg, fd, recall, gap in trace:
        snap = {"kimg": kimg, "fd_fixed_val": fd, "recall": recall, "class_share_gap": gap}
        assert rule.reasons(snap, best, "fd_fixed_val") == [], kimg
        if best is None or fd < best["fd_fixed_val"]:
            best = snap
    # Mode collapse onto one class: the shares move away from the best's and the FD worsens.
    best = {"kimg": 60.0, "fd_fixed_val": 0.0101, "recall": 0.73, "class_share_gap": 0.05}
    onto_one = {"kimg": 65.0, "fd_fixed_val": 0.02, "recall": 0.6, "class_share_gap": 0.45}
    [why] = rule.reasons(onto_one, best, "fd_fixed_val")
    assert why.startswith("class shares 0.45 off the real ones, more than 0.3 beyond")
    assert rule.reasons({**onto_one, "fd_fixed_val": 0.01}, best, "fd_fixed_val") == []
    assert rule.reasons({**onto_one, "class_share_gap": 0.34}, best, "fd_fixed_val") == []
    # With no best yet (the first snapshot) the rule is absolute.
    assert rule.reasons(onto_one, None, "fd_fixed_val") != []
    assert rule.reasons({**onto_one, "class_share_gap": 0.2}, None, "fd_fixed_val") == []


def test_recall_lost_is_collapse_and_a_collapsed_snapshot_is_never_the_best():
    from cfexplain.stages._snapshots import best_index

    rule = stage.CollapseRule()
    best = {"kimg": 5.0, "fd_fixed_val": 2.4, "recall": 0.34, "class_share_gap": 0.2}
    # What a collapsing KL run showed: the fixed FD falls while recall goes to 0.
    late = {"kimg": 15.0, "fd_fixed_val": 0.34, "recall": 0.0, "class_share_gap": 0.2}
    assert rule.reasons(late, best, "fd_fixed_val") == ["recall 0.00 < 0.5 x the best's 0.34"]
    assert rule.reasons({**late, "recall": 0.2}, best, "fd_fixed_val") == []
    snaps = [dict(best), {**late, "collapsed": True}]
    assert best_index(snaps, "fd_fixed_val") == 0  # not the lower FD of the collapsed one
    assert best_index([{**late, "collapsed": True}], "fd_fixed_val") is None


def test_keep_tolerance_keeps_the_latest_snapshot_as_good_as_the_lowest():
    from cfexplain.stages._snapshots import best_index

    fds = [0.0169, 0.0249, 0.0147, 0.0165, 0.0158, 0.0192]  # late snapshots of a screen run
    snaps = [{"fd_fixed_val": v} for v in fds]
    assert best_index(snaps, "fd_fixed_val") == 2  # the lowest
    assert best_index(snaps, "fd_fixed_val", 1.2) == 4  # 0.0158 <= 1.2 x 0.0147; 0.0192 is not
    assert best_index(snaps, "fd_fixed_val", 1.05) == 2
    # Never back before the current best: a new lowest value is the latest within range.
    picks = [best_index(snaps[: k + 1], "fd_fixed_val", 1.2) for k in range(len(snaps))]
    assert picks == [0, 0, 2, 3, 4, 4]
    assert all(b >= a for a, b in zip(picks, picks[1:]))
    assert (
        best_index([*snaps[:5], {"fd_fixed_val": 0.015, "collapsed": True}], "fd_fixed_val", 1.2)
        == 4
    )


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


def test_shipped_guard_lets_a_converging_drift_pass_and_flags_a_blow_up():
    rule = stage.CollapseRule.from_config(compose_config("+dataset=knee").generator.collapse)
    # The histology run at 75 and 80 kimg: the fixed FD 2.5x and 2.8x its best while recall rose
    # and the class shares matched; under a 2x rule this rolled a converging run back.
    best = {"kimg": 60.0, "fd_fixed_val": 0.189, "recall": 0.736, "class_share_gap": 0.054}
    for kimg, fd, recall in ((75.0, 0.477, 0.808), (80.0, 0.523, 0.816)):
        snap = {"kimg": kimg, "fd_fixed_val": fd, "recall": recall, "class_share_gap": 0.004}
        assert rule.reasons(snap, best, "fd_fixed_val") == []
    blown = {"kimg": 85.0, "fd_fixed_val": 0.6, "recall": 0.8, "class_share_gap": 0.004}
    assert rule.reasons(blown, best, "fd_fixed_val") == ["fd_fixed_val 0.6 > 3 x its best 0.189"]
