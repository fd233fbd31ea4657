"""Filters, feature maps and dead maps on small models with known structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfexplain.inspect.structure import (
    dead_maps,
    default_layers,
    feature_maps,
    filter_images,
    first_conv,
    map_images,
)
from cfexplain.nn.classifier import BinaryLogitAdapter, ResNetClassifier


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("channels", "shown"), [(1, 1), (3, 3), (2, 1)])
def test_filter_grid_is_one_image_per_filter_scaled_to_unit_peak(channels, shown):
    torch.manual_seed(0)
    model = ResNetClassifier(in_channels=channels, width=6, blocks=(1,))
    name, conv = first_conv(model)
    assert name == "stem.0" and conv is model.stem[0]
    f = filter_images(conv)
    assert f.shape == (6, shown, 3, 3)
    peaks = f.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(peaks, torch.ones(6))
    if channels == 2:  # neither gray nor RGB: the input channels are averaged
        w = conv.weight.detach().mean(1, keepdim=True)
        assert torch.allclose(f, w / w.abs().amax(dim=(1, 2, 3), keepdim=True))


def test_first_conv_needs_a_conv():
    with pytest.raises(ValueError, match="no Conv2d"):
        first_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_feature_maps_of_each_resnet_stage_and_no_hook_left():
    torch.manual_seed(0)
    model = ResNetClassifier(width=4, blocks=(1, 1, 1))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    layers = default_layers(model)
    assert layers == ["layers.0", "layers.1", "layers.2"]
    maps = feature_maps(model, x, layers)
    assert [tuple(maps[n].shape) for n in layers] == [(3, 4, 16, 16), (3, 8, 8, 8), (3, 16, 4, 4)]
    # the hooked output is the stage output: the last one is what features() returns
    with torch.no_grad():
        assert torch.allclose(maps["layers.2"], model.eval().features(x))
    assert _no_hooks(model)
    # a wrapper (binary single-logit adapter) prefixes the names
    wrapped = BinaryLogitAdapter(model)
    assert default_layers(wrapped) == ["model.layers.0", "model.layers.1", "model.layers.2"]


def test_feature_maps_reject_unknown_and_non_map_layers_without_leaking_hooks():
    model = ResNetClassifier(width=4, blocks=(1,))
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"no module named '<script>'"):
        feature_maps(model, x, ["<script>"])
    with pytest.raises(ValueError, match=r"'fc' gives \(1, 2\), expected feature maps"):
        feature_maps(model, x, ["layers.0", "fc"])
    assert _no_hooks(model)


def test_dead_maps_count_planted_dead_units():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight[[1, 4]] = 0.0
        conv.bias[[1, 4]] = 0.0
        conv.weight[5] = 0.0
        conv.bias[5] = -1.0  # negative constant: zero only after the ReLU
        conv.bias[[0, 2, 3]] = 0.5  # live units stay live on every input
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    x = torch.rand(8, 1, 12, 12) * 2 - 1
    maps = feature_maps(model, x, ["0", "1"])
    after_relu = dead_maps(maps["1"])
    assert after_relu.dead.nonzero().flatten().tolist() == [1, 4, 5]
    assert after_relu.count == 3 and after_relu.share == pytest.approx(0.5)
    assert after_relu.images == 8
    assert dead_maps(maps["0"]).dead.nonzero().flatten().tolist() == [1, 4]
    # a map zero on some images only is alive: dead means zero for every image of the batch
    some = torch.zeros(4, 2, 3, 3)
    some[2, 1, 0, 0] = 0.3
    assert dead_maps(some).dead.tolist() == [True, False]
    assert dead_maps(some, eps=0.5).dead.tolist() == [True, True]


def test_map_images_are_stretched_per_channel():
    m = torch.stack([torch.arange(16.0).view(4, 4), torch.full((4, 4), 3.0)])
    img = map_images(m)
    assert img.shape == (2, 1, 4, 4)
    assert img[0].min() == -1 and img[0].max() == 1
    assert (img[1] == -1).all()  # a constant map is drawn black
    assert map_images(torch.rand(70, 2, 2), limit=32).shape == (32, 1, 2, 2)
