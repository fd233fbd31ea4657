"""The generator's fixed yardsticks on distributions whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from cfexplain.nn.perceptual import FixedFeatures
from cfexplain.utils.quality import factor_coverage, frechet_distance, precision_recall


def _gauss(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).double() + shift


def test_frechet_distance_of_a_shifted_gaussian_is_the_squared_shift():
    # Same covariance (the same draws), means apart by (1, 2, 0, ...): FD = 1 + 4 exactly.
    a = _gauss(4000, 6, seed=0)
    shift = torch.zeros(6, dtype=torch.double)
    shift[:2] = torch.tensor([1.0, 2.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_scaled_gaussians_matches_the_closed_form():
    # N(0, I) vs N(0, s^2 I) in d dims: FD = d (1 - s)^2.
    a, b = _gauss(20000, 3, seed=1), 2.0 * _gauss(20000, 3, seed=2)
    assert frechet_distance(a, b) == pytest.approx(3 * (1 - 2.0) ** 2, rel=0.05)


def test_precision_recall_identical_disjoint_and_partial():
    real = _gauss(300, 4, seed=3)
    assert precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = _gauss(300, 4, seed=4, shift=100.0)
    assert precision_recall(real, far, k=3) == {"precision": 0.0, "recall": 0.0}
    # Fakes that cover only half the reals (one of two clusters): precision high, recall ~0.5.
    two = torch.cat([_gauss(150, 4, seed=5), _gauss(150, 4, seed=6, shift=50.0)])
    one = _gauss(150, 4, seed=7)
    pr = precision_recall(two, one, k=3)
    assert pr["precision"] > 0.9
    assert 0.4 < pr["recall"] < 0.6
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(real[:3], real, k=3)


def test_factor_coverage_in_real_std_units_and_rates():
    real = {"joint_space": torch.linspace(0, 1, 1001), "marker": (torch.arange(100) % 2).float()}
    fake = {"joint_space": torch.linspace(0, 1, 1001) + 0.1, "marker": torch.zeros(100)}
    cov = factor_coverage(real, fake, rates=("marker",))
    # A shift of 0.1 moves the 1-D Wasserstein distance by 0.1; the real std is 1/sqrt(12).
    assert cov["w1/joint_space"] == pytest.approx(
        0.1 / real["joint_space"].double().std(0, False).item(), rel=1e-3
    )
    assert cov["rate/marker/real"] == 0.5
    assert cov["rate/marker/generated"] == 0.0
    same = factor_coverage(real, real, rates=("marker",))
    assert same["w1/joint_space"] == 0.0


def test_fixed_features_are_the_shipped_network_and_do_not_move():
    net = FixedFeatures(size=64)
    assert net.weights.is_file() and "stlpips" in str(net.weights)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    radii = torch.tensor([0.3, 0.4, 0.5, 0.6])[:, None, None, None]
    x = ((xx**2 + yy**2).sqrt() < radii).float() * 1.6 - 0.8  # [4, 1, 32, 32] discs
    f1, f2 = net(x), FixedFeatures(size=64)(x)
    assert f1.shape == (4, 64 + 192 + 384 + 256 + 256)
    assert torch.equal(f1, f2)  # nothing random: a second instance gives the same features
    # A disc a little brighter is nearer to the disc than noise is.
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    near, far = (f1 - net(x + 0.05)).norm(dim=1), (f1 - net(noise)).norm(dim=1)
    assert (near < far).all() and not math.isclose(float(far.min()), 0.0)


def test_class_conditional_fd_judges_each_fake_against_its_own_class():
    from cfexplain.utils.quality import class_conditional_fd

    # Two real classes far apart; fakes of class 0 shifted by (1, 0, ...) from class 0's reals
    # (the same draws: FD = 1), fakes of class 1 by (0, 3, 0, ...) (FD = 9). Weighted by the
    # fakes' counts (300 and 100): (300 * 1 + 100 * 9) / 400 = 3.
    r0, r1 = _gauss(300, 4, seed=10), _gauss(100, 4, seed=11, shift=20.0)
    real = torch.cat([r0, r1])
    labels = torch.cat([torch.zeros(300), torch.ones(100)]).long()
    s0, s1 = torch.zeros(4, dtype=torch.double), torch.zeros(4, dtype=torch.double)
    s0[0], s1[1] = 1.0, 3.0
    fake = torch.cat([r0 + s0, r1 + s1])
    out = class_conditional_fd(real, labels, fake, labels)
    assert out["per_class"] == {0: pytest.approx(1.0, abs=1e-6), 1: pytest.approx(9.0, abs=1e-6)}
    assert out["counts"] == {0: 300, 1: 100} and out["skipped_fakes"] == 0
    assert out["fd"] == pytest.approx(3.0, abs=1e-6)
    # Real images of their own class: identical sets give 0, however far the classes are apart;
    # pooled, the same fakes are at a large distance from the mixture.
    assert class_conditional_fd(real, labels, real, labels)["fd"] == pytest.approx(0, abs=1e-6)
    assert frechet_distance(real, r0) > 50
    # Fakes labelled with the other class are judged against it: a distance of ~20² per class.
    assert class_conditional_fd(real, labels, fake, 1 - labels)["fd"] > 300
    # A class with too few images on a side is left out and counted.
    few = class_conditional_fd(real, labels, fake[:302], labels[:302], min_count=5)
    assert few["counts"] == {0: 300} and few["skipped_fakes"] == 2
    assert few["fd"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="min_count"):
        class_conditional_fd(real, labels, fake, labels, min_count=1)
