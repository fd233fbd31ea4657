"""StyleSpace attributes: the style rendering identity, AttFind on a planted G and classifier,
the greedy skipping of already flipped images, and the files."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from torch import nn

from cfexplain.explain.attributes import (
    ATTRIBUTES_FILE,
    TABLE_FILE,
    AttributeSet,
    Effects,
    att_find,
    render,
    screen_coordinates,
    shift_effects,
    style_layout,
    style_std,
    to_styles,
)
from cfexplain.nn.stylegan2 import Generator

G_KW = dict(z_dim=16, w_dim=16, img_resolution=32, img_channels=1, channel_base=128, channel_max=16)


def generator(seed: int = 0, **kw) -> Generator:
    torch.manual_seed(seed)
    G = Generator(**(G_KW | kw)).eval()
    with torch.no_grad():  # trained-looking: non-zero noise strengths and biases
        for name, p in G.named_parameters():
            if name.endswith(("noise_strength", ".bias")) and "mapping" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return G


@pytest.mark.parametrize("channels", [1, 3])
def test_stylespace_rendering_equals_synthesis(channels):
    G = generator(img_channels=channels)
    layout = style_layout(G)
    # every modulated layer and ToRGB: b4 conv1+torgb, then conv0, conv1, torgb per block
    assert layout.layers[:3] == ("b4.conv1", "b4.torgb", "b8.conv0")
    assert len(layout.layers) == 3 * 4 - 1 and layout.size == sum(layout.channels)
    with torch.no_grad():
        w = G.mapping(torch.randn(5, 16))
        w = w + 0.5 * torch.randn_like(w)  # W+: a different w per layer
        s = to_styles(G, w)
        assert s.shape == (5, layout.size)
        for mode in ("const", "none"):
            assert torch.allclose(render(G, s, mode), G.synthesis(w, noise_mode=mode), atol=1e-5)
        # each coordinate is one layer's affine output: moving it changes only that layer
        name, ch = layout.locate(layout.offsets[4] + 2)
        assert (name, ch) == (layout.layers[4], 2)
        moved = s.clone()
        moved[:, layout.offsets[4] + 2] += 1.0
        assert not torch.allclose(render(G, moved), render(G, s), atol=1e-4)


class Brightness(nn.Module):
    """A planted classifier: the log-odds of class 1 is the image's mean brightness, centred."""

    def __init__(self, centre: float, gain: float = 20.0) -> None:
        super().__init__()
        self.centre, self.gain = centre, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.gain * (x.mean(dim=(1, 2, 3)) - self.centre)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def test_att_find_finds_the_planted_coordinate_first():
    G = generator(1)
    layout = style_layout(G)
    # Plant: channel 3 of the last ToRGB reaches the image 30 times as strongly as before, so
    # its style coordinate drives the brightness that the classifier reads.
    last = G.synthesis.blocks()[-1].torgb
    with torch.no_grad():
        last.weight[:, 3] *= 30.0
    planted = layout.offsets[-1] + 3
    with torch.no_grad():
        w = G.mapping(torch.randn(12, 16, generator=torch.Generator().manual_seed(2)))
        s = to_styles(G, w)
        centre = float(render(G, s).mean())
    f = Brightness(centre)
    std = style_std(G, n=400)
    assert std.shape == (layout.size,) and (std > 0).all()
    effects = shift_effects(G, f, s, std, shift=2.0, batch=50, progress=False)
    assert effects.shifted.shape == (12, layout.size, 2, 2)
    found = att_find(effects, layout, k=3)
    for c in (0, 1):
        first = [a for a in found if a.cls == c][0]
        assert first.coordinate == planted and (first.layer, first.channel) == (
            layout.layers[-1],
            3,
        )
        assert first.effect > 0 and first.flip_share > 0.5
    up = [a for a in found if a.cls == 1][0].sign
    assert [a for a in found if a.cls == 0][0].sign == -up  # the other class: the other way
    # the exact shift reproduces the scored change
    a = found[0]
    moved = s.clone()
    moved[:, a.coordinate] += a.sign * 2.0 * std[a.coordinate]
    with torch.no_grad():
        lo = f(render(G, moved))[:, 1] - f(render(G, s))[:, 1]
    expected = effects.delta(a.cls)[:, a.coordinate, int(a.sign > 0)]
    sign = 1 if a.cls == 1 else -1
    assert torch.allclose(sign * lo, expected, atol=1e-4)


def test_att_find_skips_images_already_flipped():
    # 10 images of class 0, 3 coordinates. A flips images 0-5 strongly, B flips the same images
    # a little less strongly, C flips images 6-9. Greedy: A, then C (B explains nothing new).
    n, m = 10, 3
    shifted = torch.zeros(n, m, 2, 2)
    base = torch.zeros(n, 2)
    base[:, 0] = 1.0  # class 0 predicted
    base[:, 1] = -1.0
    shifted[..., 0] = 1.0
    shifted[..., 1] = -1.0
    shifted[:6, 0, 1, 1] = 5.0  # A+
    shifted[:6, 1, 1, 1] = 4.5  # B+
    shifted[6:, 2, 1, 1] = 3.0  # C+
    for k in range(2):  # class 0's log-odds mirror class 1's
        shifted[..., k, 0] = -shifted[..., k, 1]
    effects = Effects(base, shifted, torch.arange(m), 1.0)
    layout = style_layout(generator())
    found = att_find(effects, layout, k=3, classes=[1])
    assert [a.coordinate for a in found] == [0, 2, 1]
    assert [a.flip_share for a in found] == pytest.approx([0.6, 0.4, 0.6])
    assert found[1].flip_share_remaining == pytest.approx(1.0)
    assert all(a.sign == 1 for a in found)


def test_attribute_set_round_trips_with_its_table(tmp_path):
    G = generator()
    layout = style_layout(G)
    std = torch.rand(layout.size) + 0.1
    effects = Effects(
        torch.zeros(4, 2), torch.randn(4, layout.size, 2, 2), torch.arange(layout.size), 3.0
    )
    found = att_find(effects, layout, k=2)
    saved = AttributeSet(found, std, 3.0, layout, {"images": 4})
    saved.save(tmp_path)
    back = AttributeSet.load(tmp_path / ATTRIBUTES_FILE)
    assert back.attributes == found and back.layout == layout and back.shift == 3.0
    assert torch.equal(back.std, std) and back.info == {"images": 4}
    rows = list(csv.DictReader(io.StringIO((tmp_path / TABLE_FILE).read_text())))
    assert [(r["layer"], int(r["channel"])) for r in rows] == [(a.layer, a.channel) for a in found]
    assert back.step(found[0]) == pytest.approx(
        found[0].sign * 3.0 * float(std[found[0].coordinate])
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        AttributeSet.load(tmp_path / "nope.safetensors")


def test_screening_keeps_the_planted_coordinate_and_the_exact_ranking():
    G = generator(1)
    layout = style_layout(G)
    with torch.no_grad():
        G.synthesis.blocks()[-1].torgb.weight[:, 3] *= 30.0
        s = to_styles(G, G.mapping(torch.randn(12, 16, generator=torch.Generator().manual_seed(2))))
        f = Brightness(float(render(G, s).mean()))
    std = style_std(G, n=400)
    kept = screen_coordinates(G, f, s, std, keep=6, batch=5)
    assert len(kept) == 6 and layout.offsets[-1] + 3 in kept.tolist()
    full = att_find(shift_effects(G, f, s, std, 2.0, progress=False), layout, k=1)
    screened = att_find(shift_effects(G, f, s, std, 2.0, kept, progress=False), layout, k=1)
    assert [(a.coordinate, a.sign) for a in screened] == [(a.coordinate, a.sign) for a in full]
    assert [a.effect for a in screened] == pytest.approx([a.effect for a in full])
