"""Class maximisation raises the target logit and stays in range, in input space and through G."""

from __future__ import annotations

import torch

from cfexplain.inspect.class_max import maximise_input, maximise_latent, w_average
from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.nn.stylegan2 import Generator


def _classifier() -> ResNetClassifier:
    torch.manual_seed(0)
    return ResNetClassifier(width=4, blocks=(1, 1)).eval()


def test_input_ascent_raises_the_logit_and_stays_in_the_image_range():
    model = _classifier()
    res = maximise_input(model, 1, (3, 1, 16, 16), steps=15, lr=0.1, l2=0.1)
    assert res.images.shape == (3, 1, 16, 16) and res.logits.shape == (16, 3)
    assert torch.isfinite(res.images).all() and torch.isfinite(res.logits).all()
    assert res.images.min() >= -1 and res.images.max() <= 1
    assert (res.logits[-1] > res.logits[0] + 0.1).all()
    # the returned trajectory is the model's logit of the returned images
    with torch.no_grad():
        assert torch.allclose(model(res.images)[:, 1], res.logits[-1], atol=1e-5)
    # gradients go to the input only; the model is left as it was
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_input_ascent_l2_keeps_images_smaller():
    model = _classifier()
    free = maximise_input(model, 0, (2, 1, 16, 16), steps=20, lr=0.1, l2=0.0)
    tight = maximise_input(model, 0, (2, 1, 16, 16), steps=20, lr=0.1, l2=50.0)
    assert tight.images.pow(2).mean() < free.images.pow(2).mean()


def test_latent_ascent_through_G_raises_the_logit_and_renders_bounded_images():
    torch.manual_seed(1)
    G = Generator(z_dim=8, w_dim=8, img_resolution=16, channel_base=128, channel_max=16)
    model = _classifier()
    w0 = w_average(G, 2)
    assert w0.shape == (2, G.num_ws, 8)
    res = maximise_latent(G, model, 1, w0, steps=15, lr=0.05, l2=0.0)
    assert res.images.shape == (2, 1, 16, 16) and res.logits.shape == (16, 2)
    assert res.w.shape == w0.shape
    assert torch.isfinite(res.images).all() and res.images.abs().max() <= 1
    assert (res.logits[-1] > res.logits[0]).all()
    with torch.no_grad():
        rendered = G.synthesis(res.w, noise_mode="const").clamp(-1, 1)
    assert torch.allclose(rendered, res.images, atol=1e-5)
    assert all(p.grad is None for p in [*G.parameters(), *model.parameters()])
    # the L2 pull towards w0 keeps w nearer its start
    tight = maximise_latent(G, model, 1, w0, steps=15, lr=0.05, l2=1e4)
    assert (tight.w - w0).abs().mean() < (res.w - w0).abs().mean()


def test_blur_prior_removes_high_frequencies_and_jitter_is_seeded():
    model = _classifier()

    def roughness(x):  # mean squared difference of neighbouring pixels
        return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean().item()

    plain = maximise_input(model, 1, (2, 1, 16, 16), steps=20, lr=0.1, l2=0.1)
    smooth = maximise_input(model, 1, (2, 1, 16, 16), steps=20, lr=0.1, l2=0.1, blur_every=2)
    assert roughness(smooth.images) < 0.5 * roughness(plain.images)
    a = maximise_input(model, 1, (2, 1, 16, 16), steps=10, lr=0.1, jitter=2, seed=3)
    b = maximise_input(model, 1, (2, 1, 16, 16), steps=10, lr=0.1, jitter=2, seed=3)
    assert torch.equal(a.images, b.images) and a.images.abs().max() <= 1.0
