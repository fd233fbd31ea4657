"""CLEAR-DR dominant-class maps: the right class on a model built to answer it, binary meaning, drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfexplain.explain.attribution import DominantClass, get_method
from cfexplain.explain.dominant import (
    class_colours,
    class_shares,
    dominant_class_map,
    draw_dominant,
)
from cfexplain.nn.classifier import ResNetClassifier

SIZE = 16


def region_masks(size: int = SIZE) -> torch.Tensor:
    """Three regions ``[3, H, W]``: top-left quadrant, top-right quadrant, bottom-centre band;
    the remaining pixels (bottom corners) belong to no region."""
    m = torch.zeros(3, size, size)
    h = size // 2
    m[0, :h, :h] = 1
    m[1, :h, h:] = 1
    m[2, h:, size // 4 : 3 * size // 4] = 1
    return m


class Regions(nn.Module):
    """``x [N, 1, H, W] -> [N, K, H, W]``: channel k is ``(x + 2)`` inside region k, 0 elsewhere."""

    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 2) * self.masks[None]


class RegionSum(nn.Module):
    """Class k's logit is the sum of (shifted) pixels in region k; its features feed the sums."""

    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__()
        self.regions = Regions(masks)

    @property
    def cam_layer(self) -> nn.Module:
        return self.regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.regions(x).sum((2, 3))


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("base", ["gradcam", "saliency"])
def test_pixels_of_region_k_are_class_k(base):
    masks = region_masks()
    model = RegionSum(masks)
    x = images()
    method = get_method("dominant_class")(model, base=base)
    levels = method.attribute(x, 0)
    classes = method.classes(x)
    assert levels.shape == (3, 1, SIZE, SIZE) and classes.shape == (3, SIZE, SIZE)
    assert classes.dtype == torch.long
    for k in range(3):
        inside = masks[k].bool()
        assert (classes[:, inside] == k).all(), (base, k)
    # the level is the winning class's attribution
    per_class = method.class_maps(x)
    torch.testing.assert_close(levels[:, 0], per_class.max(1).values)
    if base == "gradcam":  # grad-CAM of class k here is exactly (x + 2) inside region k
        inside = masks.sum(0).bool()
        torch.testing.assert_close(levels[:, 0][:, inside], (x[:, 0] + 2)[:, inside])
    assert _hooks(model) == 0


def test_levels_and_classes_of_the_same_images_run_the_base_once_per_class():
    model = RegionSum(region_masks())
    method = DominantClass(model)
    calls = []
    attribute = method.base.attribute
    method.base.attribute = lambda x, k: calls.append(k) or attribute(x, k)
    x = images()
    method.attribute(x, 1)
    method.classes(x)
    assert calls == [0, 1, 2]
    method.classes(images(seed=1))  # other images: computed again
    assert calls == [0, 1, 2, 0, 1, 2]


def test_binary_model_dominant_class_is_the_sign_of_the_margin_attribution():
    torch.manual_seed(0)
    model = ResNetClassifier(1, 2, width=4, blocks=(1, 1), stem_stride=1)
    x = images(4)
    classes = get_method("dominant_class")(model).classes(x)
    assert set(classes.unique().tolist()) <= {0, 1}

    class Margin(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, x):
            z = self.model(x)
            return (z[:, 1] - z[:, 0])[:, None]

    margin = get_method("gradcam")(Margin(model)).attribute(x, 0)[:, 0]
    agree = (classes == (margin > 0).long()).float().mean()
    assert agree > 0.99, float(agree)
    assert 0 < classes.float().mean() < 1  # both classes occur: the comparison is not empty


def test_multiclass_resnet_gives_indices_in_range_and_no_hooks():
    torch.manual_seed(0)
    model = ResNetClassifier(1, 5, width=4, blocks=(1, 1), stem_stride=1)
    method = get_method("dominant_class")(model)
    classes = method.classes(images(2))
    assert classes.shape == (2, SIZE, SIZE) and 0 <= classes.min() and classes.max() < 5
    shares = class_shares(classes, 5)
    torch.testing.assert_close(shares.sum(1), torch.ones(2))
    assert _hooks(model) == 0
    with pytest.raises(ValueError, match="base must be another method"):
        DominantClass(model, base="dominant_class")


def test_dominant_class_map_argmax_and_ties():
    a = torch.tensor([[[[1.0, -2.0]], [[3.0, -2.0]], [[0.0, -5.0]]]])  # [1, 3, 1, 2]
    classes, levels = dominant_class_map(a)
    assert classes.tolist() == [[[1, 0]]] and levels.tolist() == [[[[3.0, -2.0]]]]


def test_draw_dominant_colours_by_class_and_brightness_by_level():
    names = ["KL0", "KL1", "<b>KL2</b>"]
    classes = torch.tensor([[0, 1, 2], [2, 1, 0]])
    levels = torch.tensor([[4.0, 2.0, 1.0], [-1.0, 4.0, 0.0]])
    rgb, legend = draw_dominant(classes, levels, names)
    colours = class_colours(3)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert [n for n, _ in legend] == names and legend[2][1] == tuple(colours[2])
    assert (rgb[0, 0] == colours[0]).all() and (rgb[1, 1] == colours[1]).all()  # top level: full
    np.testing.assert_allclose(rgb[0, 1], np.round(colours[1] * 0.5), atol=1)  # half the level
    assert (rgb[1, 0] == 0).all() and (rgb[1, 2] == 0).all()  # no positive evidence: black
    assert len({tuple(c) for c in colours}) == 3  # categorical: every class its own colour
    with pytest.raises(ValueError, match="class_names"):
        draw_dominant(classes, levels, names[:2])
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        draw_dominant(classes[None], levels, names)
