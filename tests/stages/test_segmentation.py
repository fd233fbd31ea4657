"""Segmentation stage: smoke run and loading, masks read by name, Dice metrics, kill then resume."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from cfexplain.data import build_dataset, collate
from cfexplain.data.phantoms.knee import MASK_NAMES
from cfexplain.nn.segmentation import UNet, load_segmentation, segmentation_loss
from cfexplain.stages import segmentation as stage
from cfexplain.train import run_chain
from tests.conftest import killed_and_resumed

SMOKE = ("stages=[segmentation]",)


def test_smoke_run_writes_the_artifact_and_the_model_loads(smoke_cfg):
    cfg = smoke_cfg(*SMOKE)
    art = run_chain(cfg)["segmentation"]
    classes = art.info["classes"]
    assert art.dir.name == "segmentation" and sorted(classes) == sorted(MASK_NAMES)
    for name in classes:
        assert 0.0 <= art.metrics[f"test/dice/{name}"] <= 1.0
    assert art.metrics["steps"] == 6 and art.path("examples").is_file()
    model = load_segmentation(art.dir)
    assert isinstance(model, UNet) and not model.training
    test_ds = build_dataset(cfg.data, "test")
    x = collate([test_ds[i] for i in range(3)])[0]
    assert model(x).shape == (3, len(MASK_NAMES), 32, 32)
    # The saved metrics are what the loaded model computes.
    again = stage.evaluate(model, test_ds, classes, 16, torch.device("cpu"))
    for name in classes:
        assert again[f"dice/{name}"] == pytest.approx(art.metrics[f"test/dice/{name}"], nan_ok=True)


def test_masks_are_read_by_name_for_both_phantoms(smoke_cfg):
    knee = build_dataset(smoke_cfg().data, "test")
    # The dataset's own order (the channel order of the model), every knee mask.
    assert stage.mask_names(knee) == list(knee[0]["meta"]["masks"])
    assert sorted(stage.mask_names(knee)) == sorted(MASK_NAMES)
    assert stage.mask_names(knee, ["sclerosis", "osteophyte"]) == ["sclerosis", "osteophyte"]
    with pytest.raises(ValueError, match=r"segmentation.classes=\['tumour'\]"):
        stage.mask_names(knee, ["tumour"])
    metas = [knee[i]["meta"] for i in range(4)]
    m = stage.stack_masks(metas, ["joint_space", "absent"], (32, 32))
    assert m.shape == (4, 2, 32, 32) and m.dtype == torch.bool
    assert torch.equal(m[1, 0], metas[1]["masks"]["joint_space"]) and not m[:, 1].any()
    histo = build_dataset(smoke_cfg(dataset="histology").data, "test")
    assert stage.mask_names(histo) == ["tumour"]


def test_missing_config_and_loss_on_known_logits(smoke_cfg):
    cfg = smoke_cfg("stages=[segmentation]")
    with open_dict(cfg):
        del cfg["segmentation"]  # e.g. a config of one's own without the group
    with pytest.raises(ValueError, match=r"segmentation=unet"):
        run_chain(cfg)
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:5, 2:5] = 1
    right, wrong = 12 * (2 * target - 1), -12 * (2 * target - 1)
    assert segmentation_loss(right, target) < 0.01 < 1.5 < segmentation_loss(wrong, target)


@pytest.mark.slow
def test_kill_then_resume_gives_the_same_weights(tmp_path):
    ref, art = killed_and_resumed(tmp_path, "segmentation", 16)
    assert art.metrics["test/dice_mean"] == ref.metrics["test/dice_mean"]
