"""Counterfactual metrics against hand-computed values and scipy's Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cfexplain.explain import metrics as M
from cfexplain.explain.counterfactual import Counterfactuals


def _cf(probs, recon_probs, images=None, recon=None) -> Counterfactuals:
    probs = torch.tensor(probs)
    n, k = probs.shape
    return Counterfactuals(
        images=images if images is not None else torch.zeros(n, k, 1, 2, 2),
        lambdas=torch.linspace(-1, 1, k).expand(n, -1),
        probs=probs,
        reconstruction=recon if recon is not None else torch.zeros(n, 1, 2, 2),
        recon_error=torch.full((n,), 0.25),
        input_probs=torch.tensor(recon_probs),
        w=torch.zeros(n, 1, 3),
        target=1,
        recon_probs=torch.tensor(recon_probs),
    )


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(20, 9)).astype(np.float32)  # many ties
    b = rng.normal(size=(20, 9)).astype(np.float32)
    ours = M.spearman(torch.tensor(a), torch.tensor(b)).numpy()
    ref = np.array([spearmanr(x, y).statistic for x, y in zip(a, b)])
    ok = ~np.isnan(ref)
    assert np.allclose(ours[ok], ref[ok], atol=1e-5)
    # a constant row has no ordering: 0, not NaN
    assert M.spearman(torch.ones(1, 5), torch.arange(5.0)[None]).item() == 0.0


def test_flip_rate_monotonicity_and_summary():
    cf = _cf(
        [
            [0.1, 0.3, 0.5, 0.7, 0.9],  # rising, flips
            [0.9, 0.7, 0.6, 0.55, 0.52],  # falling, never flips (positive throughout)
            [0.2, 0.4, 0.3, 0.45, 0.6],  # mostly rising, flips at the last frame
        ],
        [0.4, 0.8, 0.35],
    )
    assert M.flip_rate(cf) == pytest.approx(2 / 3)
    mono = M.monotonicity(cf)
    assert mono[0].item() == pytest.approx(1.0) and mono[1].item() == pytest.approx(-1.0)
    assert mono[2].item() == pytest.approx(0.9)
    s = M.summary(cf)
    assert s["flip_rate"] == pytest.approx(2 / 3)
    assert s["monotonicity_mean"] == pytest.approx((1 - 1 + 0.9) / 3)
    assert s["monotonicity_share_0.9"] == pytest.approx(2 / 3)
    assert s["recon_error"] == pytest.approx(0.25) and s["recon_decision_agreement"] == 1.0


def test_proximity_measures_the_flipping_frame_and_skips_the_rest():
    images = torch.zeros(2, 3, 1, 2, 2)
    images[0, 2] = 0.5  # the frame that flips for image 0
    images[0, 0] = 9.0  # a far frame that must not be measured
    cf = _cf([[0.2, 0.4, 0.8], [0.1, 0.2, 0.3]], [0.3, 0.3], images=images)
    prox = M.proximity(cf)
    assert prox["l1"][0].item() == pytest.approx(0.5) and math.isnan(prox["l1"][1].item())
    assert M.summary(cf)["proximity_l1"] == pytest.approx(0.5)
    no_flip = _cf([[0.1, 0.2, 0.3]], [0.3])
    assert math.isnan(M.summary(no_flip)["proximity_l1"])
