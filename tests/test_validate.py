"""``validate``: every value a stage parses is checked before the first stage starts."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from cfexplain.train import NUMBERS, validate
from cfexplain.utils.cli import ConfigError
from tests.conftest import compose_config, run_cli

EVERY_STAGE = "stages=[classifier,generator,encoder,normative,direction,guard,segmentation]"


def _folders(root, per_class: dict[str, int], size: int = 40) -> None:
    for split in ("train", "val", "test"):
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((size, size), 40 * i % 256, np.uint8)).save(
                    folder / f"{i}.png"
                )


@pytest.mark.parametrize("preset", ["smoke", "cpu_demo", "cpu_32", "gpu_256"])
@pytest.mark.parametrize("dataset", ["knee", "histology"])
def test_shipped_configs_pass(preset, dataset):
    validate(compose_config(f"+dataset={dataset}", f"preset={preset}", EVERY_STAGE))


def test_every_stage_section_has_its_numbers_declared():
    assert set(NUMBERS) >= {
        "data", "classifier", "generator", "encoder", "normative", "direction", "guard",
        "segmentation",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("generator.kimg=abc", "generator.kimg"),
        ("generator.batch_size=0", "generator.batch_size"),
        ("generator.ada.fixed_p=2", "generator.ada.fixed_p"),
        ("classifier.epochs=1.5", "classifier.epochs"),
        ("classifier.optimizer.lr=0", "classifier.optimizer.lr"),
        ("encoder.lr=-1", "encoder.lr"),
        ("normative.steps=abc", "normative.steps"),
        ("normative.net.levels=0", "normative.net.levels"),
        ("direction.holdout=1.5", "direction.holdout"),
        ("direction.num_frames=1", "direction.num_frames"),
        ("guard.quantile=abc", "guard.quantile"),
        ("segmentation.batch_size=-2", "segmentation.batch_size"),
        ("data.n_train=abc", "data.n_train"),
        ("checkpoint_every=0", "checkpoint_every"),
        ("generator.collapse.lr_factor=1.5", "generator.collapse.lr_factor"),
        ("generator.metrics.num_images=3", "generator.metrics.num_images"),
        ("generator.G.conv_clamp=abc", "generator.G.conv_clamp"),
        ("generator.D.conv_clamp=0", "generator.D.conv_clamp"),
        ("generator.D.mbstd_group_size=-1", "generator.D.mbstd_group_size"),
    ],
)
def test_a_bad_number_is_named(override, field):
    cfg = compose_config("+dataset=knee", "preset=smoke", EVERY_STAGE, override)
    with pytest.raises(ConfigError, match="^" + re.escape(field) + "="):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["generator.keep_metric=fd_classifier"],
            r"generator\.keep_metric='fd_classifier': expected one of",
        ),
        (
            ["generator.metrics.fixed_features=false"],
            r"keep_metric=fd_fixed_val needs generator\.metrics\.fixed_features=true",
        ),
    ],
)
def test_a_keep_metric_the_run_does_not_compute_is_named(overrides, message):
    cfg = compose_config("+dataset=knee", "preset=smoke", EVERY_STAGE, *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_stage_not_selected_is_not_checked():
    validate(compose_config("+dataset=knee", "stages=[classifier]", "generator.kimg=abc"))


@pytest.mark.parametrize("resolution", [48, 1, 4])
def test_resolution_the_generator_cannot_build_is_named(tmp_path, resolution):
    _folders(tmp_path, {"0": 2, "1": 2})
    cfg = compose_config(
        "+dataset=folder", f"data.root={tmp_path}", "preset=smoke", f"data.resolution={resolution}"
    )
    with pytest.raises(ConfigError, match=rf"data\.resolution={resolution}: must be"):
        validate(cfg)


def test_resolution_the_normative_net_cannot_halve_is_named():
    # 32 px is a power of two, but 6 levels would halve it below 1 px.
    cfg = compose_config("+dataset=knee", "preset=smoke", "normative.net.levels=6")
    with pytest.raises(ConfigError, match=r"data\.resolution=32.*normative\.net\.levels"):
        validate(cfg)


def test_a_class_smaller_than_a_batch_is_named(tmp_path):
    _folders(tmp_path, {"healthy": 20, "sick": 3})
    cfg = compose_config(
        "+dataset=folder", f"data.root={tmp_path}", "preset=smoke", "classifier.batch_size=8"
    )
    with pytest.raises(
        ConfigError, match=r"'sick' has 3 training images.*classifier\.batch_size=8"
    ):
        validate(cfg)
    validate(compose_config("+dataset=folder", f"data.root={tmp_path}", "classifier.batch_size=3"))


def test_cli_fails_at_once_on_a_bad_number(tmp_path):
    r = run_cli(
        "cfexplain.train",
        "+dataset=knee",
        "preset=smoke",
        "logger=none",
        "device=cpu",
        f"runs_dir={tmp_path}",
        "generator.kimg=abc",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cfexplain.train: generator.kimg='abc'")
    assert not (tmp_path / "knee" / "classifier").exists()  # nothing trained first


def test_a_generator_too_narrow_for_the_resolution_is_named():
    cfg = compose_config("+dataset=knee", "preset=smoke", "generator.D.channel_base=16")
    with pytest.raises(
        ConfigError, match=r"data\.resolution=32 exceeds generator\.D\.channel_base"
    ):
        validate(cfg)


def test_a_missing_stage_section_is_left_to_its_stage():
    from omegaconf import open_dict

    cfg = compose_config("+dataset=knee", "preset=smoke", "stages=[segmentation]")
    with open_dict(cfg):
        del cfg["segmentation"]
    validate(cfg)
