"""The guard's pieces on planted signals: thresholds, statuses and their reasons, Mahalanobis
distances, the probability gap, and the calibration file."""

from __future__ import annotations

import math

import pytest
import torch

from cfexplain.explain import guard


def _normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).abs()


def _calibration(**signals: torch.Tensor) -> guard.Calibration:
    return guard.calibrate(signals, torch.zeros(2), torch.eye(2), quantile=0.99, margin=0.5)


def test_threshold_is_the_quantile_plus_a_margin_of_iqr():
    v = torch.arange(101, dtype=torch.float64)  # quantiles are the values themselves
    assert guard.threshold(v, 0.99, 0.0) == pytest.approx(99.0)
    assert guard.threshold(v, 0.99, 1.0) == pytest.approx(99.0 + 50.0)


def test_statuses_and_reasons_name_the_signal_value_and_threshold():
    cal = _calibration(
        recon_error=_normal(1000, 0),
        feature_distance=_normal(1000, 1),
        recon_prob_gap=_normal(1000, 2),
    )
    t = cal.thresholds
    signals = {
        "recon_error": torch.tensor([0.1, 10 * t["recon_error"], 0.1, 0.1, math.nan]),
        "feature_distance": torch.tensor([0.1, 0.1, 0.1, 10 * t["feature_distance"], 0.1]),
        "recon_prob_gap": torch.tensor(
            [0.1, 10 * t["recon_prob_gap"], 10 * t["recon_prob_gap"], 0.1, 0.1]
        ),
    }
    v = guard.assess(signals, cal)
    assert [x.status for x in v] == [
        guard.IN_DISTRIBUTION,
        guard.UNLIKE_TRAINING,  # outranks the reconstruction gap, which is listed too
        guard.READ_DIFFERENTLY,
        guard.UNLIKE_TRAINING,
        guard.UNLIKE_TRAINING,  # a NaN signal is never "in distribution"
    ]
    assert not v[0].flagged and v[0].reasons == []
    assert [r.split()[0] for r in v[1].reasons] == ["recon_error", "recon_prob_gap"]
    assert f"> {t['recon_error']:.3g}" in v[1].reasons[0]
    assert (
        v[3].reasons[0].startswith("feature_distance")
        and "far from the training" in v[3].describe()
    )
    assert v[2].describe().startswith(guard.READ_DIFFERENTLY)


def test_in_distribution_draws_are_rarely_flagged():
    cal = _calibration(recon_error=_normal(4000, 3), feature_distance=_normal(4000, 4))
    fresh = {"recon_error": _normal(4000, 5), "feature_distance": _normal(4000, 6)}
    share = sum(v.flagged for v in guard.assess(fresh, cal)) / 4000
    assert share <= 0.01


def test_mahalanobis_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=torch.float64)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64) @ cov.sqrt()
    mean, precision = guard.feature_model(x, shrinkage=0.0)
    d = guard.mahalanobis(torch.tensor([[2.0, 0.0], [0.0, 0.5], [2.0, 0.5]]), mean, precision)
    assert d.tolist() == pytest.approx([1.0, 1.0, math.sqrt(2)], rel=0.03)


def test_prob_gap_is_the_largest_probability_change():
    class Planted(torch.nn.Module):
        def forward(self, x):  # logits from the mean brightness: brighter reads as class 1
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1) * 10

    x = torch.full((2, 1, 8, 8), 0.5)
    rec = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), -0.5)])
    gap = guard.prob_gap(Planted(), x, rec)
    p1 = torch.sigmoid(torch.tensor(10.0))  # softmax of (-5, 5) for class 1
    assert gap[0] == 0.0
    assert gap[1] == pytest.approx(float(p1 - (1 - p1)), abs=1e-6)


def test_calibration_round_trips_through_its_file(tmp_path):
    cal = guard.calibrate(
        {"recon_error": _normal(100, 7), "normative_score": _normal(100, 8)},
        torch.arange(3.0),
        torch.eye(3) * 2,
    )
    back = guard.Calibration.load(cal.save(tmp_path / guard.GUARD_FILE))
    assert back.thresholds == cal.thresholds
    assert back.stats == cal.stats
    assert torch.equal(back.feature_precision, cal.feature_precision.float())
    assert (back.quantile, back.margin) == (cal.quantile, cal.margin)
    assert back.evidence_gap is None
    gapped = guard.calibrate(
        {"evidence_loss": 3 * _normal(100, 9)},
        torch.arange(3.0),
        torch.eye(3),
        generated={"evidence_loss": _normal(100, 10)},
        evidence_limit=4.0,
    )
    back = guard.Calibration.load(gapped.save(tmp_path / "gapped.safetensors"))
    assert (back.evidence_gap, back.evidence_limit) == (gapped.evidence_gap, 4.0)


class _CornerReader(torch.nn.Module):
    """Three classes; the logits read the mean of the top-left 4x4 corner alone."""

    def forward(self, x):
        m = x[:, 0, :4, :4].mean(dim=(1, 2))
        return torch.stack([-5 * m, 5 * m, torch.zeros_like(m)], dim=1)


def test_decision_margin_is_the_logit_against_the_other_classes():
    logits = torch.tensor([[1.0, 3.0], [2.0, -1.0], [0.5, 2.0]])
    assert guard.decision_margin(logits, torch.tensor([1, 0, 1])).tolist() == pytest.approx(
        [2.0, 3.0, 1.5]
    )
    three = torch.tensor([[1.0, 2.0, 0.0]])
    expected = 2.0 - math.log(math.exp(1.0) + math.exp(0.0))
    assert guard.decision_margin(three, torch.tensor([1]))[0] == pytest.approx(expected)


def test_evidence_loss_finds_the_region_the_reconstruction_drops():
    x = torch.zeros(3, 1, 16, 16)
    x[:, :, :4, :4] = 1.0  # a bright plate in the corner the classifier reads
    rec = x.clone()
    rec[0, :, :4, :4] = 0.0  # image 0: the reconstruction drops the plate
    rec[1, :, 8:, 8:] = -1.0  # image 1: it differs only where the classifier does not look
    loss, cell = guard.evidence_loss(_CornerReader(), x, rec, grid=4)
    # image 0: margin of class 1 falls from 5 - logsumexp(-5, 0) to 0 - logsumexp(0, 0)
    drop = (5 - math.log(math.exp(-5) + 1)) - (0 - math.log(2))
    assert loss[0] == pytest.approx(drop, abs=1e-5) and cell[0] == 0
    assert loss[1] == 0 and loss[2] == 0
    assert guard.cell_name(0) == "top left (row 1, column 1 of 4x4)"
    assert guard.cell_name(15).startswith("bottom right")
    assert guard.cell_name(6).startswith("middle centre")


def test_evidence_threshold_comes_from_the_generator_and_the_gap_warns():
    val = {"recon_error": _normal(1000, 9), "evidence_loss": 4 * _normal(1000, 10)}
    own = {"evidence_loss": _normal(1000, 11)}
    cal = guard.calibrate(val, torch.zeros(2), torch.eye(2), 0.99, 0.5, generated=own)
    assert cal.thresholds["evidence_loss"] == pytest.approx(
        guard.threshold(own["evidence_loss"], 0.99, 0.5)
    )
    s = cal.stats["evidence_loss"]
    assert cal.evidence_gap == pytest.approx(s["q50"] / s["generated_q50"])
    assert 3.0 < cal.evidence_gap < 5.0  # the validation losses are 4x the samples'
    assert f"{cal.evidence_gap:.1f}x as much" in (guard.evidence_note(cal) or "")
    calm = guard.calibrate(val, torch.zeros(2), torch.eye(2), generated=val)
    assert calm.evidence_gap == pytest.approx(1.0) and guard.evidence_note(calm) is None
    signals = {
        "recon_error": torch.tensor([0.1]),
        "evidence_loss": torch.tensor([100.0]),
        "evidence_cell": torch.tensor([3.0]),
    }
    (v,) = guard.assess(signals, cal)
    assert v.status == guard.READ_DIFFERENTLY
    assert v.reasons[0].startswith("evidence_loss 100 >")
    assert "top right" in v.reasons[0] and v.cell == 3
    (calm_verdict,) = guard.assess({**signals, "evidence_loss": torch.tensor([0.0])}, cal)
    assert calm_verdict.cell is None  # a cell is named only when its signal is over
