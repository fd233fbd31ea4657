"""The unit report finds the unit planted to drive a class; its CSV keeps an expert's names."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from cfexplain.inspect import units as U
from cfexplain.nn.classifier import BinaryLogitAdapter, ResNetClassifier

K = 3  # the planted unit


class Planted(nn.Module):
    """``[N, 1, 16, 16] -> [N, 2]``: 6 units after a ReLU, GAP, linear. Unit K (a bright-pixel
    detector) alone feeds logit 1; the other units, which fire more, feed only logit 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)
        with torch.no_grad():
            self.body[0].weight.abs_()  # every unit positive on bright inputs
            self.body[0].bias.fill_(0.2)
            self.body[0].weight[K] = 0.0
            self.body[0].weight[K, 0, 1, 1] = 1.0  # unit K: the centre pixel, nothing else
            self.body[0].bias[K] = -0.5  # fires only where a pixel is brighter than 0.5
            self.fc.weight.fill_(0.0)
            self.fc.weight[0] = 3.0
            self.fc.weight[0, K] = 0.0
            self.fc.weight[1, K] = 4.0
            self.fc.bias.fill_(0.0)

    @property
    def cam_layer(self) -> nn.Module:
        return self.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


def _images() -> torch.Tensor:
    """Dim images (below the planted unit's threshold); a bright 3x3 spot at rows/cols 10..12 in images 1, 4 and 6."""
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.1 * torch.rand(8, 1, 16, 16, generator=g)
    for i in (1, 4, 6):
        x[i, 0, 10:13, 10:13] = 1.0
    return x


def test_the_planted_unit_ranks_first_for_its_class_and_its_patches_show_the_spot():
    model = Planted().eval()
    x = _images()
    layer = U.unit_layer(model)
    assert layer == "body"
    acts = U.activations(model, x, layer, batch=3)
    assert acts.shape == (8, 6, 16, 16)
    weight = U.head_weight(model, acts.shape[1])
    positive = torch.zeros(8, dtype=torch.bool)
    positive[[1, 4, 6]] = True
    contrib = U.unit_contributions(acts, weight, 1, positive)
    assert U.rank(contrib, 1) == [K]
    # the other units dominate the other class, where the planted one gives nothing
    c0 = U.unit_contributions(acts, weight, 0, ~positive)
    assert K not in U.rank(c0, 5) and c0[K] == 0
    # contribution = weight x mean activation over the positives, by hand
    by_hand = 4.0 * acts[positive][:, K].mean()
    assert contrib[K] == pytest.approx(float(by_hand))
    patches = U.top_patches(acts, x, K, k=3, size=6)
    assert sorted(p.index for p in patches) == [1, 4, 6]
    for p in patches:
        assert p.image.shape == (1, 6, 6)
        assert p.image.max() == 1.0  # the crop holds the bright spot
        assert 0 <= p.y <= 10 and 0 <= p.x <= 10


def test_unit_layer_and_head_of_our_resnet_and_a_plain_conv_net():
    model = BinaryLogitAdapter(ResNetClassifier(width=4, blocks=(1, 1)))
    assert U.unit_layer(model) == "model.layers.1"
    assert U.head_weight(model, 8).shape == (2, 8)
    with pytest.raises(ValueError, match="GAP \\+ linear head over the 5 units"):
        U.head_weight(model, 5)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3))
    assert U.unit_layer(plain) == "2"


def test_top_patches_crop_around_the_maximum_inside_the_image():
    acts = torch.zeros(4, 2, 4, 4)
    acts[2, 1, 1, 3] = 5.0
    acts[0, 1, 3, 0] = 2.0
    images = torch.arange(4 * 16 * 16, dtype=torch.float32).view(4, 1, 16, 16)
    p = U.top_patches(acts, images, 1, k=2, size=8)
    assert [q.index for q in p] == [2, 0] and [q.value for q in p] == [5.0, 2.0]
    # cell (1, 3) of a 4x4 map centres at pixel (6, 14): the 8-px window is shifted inside
    assert (p[0].y, p[0].x) == (2, 8)
    assert torch.equal(p[0].image, images[2, :, 2:10, 8:16])
    assert (p[1].y, p[1].x) == (8, 0)
    assert U.patch_size(64, 4) == 32 and U.patch_size(32, 32) == 4 and U.patch_size(8, 1) == 8


def test_units_csv_keeps_expert_names_and_appends_new_units(tmp_path):
    path = tmp_path / "inspect" / "units.csv"
    rows = U.update_units_csv(path, {3: 0.5, 1: 0.25})
    assert [r["unit"] for r in rows] == ["3", "1"]
    with open(path, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == list(U.UNITS_COLUMNS)
    assert U.unit_names(rows) == {}
    # the expert names unit 3 (with a comma and quotes) and adds a column of their own
    edited = [
        ["unit", "contribution", "name", "description", "reviewer"],
        ["3", "0.5", 'joint "space"', "narrowing, medial", "A.B."],
        ["1", "0.25", "", "", ""],
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(edited)
    before = path.read_text(encoding="utf-8")
    rows = U.update_units_csv(path, {3: 9.0, 7: 0.125})  # rerun: 3 known, 7 new
    after = path.read_text(encoding="utf-8")
    assert after.startswith(before)  # the edited rows are untouched, byte for byte
    assert [r["unit"] for r in rows] == ["3", "1", "7"]
    assert U.unit_names(rows) == {3: ('joint "space"', "narrowing, medial")}
    assert U.read_units_csv(path)[0]["contribution"] == "0.5"  # not overwritten
    assert U.read_units_csv(path)[2] == {
        "unit": "7",
        "contribution": "0.125",
        "name": "",
        "description": "",
        "reviewer": "",
    }
    # nothing new: the file is not rewritten
    mtime = path.stat().st_mtime_ns
    U.update_units_csv(path, {1: 0.0})
    assert path.stat().st_mtime_ns == mtime and path.read_text(encoding="utf-8") == after


def test_units_csv_without_a_unit_column_is_named_in_the_error(tmp_path):
    path = tmp_path / "units.csv"
    path.write_text("neuron,label\n3,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"units\.csv: expected a CSV with columns"):
        U.update_units_csv(path, {3: 1.0})
