"""``build_dataset``: the one door from config to data; real files never fall back to the phantom."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf.errors import ConfigKeyError
from PIL import Image

from cfexplain.data import build_dataset
from cfexplain.data.readers import DataError
from cfexplain.train import run_chain
from tests.conftest import compose_config


def _write_kl_folders(root, per_class=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for grade in range(5):
            d = root / split / str(grade)
            d.mkdir(parents=True)
            for i in range(per_class):
                # brightness of the centre encodes the grade, so a classifier can learn it
                img = rng.integers(0, 60, (size, size)).astype(np.uint8)
                img[12:28, 12:28] = 40 + 50 * grade
                Image.fromarray(img).save(d / f"{i}.png")


def _data_cfg(root, *overrides):
    cfg = compose_config("+dataset=folder", f"data.root={root}", "preset=smoke", *overrides)
    return cfg.data


def test_multiclass_folder_needs_positive_from_for_binary(tmp_path):
    _write_kl_folders(tmp_path)
    with pytest.raises(DataError, match="positive_from"):
        build_dataset(_data_cfg(tmp_path), "train")
    ds = build_dataset(_data_cfg(tmp_path, "data.positive_from=2"), "train")
    labels = [ds[i]["label"] for i in range(len(ds))]
    originals = [ds[i]["meta"]["original_label"] for i in range(len(ds))]
    assert ds.num_classes == 2 and ds.class_names == ["<2", ">=2"]
    assert labels == [int(o >= 2) for o in originals] and sum(labels) == 18
    multi = build_dataset(_data_cfg(tmp_path, "data.task=multiclass"), "train")
    assert multi.num_classes == 5
    with pytest.raises(DataError, match="positive_from=7"):
        build_dataset(_data_cfg(tmp_path, "data.positive_from=7"), "train")


def test_phantom_channel_mismatch_is_named():
    cfg = compose_config("+dataset=knee", "preset=smoke", "data.channels=3").data
    with pytest.raises(DataError, match="data.channels"):
        build_dataset(cfg, "train")


def test_a_key_the_base_defines_is_read_not_defaulted():
    # A config that lost a shared key (e.g. misspelt it) is an error, not a silent default.
    cfg = compose_config("+dataset=knee", "preset=smoke", "~data.seed", "+data.sed=0").data
    with pytest.raises(ConfigKeyError, match="seed"):
        build_dataset(cfg, "train")


def test_classifier_trains_on_real_files_and_says_so(tmp_path, smoke_cfg):
    root = tmp_path / "kl"
    _write_kl_folders(root, per_class=8)
    cfg = smoke_cfg(
        "stages=[classifier]",
        f"data.root={root}",
        "data.positive_from=2",
        "classifier.batch_size=8",
        dataset="folder",
    )
    art = run_chain(cfg)["classifier"]
    assert str(root) in art.info["data"] and "phantom" not in art.info["data"]
    assert sum(map(sum, art.metrics["test/confusion_matrix"])) == 40
    assert art.dir.parent.name == "folder"
