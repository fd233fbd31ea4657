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
