"""StyleGAN2-ADA generator and discriminator: shapes, maths, published tensor names, gradients."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cfexplain.nn.stylegan2 import (
    Conv2dLayer,
    Discriminator,
    Generator,
    SynthesisLayer,
    conv2d_resample,
    downsample2d,
    filter2d,
    minibatch_std,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stylegan2_ada_param_names"
SMALL = dict(channel_base=256, channel_max=32)  # 16 channels at 16 px, 8 at 32 px


def small_g(res: int = 16, ch: int = 1, **kw) -> Generator:
    return Generator(z_dim=32, w_dim=32, img_resolution=res, img_channels=ch, **SMALL, **kw)


def small_d(res: int = 16, ch: int = 1, **kw) -> Discriminator:
    return Discriminator(img_resolution=res, img_channels=ch, **SMALL, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("ch", [1, 3])
@pytest.mark.parametrize("res", [16, 32])
def test_shapes(res, ch):
    G, D = small_g(res, ch), small_d(res, ch)
    assert G.num_ws == 2 * res.bit_length() - 4  # 2 * log2(res) - 2
    z = torch.randn(4, G.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (4, G.num_ws, G.w_dim)
    img = G.synthesis(ws)
    assert img.shape == (4, ch, res, res) and img.dtype == torch.float32
    assert torch.equal(G(z), img)
    assert D(img).shape == (4, 1)
    assert D(img[:3]).shape == (3, 1)  # minibatch std with a batch its group size does not divide


def test_bad_inputs_name_the_shape():
    G, D = small_g(16), small_d(16)
    with pytest.raises(ValueError, match="mapping input z"):
        G(torch.randn(2, 7))
    with pytest.raises(ValueError, match="synthesis input ws"):
        G.synthesis(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="discriminator input"):
        D(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="noise_mode"):
        G(torch.randn(2, 32), noise_mode="sometimes")
    with pytest.raises(ValueError, match="power of two"):
        Generator(img_resolution=48)
    with pytest.raises(ValueError, match="fused_modconv"):
        small_g(fused_modconv="fast")


# ------------------------------------------------------------------ published tensor names


def _fixture_cases():
    files = sorted(FIXTURES.glob("*.tsv"))
    assert len(files) == 12, f"expected 12 fixture lists in {FIXTURES} (tests/fixtures/)"
    return files


@pytest.mark.parametrize("path", _fixture_cases(), ids=lambda p: p.stem)
def test_state_dict_matches_published_names(path):
    m = re.fullmatch(r"([GD])_res(\d+)_ch(\d+)_cbase(\d+)_cmax(\d+)_map(\d+)_zw(\d+)", path.stem)
    kind, res, ch, cbase, cmax, nmap, zw = m.group(1), *map(int, m.groups()[1:])
    lines = path.read_text().splitlines()
    expected = []
    for line in lines:
        if line and not line.startswith("#"):
            name, shape, what = line.split("\t")
            expected.append((name, tuple(json.loads(shape)), what))
    if kind == "G":
        net = Generator(zw, zw, res, ch, mapping_layers=nmap, channel_base=cbase, channel_max=cmax)
        assert f"num_ws={net.num_ws}" in lines[0]
    else:
        net = Discriminator(res, ch, channel_base=cbase, channel_max=cmax)
    params = dict(net.named_parameters())
    got = [
        (n, tuple(t.shape), "param" if n in params else "buffer")
        for n, t in net.state_dict().items()
    ]
    assert got == expected  # same names, shapes, kinds and order
    assert f"; {sum(p.numel() for p in params.values())} parameters" in lines[0]


# ------------------------------------------------------------------------------- the maths


def test_demodulation_keeps_unit_variance():
    x = torch.randn(16, 64, 12, 12)
    weight = torch.randn(48, 64, 3, 3) * 3.0  # the scale of the kernel must not matter
    styles = torch.exp(torch.randn(16, 64) * 0.5)
    y = modulated_conv2d(x, weight, styles, padding=0)  # no padding: every output sees 3x3 inputs
    assert abs(y.std().item() - 1.0) < 0.1
    per_channel = y.transpose(0, 1).flatten(1).std(dim=1)
    assert ((per_channel - 1).abs() < 0.15).all()


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_grouped_and_unfused_modconv_agree(up, demodulate):
    N, c_in, c_out, k = 3, 16, 12, 3
    x = torch.randn(N, c_in, 8, 8)
    weight = torch.randn(c_out, c_in, k, k)
    styles = torch.randn(N, c_in) / (1.0 if demodulate else (c_in * k * k) ** 0.5)
    kw = dict(
        bias=torch.randn(c_out),
        noise=torch.randn(N, 1, 8 * up, 8 * up),
        gain=2**0.5,
        demodulate=demodulate,
        up=up,
        padding=1,
        resample_filter=setup_filter(),
    )
    a = modulated_conv2d(x, weight, styles, fused=False, **kw)
    b = modulated_conv2d(x, weight, styles, fused=True, **kw)
    assert a.shape == (N, c_out, 8 * up, 8 * up)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_modconv_equals_per_sample_convolution():
    """The definition, written out: one convolution per sample with its own modulated kernel."""
    N, c_in, c_out = 2, 6, 5
    x, weight, styles, f = (
        torch.randn(N, c_in, 6, 6),
        torch.randn(c_out, c_in, 3, 3),
        torch.randn(N, c_in),
        setup_filter(),
    )
    for up in (1, 2):
        out = modulated_conv2d(x, weight, styles, up=up, padding=1, resample_filter=f)
        for n in range(N):
            w = weight * styles[n].reshape(1, c_in, 1, 1)
            w = w / (w.square().sum([1, 2, 3], keepdim=True) + 1e-8).sqrt()
            if up == 1:
                ref = F.conv2d(x[n : n + 1], w, padding=1)
            else:  # published slow path: upsample with the FIR filter, then a true convolution
                ref = F.conv2d(
                    upfirdn2d(x[n : n + 1], f, up=2, padding=(3, 2, 3, 2), gain=4), w.flip([2, 3])
                )
            torch.testing.assert_close(out[n : n + 1], ref, atol=1e-5, rtol=1e-5)


def test_fast_resampling_matches_reference():
    taps = torch.tensor([1.0, 2, 4, 3])  # asymmetric: catches a flipped filter
    f = torch.outer(taps, taps)
    f = f / f.sum()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(
        upsample2d(x, f), upfirdn2d(x, f, up=2, padding=(2, 1, 2, 1), gain=4)
    )
    torch.testing.assert_close(downsample2d(x, f), upfirdn2d(x, f, down=2, padding=(1, 1, 1, 1)))
    torch.testing.assert_close(
        filter2d(x, f, padding=(2, 1, 0, 3)), upfirdn2d(x, f, padding=(2, 1, 0, 3))
    )
    w = torch.randn(4, 3, 3, 3)
    down = conv2d_resample(x, w, f, down=2, padding=1)
    ref = F.conv2d(upfirdn2d(x, f, padding=2), w)[:, :, ::2, ::2]  # filter, convolve, subsample
    torch.testing.assert_close(down, ref)


def test_grey_fromrgb_is_the_convolution_forward_and_backward():
    # A 1x1 convolution of one channel runs as a broadcast product; on a CPU channels-last.
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    w = torch.randn(5, 1, 1, 1, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    for bias in (b, None):
        y = conv2d_resample(x, w, bias=bias)
        ref = F.conv2d(x, w, bias)
        torch.testing.assert_close(y, ref)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(y, [x, w], g)
        want = torch.autograd.grad(ref, [x, w], g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_fir_keeps_constant_images_constant():
    f = setup_filter()
    assert f.shape == (4, 4) and abs(f.sum().item() - 1) < 1e-6
    x = torch.full((1, 2, 16, 16), 0.7)
    for y, size in [
        (upsample2d(x, f), 32),
        (downsample2d(x, f), 8),
        (filter2d(x, f, padding=1), 15),
    ]:
        assert y.shape[-1] == size
        torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.full_like(y[..., 2:-2, 2:-2], 0.7))


def test_minibatch_std_matches_direct_computation():
    x = torch.randn(8, 6, 4, 4)
    y = minibatch_std(x, group_size=4, num_channels=2)
    assert y.shape == (8, 8, 4, 4) and torch.equal(y[:, :6], x)
    for n in range(8):
        group = x[n % 2 :: 2]  # sample n is grouped with n ± N/G
        for c in range(2):
            std = group[:, 3 * c : 3 * c + 3].std(dim=0, unbiased=False).mean()
            torch.testing.assert_close(
                y[n, 6 + c], torch.full((4, 4), std.item()), atol=1e-5, rtol=1e-5
            )


def test_minibatch_std_parts_equal_separate_calls():
    """Reals and fakes in one pass: each half is grouped on its own, never with the other."""
    a, b = torch.randn(8, 6, 4, 4), torch.randn(8, 6, 4, 4) * 3 + 1
    y = minibatch_std(torch.cat([a, b]), group_size=4, num_channels=2, parts=2)
    separate = torch.cat([minibatch_std(a, 4, 2), minibatch_std(b, 4, 2)])
    torch.testing.assert_close(y, separate, rtol=0, atol=1e-6)
    mixed = minibatch_std(torch.cat([a, b]), group_size=4, num_channels=2)
    assert not torch.allclose(mixed, separate, atol=1e-3)  # one minibatch would mix them
    with pytest.raises(AssertionError, match="do not split into 3 minibatches"):
        minibatch_std(torch.cat([a, b]), parts=3)


def test_discriminator_scores_parts_as_separate_passes():
    torch.manual_seed(0)
    D = small_d()
    real, fake = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16) * 0.5
    x = torch.cat([real, fake]).requires_grad_(True)
    both = D(x, parts=2)
    real_sep, fake_sep = D(real), D(fake)
    torch.testing.assert_close(both, torch.cat([real_sep, fake_sep]), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(both[8:].sum(), x)
    assert g[:8].abs().max() == 0 and g[8:].abs().max() > 0  # the halves do not see each other


def test_layers_pass_gradcheck():
    """float64 gradcheck of the layers whose activations are modified in place."""
    torch.set_default_dtype(torch.float64)
    try:
        syn = SynthesisLayer(3, 2, w_dim=4, resolution=8, up=2)
        syn.noise_strength.data.fill_(0.3)
        x, w = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
        for mode in ("grouped", "unfused"):
            syn.fused_modconv = mode
            assert torch.autograd.gradcheck(lambda x, w: syn(x, w, "const"), (x, w))
        conv = Conv2dLayer(3, 2, 3, activation="lrelu", down=2, gain=0.5)
        assert torch.autograd.gradcheck(conv, (torch.randn(2, 3, 8, 8, requires_grad=True),))
        # Whole networks (the generator runs channels-last on CPU), tiny.
        G = Generator(
            z_dim=4, w_dim=4, img_resolution=8, img_channels=3, channel_base=32, channel_max=4
        )
        for m in G.modules():
            if isinstance(m, SynthesisLayer):
                m.noise_strength.data.fill_(0.3)
        ws = torch.randn(2, G.num_ws, 4, requires_grad=True)
        assert torch.autograd.gradcheck(lambda ws: G.synthesis(ws), (ws,))
        D = Discriminator(img_resolution=8, img_channels=3, channel_base=32, channel_max=4)
        img = torch.randn(2, 3, 8, 8, requires_grad=True)
        assert torch.autograd.gradcheck(D, (img,))
        # Second derivatives: path-length regularisation (G) and R1 (D) differentiate gradients.
        assert torch.autograd.gradgradcheck(lambda ws: G.synthesis(ws), (ws,))
        assert torch.autograd.gradgradcheck(D, (img,))
    finally:
        torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------- mapping and truncation


def test_w_avg_tracking():
    G = small_g(w_avg_beta=0.8)
    z = torch.randn(512, G.z_dim)
    G.mapping(z)
    assert torch.count_nonzero(G.mapping.w_avg) == 0  # not updated unless asked
    for _ in range(40):
        G.mapping(torch.randn(512, G.z_dim), update_w_avg=True)
    w_mean = G.mapping(torch.randn(4096, G.z_dim))[:, 0].mean(0)
    assert (G.mapping.w_avg - w_mean).norm() < 0.1 * w_mean.norm()
    # One update with the default beta: w_avg <- 0.995 w_avg + 0.005 mean(w).
    G2 = small_g()
    G2.load_state_dict(G.state_dict())
    before = G2.mapping.w_avg.clone()
    batch_mean = G2.mapping(z)[:, 0].mean(0)
    G2.mapping(z, update_w_avg=True)
    torch.testing.assert_close(G2.mapping.w_avg, 0.995 * before + 0.005 * batch_mean)


def test_truncation():
    G = small_g()
    G.mapping.w_avg.normal_()
    z = torch.randn(4, G.z_dim)
    assert torch.equal(G.mapping(z, psi=1.0), G.mapping(z))
    assert torch.equal(G(z, psi=1.0), G(z))
    img = G(z, psi=0.0)
    torch.testing.assert_close(img, img[:1].expand_as(img))  # every z gives the average image
    ws = G.mapping(z, psi=0.5, cutoff=2)
    full = G.mapping(z)
    torch.testing.assert_close(ws[:, :2], G.mapping.w_avg + 0.5 * (full[:, :2] - G.mapping.w_avg))
    assert torch.equal(ws[:, 2:], full[:, 2:])


# ------------------------------------------------------------------ gradients and noise


def test_gradients_reach_every_parameter():
    G, D = small_g(16, 3), small_d(16, 3)
    loss = F.softplus(-D(G(torch.randn(4, G.z_dim)))).mean()
    loss.backward()
    for net in (G, D):
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_noise_modes():
    G = small_g()
    for m in G.modules():
        if isinstance(m, SynthesisLayer):
            m.noise_strength.data.fill_(0.5)
    ws = G.mapping(torch.randn(2, G.z_dim))
    assert torch.equal(G.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const"))
    assert not torch.allclose(
        G.synthesis(ws, noise_mode="random"), G.synthesis(ws, noise_mode="random")
    )
    assert not torch.allclose(
        G.synthesis(ws, noise_mode="none"), G.synthesis(ws, noise_mode="const")
    )


def test_fused_modes_give_the_same_generator():
    G = small_g(16, 3)
    Gg = small_g(16, 3, fused_modconv="grouped")
    Gg.load_state_dict(G.state_dict())
    z = torch.randn(3, G.z_dim)
    torch.testing.assert_close(G(z), Gg(z), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    G, D = small_g(16, 3), small_d(16, 3)
    z = torch.randn(4, G.z_dim)
    ref_img, ref_logits = G(z), D(G(z))
    G, D, z = G.cuda(), D.cuda(), z.cuda()
    with torch.no_grad():  # "auto" picks the grouped convolution here
        img = G(z)
    torch.testing.assert_close(img.cpu(), ref_img, atol=1e-4, rtol=1e-4)
    logits = D(G(z))
    torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters())
