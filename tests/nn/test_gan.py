"""The StyleGAN2-ADA training maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cfexplain.nn import gan


def test_losses_match_their_formulas():
    real, fake = torch.tensor([[2.0], [0.0]]), torch.tensor([[-1.0], [1.0]])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert gan.g_nonsaturating_loss(fake).item() == pytest.approx((sp(1.0) + sp(-1.0)) / 2)
    expected = (sp(-1.0) + sp(1.0)) / 2 + (sp(-2.0) + sp(0.0)) / 2
    assert gan.d_logistic_loss(real, fake).item() == pytest.approx(expected)


def test_r1_of_a_linear_discriminator_is_its_weight_norm():
    w = torch.randn(1, 3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2, 3))[:, None]
    assert torch.allclose(gan.r1_penalty(logits, x), w.square().sum().expand(5))


def test_path_length_of_a_linear_generator():
    # images = A w for every sample: |J^T y| has expectation |A|_F / sqrt(H W) for y ~ N(0, 1/HW).
    torch.manual_seed(0)
    A = torch.randn(16, 8)
    ws = torch.randn(4096, 1, 8, requires_grad=True)
    images = (ws[:, 0] @ A.T).view(-1, 1, 4, 4)
    lengths = gan.path_length(images, ws)
    assert lengths.mean().item() == pytest.approx(A.norm().item() / 4, rel=0.05)


def test_lazy_regularisation_adjusts_adam():
    lr, betas = gan.lazy_adam_hparams(0.002, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.002 * 16 / 17) and betas == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert gan.lazy_adam_hparams(0.002, (0.0, 0.99), 0) == (0.002, (0.0, 0.99))


def test_ema_beta_half_life_and_rampup():
    assert gan.ema_beta(32, 10**9, 10.0, None) ** (10_000 / 32) == pytest.approx(0.5)
    early, late = gan.ema_beta(32, 1000, 10.0, 0.05), gan.ema_beta(32, 10**7, 10.0, 0.05)
    assert early < late == pytest.approx(gan.ema_beta(32, 0, 10.0, None))


def test_ema_update_lerps_params_and_copies_buffers():
    a, b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
        b.running_mean.fill_(3.0)
    gan.ema_update(a, b, beta=0.75)
    assert torch.allclose(a.weight, torch.full((2,), 0.25)) and torch.equal(
        a.running_mean, b.running_mean
    )


def test_mixing_cutoff_range_and_probability():
    g = torch.Generator().manual_seed(0)
    cuts = [gan.mixing_cutoff(8, 0.9, g) for _ in range(2000)]
    used = [c for c in cuts if c is not None]
    assert 0.87 < len(used) / len(cuts) < 0.93 and set(used) == set(range(1, 8))
    assert gan.mixing_cutoff(8, 0.0, g) is None
