"""The attribute × factor table: dominant factor, specificity and marker toggles on a planted G
read by an oracle whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cfexplain.data.phantoms import KneePhantom
from cfexplain.evaluate.factors import (
    CORNERS,
    attribute_factors,
    calibration_rows,
    dominant_factor,
    factor_coordinates,
    marker_by_corner,
    marker_corners,
)
from cfexplain.explain.attributes import Attribute, render, style_layout, to_styles
from tests.explain.test_attributes import generator


class BrightnessOracle(nn.Module):
    """Reads ``osteophyte`` as 0 always, ``exposure`` as the mean brightness, ``marker`` as
    whether the mean brightness is above ``centre``."""

    factors = ["osteophyte", "exposure", "marker"]

    def __init__(self, centre: float) -> None:
        super().__init__()
        self.centre = centre
        self.dummy = nn.Parameter(torch.zeros(()))  # read_factors asks for a device
        # exposure changes are counted in units of 0.01 brightness: it dominates the marker's
        self.change_scale = torch.tensor([1.0, 0.01, 1.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), m, (m > self.centre).float()], dim=1)


def test_dominant_factor_and_specificity():
    assert dominant_factor({"a": 0.1, "b": -0.3, "c": 0.1}) == ("b", pytest.approx(0.6))
    name, spec = dominant_factor({"a": 0.0, "b": 0.0})
    assert math.isnan(spec)
    rows = calibration_rows(
        {"sclerosis": {"kind": "disease", "changes": {"sclerosis": 0.9, "rotation": 0.1}}}
    )
    assert rows[0]["attribute"] == "true edit: sclerosis" and rows[0]["dominant"] == "sclerosis"
    assert rows[0]["specificity"] == pytest.approx(0.9)


def test_planted_attribute_is_specific_to_its_factor_and_toggles_the_marker():
    G = generator(1)
    layout = style_layout(G)
    last = G.synthesis.blocks()[-1].torgb
    with torch.no_grad():
        last.weight[:, 3] *= 30.0  # coordinate `planted` drives the brightness
        w = G.mapping(torch.randn(10, 16, generator=torch.Generator().manual_seed(2)))
        s = to_styles(G, w)
        centre = float(render(G, s).mean(dim=(1, 2, 3)).median())
    planted = layout.offsets[-1] + 3
    name, ch = layout.locate(planted)
    strong = Attribute(1, 0, planted, name, ch, 1, 1.0, 1.0, 1.0)
    weak = Attribute(1, 1, 0, *layout.locate(0), 1, 0.1, 0.0, 0.0)
    has_marker = torch.zeros(10, dtype=torch.bool)
    has_marker[:4] = True
    oracle = BrightnessOracle(centre)
    rows = attribute_factors(oracle, G, s, [strong, weak], [20.0, 1e-4], has_marker, batch_size=4)
    assert [r["rank"] for r in rows] == [0, 1]
    r = rows[0]
    assert r["dominant"] == "exposure" and r["abs_change"]["osteophyte"] == 0.0
    # the share of the |changes| on exposure, exactly: the marker's part is the rest
    exp, mk = r["abs_change"]["exposure"], r["abs_change"]["marker"]
    assert r["specificity"] == pytest.approx(exp / (exp + mk))
    signed = r["change"]
    assert r["dominant_mean"] == "exposure" and r["specificity_mean"] == pytest.approx(
        abs(signed["exposure"]) / (abs(signed["exposure"]) + abs(signed["marker"]))
    )
    with torch.no_grad():
        moved = s.clone()
        moved[:, planted] += 20.0
        delta = (render(G, moved) - render(G, s)).mean(dim=(1, 2, 3)) / 0.01
    assert r["change"]["exposure"] == pytest.approx(float(delta.mean()), rel=1e-4)
    assert r["marker_toggled"] == 1.0 and r["marker_toggled_all"] == 1.0
    assert rows[1]["marker_toggled"] == 0.0
    assert "marker_toggled_by_corner" not in r  # no corners given


def test_marker_corners_are_the_phantoms():
    ds = KneePhantom(40, resolution=32, split="test", shortcut_rate=0.9)
    samples = [ds[i] for i in range(len(ds))]
    masks = torch.stack([s["meta"]["masks"]["marker"].bool() for s in samples])
    expected = torch.tensor(
        [s["meta"]["anatomy"]["marker_corner"] if s["meta"]["factors"]["marker"] >= 0.5 else -1
         for s in samples]
    )  # fmt: skip
    assert (expected >= 0).sum() >= 10 and len(set((expected[expected >= 0]).tolist())) == 4
    assert torch.equal(marker_corners(masks), expected)


def test_each_corner_gets_the_attribute_that_toggles_its_marker():
    """The brightness oracle's marker toggles in every image; with the images given corners,
    the planted attribute toggles every corner's, the weak one none, and the summary weights
    the corners by their images."""
    G = generator(1)
    layout = style_layout(G)
    with torch.no_grad():
        G.synthesis.blocks()[-1].torgb.weight[:, 3] *= 30.0
        s = to_styles(G, G.mapping(torch.randn(10, 16, generator=torch.Generator().manual_seed(2))))
        centre = float(render(G, s).mean(dim=(1, 2, 3)).median())
    planted = layout.offsets[-1] + 3
    strong = Attribute(0, 2, planted, *layout.locate(planted), 1, 1.0, 1.0, 1.0)
    weak = Attribute(1, 0, 0, *layout.locate(0), 1, 0.1, 0.0, 0.0)
    corner = torch.tensor([0, 0, 0, 1, 3, -1, -1, -1, -1, -1])
    rows = attribute_factors(BrightnessOracle(centre), G, s, [weak, strong], [1e-4, 20.0],
                             corner >= 0, 4, corner=corner)  # fmt: skip
    assert rows[1]["marker_toggled_by_corner"] == [1.0, 1.0, None, 1.0]
    assert rows[0]["marker_toggled_by_corner"] == [0.0, 0.0, None, 0.0]
    summary = marker_by_corner(rows, corner)
    assert [c["corner"] for c in summary["corners"]] == list(CORNERS)
    assert [c["images"] for c in summary["corners"]] == [3, 1, 0, 1]
    top_left = summary["corners"][0]
    assert (top_left["attribute"], top_left["class"], top_left["rank"]) == (strong.label(), 0, 2)
    assert summary["corners"][2]["attribute"] is None and summary["toggled"] == 1.0
    # Corner by corner: a row that toggles only the bottom-left marker takes that corner alone.
    only = dict(rows[0], attribute="only", marker_toggled_by_corner=[0.0, 0.0, None, 1.0])
    half = dict(rows[1], marker_toggled_by_corner=[0.5, 0.0, None, 0.0])
    summary = marker_by_corner([half, only], corner)
    assert [c["attribute"] for c in summary["corners"]] == [half["attribute"], None, None, "only"]
    assert summary["toggled"] == pytest.approx((3 * 0.5 + 1 * 0.0 + 1 * 1.0) / 5)
    # Where no attribute toggles a corner's marker, none is named for it.
    assert summary["corners"][1]["toggled"] == 0.0
    summary = marker_by_corner([rows[0]], corner)
    assert [c["attribute"] for c in summary["corners"]] == [None] * 4
    assert summary["toggled"] == 0.0 and summary["corners"][0]["toggled"] == 0.0


def test_the_scan_finds_the_planted_coordinate_for_exposure_and_marker():
    G = generator(1)
    layout = style_layout(G)
    with torch.no_grad():
        G.synthesis.blocks()[-1].torgb.weight[:, 3] *= 30.0
        z = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
        every = to_styles(G, G.mapping(z))
        s = every[:6]
        centre = float(render(G, s).mean(dim=(1, 2, 3)).median())
    planted = layout.offsets[-1] + 3
    step = 3.0 * every.std(0)  # AttFind's d = 3 std of each coordinate
    has_marker = torch.tensor([True, True, True, False, False, False])
    rows = factor_coordinates(BrightnessOracle(centre), G, s, step, layout, has_marker, 16)
    best = {r["factor"]: r for r in rows}
    assert list(best) == ["osteophyte", "exposure", "marker"]
    for factor in ("exposure", "marker"):
        assert best[factor]["coordinate"] == planted
        assert (best[factor]["layer"], best[factor]["channel"]) == layout.locate(planted)
    assert best["marker"]["marker_toggled"] == 1.0
    assert best["osteophyte"]["change"] == 0.0  # the oracle never reads it
    # The exposure's change, exactly: the mean |brightness change| (in 0.01) of the better sign.
    with torch.no_grad():
        moved = [s.clone(), s.clone()]
        moved[0][:, planted] += step[planted]
        moved[1][:, planted] -= step[planted]
        changes = [float(((render(G, m) - render(G, s)).mean(dim=(1, 2, 3)) / 0.01).abs().mean())
                   for m in moved]  # fmt: skip
    r = best["exposure"]
    assert r["change"] == pytest.approx(max(changes), rel=1e-4)
    assert r["sign"] == (1 if changes[0] >= changes[1] else -1)
    assert 0.5 < r["specificity"] <= 1.0
    # A weak coordinate that moves brightness but never the marker is purer than the planted one.
    top = r["most_specific"]
    assert top["change"] >= 0.5 and top["specificity"] > r["specificity"]
    assert best["osteophyte"]["most_specific"] is None  # nothing moves it by 0.5
    # A threshold only the planted coordinate reaches leaves it; one none reaches, nothing.
    oracle = BrightnessOracle(centre)
    rows = factor_coordinates(oracle, G, s, step, layout, has_marker, 16, 0.9 * r["change"])
    assert rows[1]["most_specific"]["coordinate"] == planted
    rows = factor_coordinates(oracle, G, s, step, layout, has_marker, 16, 1e9)
    assert all(r["most_specific"] is None for r in rows)
