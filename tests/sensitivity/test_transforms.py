"""Controlled transformations: shape and range, identity, masks that move with the image."""

from __future__ import annotations

import pytest
import torch

from cfexplain.sensitivity import transforms as T
from cfexplain.sensitivity.transforms import TRANSFORMS, get_transform

GEOMETRIC = ("rotation", "zoom", "crop")


def _images(n: int = 3, c: int = 1, r: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, r, r, generator=g) * 2 - 1


def _square(r: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """An off-centre bright square on black, ``[1, 1, R, R]``, and its mask."""
    m = torch.zeros(1, 1, r, r, dtype=torch.bool)
    m[..., 4:11, 14:21] = True
    return torch.where(m, 1.0, -1.0), m


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_transform_keeps_shape_dtype_and_range(name, channels):
    t = get_transform(name)
    x = _images(c=channels)
    assert t.identity in t.params and len(t.params) >= 5
    for p in t.params:
        y = t.apply(x, p)
        assert y.shape == x.shape and y.dtype == x.dtype, (name, p)
        assert torch.isfinite(y).all() and y.min() >= -1 and y.max() <= 1, (name, p)
    # Identity gives the input back; every other value changes it.
    assert torch.allclose(t.apply(x, t.identity), x, atol=1e-6), name
    others = [p for p in t.params if p != t.identity]
    assert all((t.apply(x, p) - x).abs().max() > 1e-3 for p in others), name


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_masks_move_only_under_geometric_transforms(name):
    t = get_transform(name)
    x, m = _square()
    p = {"rotation": 60.0, "zoom": 1.3, "crop": 0.6}.get(name, t.params[-1])
    moved = t.apply_mask(m, p)
    assert moved.dtype == torch.bool and moved.shape == m.shape
    if name not in GEOMETRIC:
        assert not t.geometric and torch.equal(moved, m)
        return
    assert t.geometric and not torch.equal(moved, m)
    # The bright pixels of the transformed image are where the transformed mask is.
    bright = t.apply(x, p) > 0
    agree = (bright == moved).float().mean()
    assert agree > 0.97, (name, float(agree))
    inter, union = (bright & moved).sum(), (bright | moved).sum()
    assert inter / union > 0.75, (name, float(inter / union))


def test_rotation_by_90_is_a_counter_clockwise_quarter_turn():
    x, m = _square()
    assert torch.allclose(T.rotation(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert torch.equal(
        get_transform("rotation").apply_mask(m, 90), torch.rot90(m, 1, dims=(-2, -1))
    )
    # A square in the top-right quadrant ends in the top-left one.
    y = T.rotation(x, 90)[0, 0] > 0
    assert y[:12, :12].sum() == m.sum() and not y[:, 12:].any()


def test_zoom_and_crop_enlarge_about_the_centre():
    m = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    m[..., 9:15, 9:15] = True  # centred
    x = torch.where(m, 1.0, -1.0)
    for moved in (
        get_transform("zoom").apply_mask(m, 2.0),
        get_transform("crop").apply_mask(m, 0.5),
    ):
        assert moved.sum() == 4 * m.sum() and moved[..., 6:18, 6:18].all()
    # Zooming out shrinks the square towards the centre and pads with black.
    small = T.zoom(x, 0.5)
    assert small[..., :6, :].max() == -1 and (small > 0).sum() < (x > 0).sum()


def test_intensity_transforms_have_their_textbook_values():
    gray = torch.zeros(1, 1, 16, 16)  # 0.5 grey level
    assert torch.allclose(T.brightness(gray, 0.3), gray + 0.3)
    assert torch.allclose(T.gamma(gray, 2.0), torch.full_like(gray, -0.5))  # 0.5**2 = 0.25
    x = _images() * 0.4
    c = T.contrast(x, 0.5)
    assert torch.allclose(c.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(c.std((1, 2, 3)), 0.5 * x.std((1, 2, 3)), atol=1e-5)
    b = T.blur(x, 1.5)
    assert torch.allclose(b.mean(), x.mean(), atol=0.02) and b.std() < 0.5 * x.std()
    assert torch.allclose(T.blur(gray, 2.0), gray, atol=1e-6)


def test_noise_is_seeded_and_scales_with_its_std():
    gray = torch.zeros(2, 1, 32, 32)
    a, b = T.noise(gray, 0.05), T.noise(gray, 0.05)
    assert torch.equal(a, b)
    assert (a / 2).std().item() == pytest.approx(0.05, rel=0.1)  # std in [0, 1] grey levels
    assert torch.allclose(T.noise(gray, 0.1), 2 * a, atol=1e-6)  # one pattern, scaled


def test_bias_field_is_smooth_and_multiplicative():
    gray = torch.zeros(1, 1, 32, 32)
    u1, u2 = ((T.bias_field(gray, p) + 1) / 2 for p in (0.2, 0.4))
    ratio1, ratio2 = torch.log(u1 / 0.5), torch.log(u2 / 0.5)
    assert torch.allclose(2 * ratio1, ratio2, atol=1e-5)  # exp(p · field): log is linear in p
    assert ratio1.abs().max() == pytest.approx(0.2, abs=1e-5)
    assert (u1[..., 1:, :] - u1[..., :-1, :]).abs().max() < 0.02  # smooth: no pixel-scale change


def test_spike_adds_one_frequency_of_the_given_amplitude():
    gray = torch.zeros(1, 1, 32, 32)
    d = (T.spike(gray, 0.1) - gray)[0, 0] / 2  # in grey levels
    assert d.abs().max() == pytest.approx(0.1, rel=1e-4)
    spectrum = torch.fft.fft2(d).abs()
    ky, kx = (round(f * 32) for f in T.SPIKE_FREQUENCY)
    assert spectrum[ky, kx] > 0.99 * spectrum.sum() / 2  # the spike and its mirror hold it all


def test_unknown_transform_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: rotation, zoom"):
        get_transform("warp")
