"""Perceptual distance: which network is loaded from where, never a download, distance behaviour."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import alexnet

from cfexplain.nn import perceptual as P


@pytest.fixture
def no_alexnet(monkeypatch, tmp_path):
    """An empty hub cache and no env var: ``auto`` must fall back to the shift-tolerant LPIPS."""
    monkeypatch.delenv(P.ALEXNET_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _images(n=3, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + i) * torch.cos(2 * yy - i) for i in range(n)])[:, None]
    return (
        base.expand(-1, c, -1, -1) * 0.8 + 0.05 * torch.randn(n, c, size, size, generator=g)
    ).clamp(-1, 1)


def test_auto_falls_back_to_shift_tolerant_lpips_and_says_why(no_alexnet, no_download):
    with pytest.warns(UserWarning, match="fell back"):
        m = P.build_perceptual("auto")
    assert m.kind == "stlpips_alex"
    assert "stlpips_pytorch" in m.note and P.ALEXNET_FILE in m.note
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    m.train()
    assert not m.training  # dropout in the heads never switches on


def test_distance_orders_distortions_and_is_differentiable(no_alexnet, no_download):
    with pytest.warns(UserWarning):
        m = P.build_perceptual("auto")
    x = _images()
    g = torch.Generator().manual_seed(1)
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    large = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d0, d_small, d_large = m(x, x), m(x, small), m(x, large)
    assert d0.shape == (3,) and torch.allclose(d0, torch.zeros(3), atol=1e-6)
    assert (d_small > 0).all() and (d_large > 2 * d_small).all()
    # grayscale is the same as the image repeated to 3 channels
    assert torch.allclose(
        m(x, large), m(x.expand(-1, 3, -1, -1), large.expand(-1, 3, -1, -1)), atol=1e-6
    )
    y = large.clone().requires_grad_(True)
    m(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # the spatial map averages to the distance, at the input's size
    s = m.spatial(x, large)
    assert s.shape == (3, 1, 32, 32) and (s >= 0).all()
    assert torch.allclose(s.mean((1, 2, 3)), d_large, rtol=0.05)


def test_small_images_are_upsampled_not_rejected(no_alexnet):
    with pytest.warns(UserWarning):
        m = P.build_perceptual("auto")
    x = _images(size=16)
    assert m(x, x.flip(-1)).shape == (3,) and (m(x, x.flip(-1)) > 0).all()
    assert m.spatial(x, x.flip(-1)).shape == (3, 1, 16, 16)


def test_classic_lpips_loads_alexnet_from_the_file_named_in_the_env(
    monkeypatch, tmp_path, no_download
):
    torch.manual_seed(3)
    net = alexnet(weights=None)
    path = tmp_path / "alex.pth"
    torch.save(net.state_dict(), path)
    monkeypatch.setenv(P.ALEXNET_ENV, str(path))
    m = P.build_perceptual("auto")
    assert m.kind == "lpips_alex" and str(path) in m.note
    # every backbone tensor is the file's one, at the index torchvision gives it
    assert torch.equal(getattr(m.net.net.slice1, "0").weight, net.features[0].weight)
    assert torch.equal(getattr(m.net.net.slice5, "10").bias, net.features[10].bias)
    x = _images(c=3)
    assert (m(x, x.flip(-1)) > 0).all()


def test_lpips_alex_without_weights_says_where_to_put_them(no_alexnet):
    with pytest.raises(FileNotFoundError, match=P.ALEXNET_FILE):
        P.build_perceptual("lpips_alex")
    with pytest.raises(ValueError, match="one of"):
        P.build_perceptual("vgg")


def test_random_kind_warns_loudly_and_is_reproducible(no_alexnet):
    with pytest.warns(UserWarning, match="untrained"):
        a = P.build_perceptual("random")
    with pytest.warns(UserWarning):
        b = P.build_perceptual("random")
    x = _images()
    assert a.kind == "random" and torch.equal(a(x, x.flip(-1)), b(x, x.flip(-1)))
