"""ADA ``bgc`` pipeline: fast paths, exact blits, resampling geometry, gradients, the controller."""

from __future__ import annotations

import math

import pytest
import torch

from cfexplain.nn import augment
from cfexplain.nn.augment import AugmentPipe, ada_adjust

GEOM = ("scale", "rotate", "aniso", "xfrac")
BLIT = ("xflip", "rotate90", "xint")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")


def only(*names: str, p: float = 1.0) -> AugmentPipe:
    """A pipe with every transform off except ``names``, at probability ``p``."""
    pipe = AugmentPipe(**{k: (1.0 if k in names else 0.0) for k in GEOM + BLIT + COLOR})
    pipe.p.fill_(p)
    return pipe


def images(n: int = 16, c: int = 1, h: int = 16, w: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w or h, generator=g) * 2 - 1


def no_resampling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("resampling ran")

    monkeypatch.setattr(augment, "_resample", boom)
    monkeypatch.setattr(augment.F, "grid_sample", boom)


def test_p_zero_returns_input_without_resampling(monkeypatch):
    no_resampling(monkeypatch)
    pipe = AugmentPipe()
    x = images(c=3)
    assert float(pipe.p) == 0.0
    assert pipe(x) is x
    state = torch.get_rng_state()
    assert pipe(x) is x
    assert torch.equal(torch.get_rng_state(), state), "p == 0 must not consume random numbers"


def test_nothing_drawn_returns_input(monkeypatch):
    no_resampling(monkeypatch)
    x = images(c=1)
    assert only(p=1.0)(x) is x  # every strength 0
    assert only("hue", "saturation", p=1.0)(x) is x  # no hue or saturation for one channel


def test_xflip_is_exact():
    x = images(n=32)
    y = only("xflip")(x)
    flipped = [torch.equal(a, b.flip(-1)) for a, b in zip(y, x)]
    same = [torch.equal(a, b) for a, b in zip(y, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 4 < sum(flipped) < 28  # a fair coin per sample


def test_rotate90_is_exact():
    x = images(n=32, h=16)
    y = only("rotate90")(x)
    seen = set()
    for a, b in zip(y, x):
        k = [q for q in range(4) if torch.equal(a, torch.rot90(b, q, dims=(1, 2)))]
        assert len(k) == 1
        seen.add(k[0])
    assert seen == {0, 1, 2, 3}


def test_rotate90_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        only("rotate90")(images(h=16, w=24))


def test_integer_translation_is_a_mirrored_shift():
    x = images(n=16, h=16)
    y = only("xint")(x)
    pad = 2  # round(0.125 * 16)
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    for i in range(len(x)):
        shifts = [
            (dy, dx)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if torch.equal(y[i], padded[i, :, pad - dy : pad - dy + 16, pad - dx : pad - dx + 16])
        ]
        assert len(shifts) >= 1, f"sample {i} is no mirrored shift of its input"


def smooth(h: int, w: int, dtype=torch.float64):
    yc = torch.arange(h, dtype=dtype) + 0.5 - h / 2
    xc = torch.arange(w, dtype=dtype) + 0.5 - w / 2
    Y, X = torch.meshgrid(yc, xc, indexing="ij")

    def fn(x, y):
        return torch.sin(0.2 * x + 0.5) * torch.cos(0.15 * y - 0.3) + 0.001 * x * y

    return X, Y, fn


def test_identity_resampling_round_trip():
    X, Y, fn = smooth(32, 32)
    x = fn(X, Y).view(1, 1, 32, 32)
    f = augment._lanczos_halfband(3).double()
    y = augment._resample(x, torch.eye(3, dtype=torch.float64).view(1, 3, 3), f)
    assert (y - x)[..., 4:-4, 4:-4].abs().max() < 1e-3
    assert (y - x).abs().max() < 0.02  # the mirrored border is a kink; still close


def test_resampling_geometry_matches_analytic_warp():
    """Pixel-centre conventions: the warp equals the continuous function at inv @ p."""
    h, w = 32, 40
    X, Y, fn = smooth(h, w)
    x = fn(X, Y).view(1, 1, h, w)
    t = torch.tensor([[2.0, 1.3, 0.8, 3.3, -1.7]], dtype=torch.float64)
    inv = (
        augment._rotation(t[:, 0])
        @ augment._scale2d(t[:, 1], t[:, 2])
        @ augment._translate2d(t[:, 3], t[:, 4])
    )
    y = augment._resample(x, inv, augment._lanczos_halfband(3).double())
    P = torch.stack([X, Y, torch.ones_like(X)], -1) @ inv[0].T
    inside = (P[..., 0].abs() < w / 2 - 5) & (P[..., 1].abs() < h / 2 - 5)
    inside &= (X.abs() < w / 2 - 4) & (Y.abs() < h / 2 - 4)
    assert inside.sum() > 100
    assert (y[0, 0] - fn(P[..., 0], P[..., 1]))[inside].abs().max() < 5e-3


def test_up_and_down_matrices_match_convolution_references():
    f = augment._lanczos_halfband(3).double()
    taps, s = f.numel(), f.numel() // 2 - 1
    x = torch.randn(3, 9, dtype=torch.float64)
    # Upsampling: zero insertion + FIR is a stride-2 transposed convolution, shifted by L/2 - 1.
    ref = torch.nn.functional.conv_transpose1d(x[:, None], (2 * f).view(1, 1, -1), stride=2)
    torch.testing.assert_close(x @ augment._up_matrix(9, 0, f).T, ref[:, 0, s : s + 18])
    # Padding folded into the matrix equals mirror padding first.
    padded = torch.nn.functional.pad(x[:, None], (3, 3), mode="reflect")[:, 0]
    torch.testing.assert_close(
        x @ augment._up_matrix(9, 3, f).T, padded @ augment._up_matrix(15, 0, f).T
    )
    # Downsampling: a stride-2 convolution over 2n + L - 2 samples.
    z = torch.randn(3, 18 + taps - 2, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(z[:, None], f.view(1, 1, -1), stride=2)[:, 0]
    torch.testing.assert_close(z @ augment._down_matrix(9, f).T, ref)


def test_undrawn_samples_stay_exact():
    torch.manual_seed(1)
    x = images(n=200, h=8)
    y = only("scale", p=0.5)(x)
    unchanged = sum(torch.equal(a, b) for a, b in zip(y, x))
    assert abs(unchanged - 100) < 4 * math.sqrt(200 * 0.25)


def test_brightness_statistics():
    torch.manual_seed(2)
    x = images(n=400, h=4)
    y = only("brightness", p=0.5)(x)
    d = (y - x).flatten(1)
    changed = (d.abs().amax(1) > 0).sum().item()
    assert abs(changed - 200) < 4 * math.sqrt(400 * 0.25)  # binomial, 4 sigma
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6)  # a constant offset per sample


def test_lumaflip_one_channel_negates():
    x = images(n=32)
    y = only("lumaflip")(x)
    assert all(torch.equal(a, b) or torch.equal(a, -b) for a, b in zip(y, x))


def test_hue_and_saturation_keep_luma_of_rgb():
    x = images(n=8, c=3)
    y = only("hue", "saturation")(x)
    assert not torch.equal(y, x)
    torch.testing.assert_close(y.mean(1), x.mean(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("res", [16, 32])
def test_all_ops_shapes_and_gradients(c, res):
    torch.manual_seed(3)
    pipe = AugmentPipe()
    pipe.p.fill_(1.0)
    x = images(n=8, c=c, h=res).requires_grad_(True)
    y = pipe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_r1_double_backward_through_augmentation():
    torch.manual_seed(4)
    pipe = AugmentPipe()
    pipe.p.fill_(1.0)
    conv = torch.nn.Conv2d(1, 1, 3)
    x = images(n=4, h=16).requires_grad_(True)
    logits = conv(pipe(x)).sum()
    (g,) = torch.autograd.grad(logits, x, create_graph=True)
    g.square().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_preserved(dtype):
    pipe = AugmentPipe()
    pipe.p.fill_(0.5)
    x = images(n=8, c=3).to(dtype)
    y = pipe(x)
    assert y.dtype == dtype and y.device == x.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    pipe = AugmentPipe().cuda()
    pipe.p.fill_(1.0)
    x = images(n=8, c=3).cuda().requires_grad_(True)
    g = torch.Generator(device="cuda").manual_seed(0)
    y = pipe(x, generator=g)
    assert y.device == x.device and y.dtype == x.dtype
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_generator_makes_draws_reproducible():
    pipe = AugmentPipe()
    pipe.p.fill_(0.7)
    x = images(n=8, c=3)
    a = pipe(x, generator=torch.Generator().manual_seed(5))
    b = pipe(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_p_is_saved_with_the_module():
    pipe = AugmentPipe()
    pipe.p.fill_(0.3)
    state = pipe.state_dict()
    assert set(state) == {"p"}
    other = AugmentPipe()
    other.load_state_dict(state)
    assert float(other.p) == pytest.approx(0.3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="xflip"):
        AugmentPipe(xflip=-1)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        AugmentPipe()(torch.zeros(3, 8, 8))


def test_ada_adjust_follows_the_overfitting_heuristic():
    g = torch.Generator().manual_seed(0)
    batch, interval = 64, 4
    p = 0.0
    history = []
    for step in range(600):
        # D overfits for 300 adjustments (P(logit > 0) = 0.95: E[sign] = 0.9), then generalises.
        frac = 0.95 if step < 300 else 0.4
        logits = torch.randn(batch * interval, generator=g).abs()
        logits = torch.where(torch.rand(batch * interval, generator=g) < frac, logits, -logits)
        rt = logits.sign().mean().item()
        p = ada_adjust(p, rt, batch=batch, interval=interval, ada_kimg=100)
        history.append(p)
        assert 0.0 <= p <= 1.0
    assert history[299] == pytest.approx(300 * batch * interval / 100_000, rel=0.1)
    assert history[-1] == 0.0  # fell back and was clamped


def test_ada_adjust_exact_step():
    assert ada_adjust(0.5, 0.9, batch=32) == pytest.approx(0.5 + 32 * 4 / 500_000)
    assert ada_adjust(0.5, 0.1, batch=32) == pytest.approx(0.5 - 32 * 4 / 500_000)
    assert ada_adjust(0.5, 0.6, batch=32) == 0.5
    assert ada_adjust(0.0, 0.0, batch=32) == 0.0
    assert ada_adjust(1.0, 1.0, batch=32) == 1.0
