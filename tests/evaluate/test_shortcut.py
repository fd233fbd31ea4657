"""The shortcut scenario: a classifier trained where the marker follows the label uses it."""

from __future__ import annotations

import pytest
import torch

from cfexplain.data import build_dataset
from cfexplain.evaluate.shortcut import (
    any_place_exposure,
    heatmap_exposure,
    marker_effect,
    marker_reliance,
)
from cfexplain.nn.classifier import load_classifier
from cfexplain.train import run_chain
from tests.conftest import compose_config
from tests.explain.test_cf_metrics import ReadsRegion

SIZE = [
    "data.resolution=32",
    "data.n_train=480",
    "classifier.epochs=8",
    "classifier.model.width=16",
]


def _reliance(tmp_path, rate: float) -> dict:
    cfg = compose_config(
        "+dataset=knee",
        "preset=smoke",
        "logger=none",
        f"runs_dir={tmp_path}",
        "device=cpu",
        "stages=[classifier]",
        f"data.shortcut_rate={rate}",
        *SIZE,
    )
    run_chain(cfg)
    model = load_classifier(tmp_path / "knee" / "classifier")
    return marker_reliance(model, build_dataset(cfg.data, "test"), list(range(48)))


def test_shortcut_classifier_loses_accuracy_without_the_marker(tmp_path):
    shortcut = _reliance(tmp_path / "shortcut", 1.0)
    honest = _reliance(tmp_path / "honest", 0.0)
    assert shortcut["drop_marker_removed"] >= 0.15, shortcut
    # Trained the same way on data where the marker is a coin flip, it does not care.
    assert abs(honest["drop_marker_removed"]) <= 0.06, honest
    assert shortcut["accuracy_marker_against_label"] < shortcut["accuracy"]
    # What the marker decides with the knee as drawn: many images for one, few for the other.
    assert shortcut["marker_removed_moves"] >= honest["marker_removed_moves"] + 0.3, (
        shortcut,
        honest,
    )


def test_marker_reliance_refuses_data_without_a_marker():
    from cfexplain.data.phantoms import HistologyPhantom

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="knee phantom"):
        marker_reliance(model, HistologyPhantom(4, resolution=16), [0, 1])


def test_heatmap_exposure_against_the_area_share():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :2, :2] = masks[1, :2, :2] = True  # image 2 has no marker
    maps = torch.ones(3, 1, 8, 8)
    maps[0, 0, :2, :2] = 5.0  # relevance concentrated on the marker
    out = heatmap_exposure(maps, masks)
    assert out[0] == 1.0 and out[1] == 0.0 and out[2].isnan()  # uniform map: exactly the share


def test_any_place_exposure_judges_each_place_on_its_own_area():
    places = torch.zeros(4, 8, 8, dtype=torch.bool)
    places[0, :2, :2] = places[1, :2, 6:] = places[2, 6:, :2] = places[3, 6:, 6:] = True
    maps = torch.ones(3, 1, 8, 8)
    maps[:, :, places.any(0)] = 0.5  # the plates lighter than the rest...
    maps[0, 0, 6:, 6:] = 2.0  # ...but one (not the input's): 8/62 of the mass on 4/64 px
    has_marker = torch.tensor([True, True, False])
    out = any_place_exposure(maps, places, has_marker)
    assert out[0] == 1.0 and out[1] == 0.0 and out[2].isnan()
    # Against the plates' union the same map falls short: one plate cannot outweigh four.
    union = places.any(0).expand(3, -1, -1) & has_marker[:, None, None]
    assert heatmap_exposure(maps, union)[0] == 0.0


def test_marker_effect_is_the_whole_move_when_f_reads_the_marker_and_zero_when_it_does_not():
    g = torch.Generator().manual_seed(0)
    before, after = (torch.rand(2, 4, 1, 16, 16, generator=g) - 0.5) / 4  # logits stay unsaturated
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, :3, :3] = True  # the marker's corner
    corner = torch.zeros(16, 16, dtype=torch.bool)
    corner[:3, :3] = True
    centre = torch.zeros(16, 16, dtype=torch.bool)
    centre[6:10, 6:10] = True  # beyond the mask grown by 2 px

    def move(model):
        return torch.softmax(model(after), 1)[:, 1] - torch.softmax(model(before), 1)[:, 1]

    reads_marker, ignores = ReadsRegion(corner), ReadsRegion(centre)
    assert torch.allclose(marker_effect(reads_marker, before, after, masks, 1), move(reads_marker))
    assert move(ignores).abs().min() > 0.01  # the frame does move f, through the rest
    assert torch.equal(marker_effect(ignores, before, after, masks, 1), torch.zeros(4))
    # Reading both: the two players' values add up to the whole move (Shapley efficiency), and
    # the marker's is the mean of its two marginal contributions.
    both = ReadsRegion(corner | centre)
    value = marker_effect(both, before, after, masks, 0)
    p = lambda x: torch.softmax(both(x), 1)[:, 0]  # noqa: E731
    inside = torch.nn.functional.max_pool2d(masks.float()[:, None], 5, 1, 2) > 0
    alone = p(torch.where(inside, after, before)) - p(before)
    last = p(after) - p(torch.where(inside, before, after))
    assert torch.allclose(value, (alone + last) / 2)
