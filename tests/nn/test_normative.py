"""Normative models: loss terms, prior matching, anomaly maps, save and rebuild."""

from __future__ import annotations

import pytest
import torch

from cfexplain.nn import normative as nm
from cfexplain.utils.artifacts import load_model, save_model
from cfexplain.utils.images import gaussian_blur

SMALL = dict(
    img_channels=1, img_resolution=16, latent_channels=2, width=4, levels=2, width_max=8, blocks=0
)


def test_kl_of_a_standard_normal_posterior_is_zero_and_matches_the_closed_form():
    zeros = torch.zeros(3, 2, 4, 4)
    assert torch.equal(nm.kl_standard_normal(zeros, zeros), torch.zeros(3))
    # One dimension: KL(N(1, e^1) || N(0, 1)) = 0.5 * (1 + e - 1 - 1)
    mu, logvar = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    expected = 0.5 * (1.0 + torch.e - 1.0 - 1.0)
    assert nm.kl_standard_normal(mu, logvar).item() == pytest.approx(expected)
    # Summed over dimensions: two copies double it.
    assert nm.kl_standard_normal(mu.repeat(1, 2), logvar.repeat(1, 2)).item() == pytest.approx(
        2 * expected
    )


def test_reparameterisation_gradients_flow_to_mu_and_logvar():
    mu = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    eps = torch.randn(4, 3)
    z = nm.reparameterise(mu, logvar, eps)
    (z * 2).sum().backward()
    assert torch.allclose(mu.grad, torch.full_like(mu, 2.0))
    assert torch.allclose(logvar.grad, 2 * 0.5 * (0.5 * logvar.detach()).exp() * eps)
    # Through a whole VAE step, every encoder parameter gets a gradient.
    vae = nm.ConvVAE(**SMALL)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    m, lv = vae.posterior(x)
    recon = vae.decoder(nm.reparameterise(m, lv, torch.randn_like(m)))
    (nm.reconstruction_loss(x, recon).mean() + nm.kl_standard_normal(m, lv).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())


def test_adversarial_prior_matching_moves_codes_toward_the_prior():
    """A linear 'encoder' of shifted, squashed data learns, through D alone, codes like N(0, I)."""
    torch.manual_seed(0)
    data = torch.randn(2048, 2) * torch.tensor([0.3, 2.0]) + torch.tensor([3.0, -1.0])
    enc = torch.nn.Linear(2, 2)
    disc = nm.LatentDiscriminator(2, hidden=32)
    opt_e = torch.optim.Adam(enc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    probe, prior_probe = data[:512], torch.randn(512, 2)
    with torch.no_grad():
        before = nm.mmd_rbf(enc(probe), prior_probe).item()
    for _ in range(200):
        x = data[torch.randint(len(data), (128,))]
        code = enc(x)
        loss_d = nm.d_prior_loss(disc(torch.randn(128, 2)), disc(code.detach()))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        opt_e.zero_grad()
        nm.g_prior_loss(disc(enc(x))).backward()
        opt_e.step()
    with torch.no_grad():
        after = nm.mmd_rbf(enc(probe), prior_probe).item()
    # Adversarial training oscillates around the prior; a large drop is what it reliably does.
    assert after < 0.4 * before, (before, after)


def test_mmd_separates_distributions():
    a, b = torch.randn(256, 3), torch.randn(256, 3)
    assert nm.mmd_rbf(a, b) < nm.mmd_rbf(a, b + 1.0)


@pytest.mark.parametrize("cls", [nm.ConvVAE, nm.ConvAAE])
def test_anomaly_map_shape_range_and_scores(cls):
    model = cls(**SMALL, residual_sigma=0.0, score="mean").eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    recon, residual, score = model.anomaly(x)
    assert recon.shape == x.shape and residual.shape == (3, 1, 16, 16) and score.shape == (3,)
    assert recon.min() >= -1 and recon.max() <= 1
    assert residual.min() >= 0 and residual.max() <= 2
    assert torch.allclose(residual, (x - recon).abs())
    assert torch.allclose(score, residual.flatten(1).mean(1))
    model.score = "p100"
    assert torch.allclose(model.anomaly(x)[2], residual.flatten(1).amax(1))
    with pytest.raises(AssertionError, match=r"\[N, 1, 16, 16\]"):
        model.anomaly(torch.zeros(1, 3, 16, 16))


def test_rgb_residual_averages_channels_and_smoothing_keeps_the_mass():
    x = torch.zeros(1, 3, 16, 16)
    recon = torch.zeros(1, 3, 16, 16)
    recon[0, 0, 8, 8] = 0.9  # one channel of one pixel off, far from the borders
    r = nm.residual_map(x, recon)
    assert (
        r.shape == (1, 1, 16, 16)
        and r[0, 0, 8, 8] == pytest.approx(0.3)
        and r.sum() == pytest.approx(0.3)
    )
    smooth = nm.residual_map(x, recon, sigma=1.0)
    assert smooth.sum() == pytest.approx(0.3, rel=1e-4) and smooth.max() < 0.3
    assert torch.allclose(gaussian_blur(torch.ones(1, 1, 8, 8), 1.5), torch.ones(1, 1, 8, 8))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="normative.score"):
        nm.ConvAAE(**SMALL, score="median")
    with pytest.raises(ValueError, match="img_resolution=18"):
        nm.ConvAAE(**{**SMALL, "img_resolution": 18})
    with pytest.raises(ValueError, match="normative.recon_loss"):
        nm.reconstruction_loss(torch.zeros(1, 1), torch.zeros(1, 1), "huber")


def test_saved_model_rebuilds_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    kwargs = {**SMALL, "residual_sigma": 0.5, "score": "p99"}
    vae = nm.ConvVAE(**kwargs).eval()
    save_model(tmp_path / "vae.safetensors", vae, "cfexplain.nn.normative.ConvVAE", kwargs)
    back = load_model(tmp_path / "vae.safetensors")
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert isinstance(back, nm.ConvVAE) and back.score == "p99" and back.residual_sigma == 0.5
    for a, b in zip(vae.anomaly(x), back.anomaly(x), strict=True):
        assert torch.equal(a, b)
