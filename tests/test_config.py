"""Every config group composes; the entry point explains what is missing."""

from __future__ import annotations

from importlib import resources

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cfexplain.train import ConfigError, dataset_choices, validate
from tests.conftest import compose_config, run_cli


def group_options(group: str) -> list[str]:
    folder = resources.files("cfexplain.conf").joinpath(group)
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


GROUPS = ["dataset", "classifier", "logger", "preset", "launcher"]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group} is empty"
    assert {"knee", "histology", "folder", "csv", "dicom", "medmnist", "pcam"} <= set(
        dataset_choices()
    )
    assert {"cpu_demo", "smoke", "gpu_256"} <= set(group_options("preset"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in group_options(group):
        prefix = "+" if group == "dataset" else ""
        extra = [] if group == "dataset" else ["+dataset=knee"]
        cfg = compose_config(f"{prefix}{group}={option}", *extra)
        # Every value resolves, except the data.root a real-data config asks the user for.
        if group == "dataset" and OmegaConf.is_missing(cfg.data, "root"):
            cfg.data.root = "/some/where"
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _dataset_base() -> DictConfig:
    return OmegaConf.load(str(resources.files("cfexplain.conf").joinpath("base/dataset.yaml")))


def test_dataset_base_is_no_choice_and_every_dataset_extends_it():
    assert "base" not in dataset_choices() and "dataset" not in dataset_choices()
    base = _dataset_base().data
    for choice in dataset_choices():
        own = OmegaConf.load(
            str(resources.files("cfexplain.conf").joinpath(f"dataset/{choice}.yaml"))
        )
        assert list(own.defaults) == ["/base/dataset", "_self_"], choice
        # One truth: a dataset config states only what differs from the base.
        for key, value in own.data.items():
            if key in base and not OmegaConf.is_missing(base, key):
                assert value != base[key], f"dataset/{choice}.yaml repeats data.{key}"
        data = compose_config(f"+dataset={choice}").data
        assert set(base) <= set(data), choice
        assert not OmegaConf.is_missing(data, "name") and data.name == choice


def test_resnet_and_optimizer_instantiate():
    cfg = compose_config("+dataset=knee", "preset=smoke")
    model = instantiate(cfg.classifier.model, in_channels=1, num_classes=2)
    opt = instantiate(cfg.classifier.optimizer)(model.parameters())
    assert opt.param_groups[0]["lr"] == cfg.classifier.optimizer.lr
    assert type(model).__name__ == "ResNetClassifier"


def test_presets_change_sizes():
    sizes = {
        p: compose_config("+dataset=knee", f"preset={p}").data.resolution
        for p in ("smoke", "cpu_demo", "cpu_32", "gpu_256")
    }
    assert sizes == {"smoke": 32, "cpu_demo": 64, "cpu_32": 32, "gpu_256": 256}
    assert compose_config("+dataset=knee").data.resolution == 64  # cpu_demo is the default


def test_cpu_32_is_cpu_demo_at_32_px_in_its_own_runs_folder():
    demo = compose_config("+dataset=knee")
    small = compose_config("+dataset=knee", "preset=cpu_32")
    assert small.experiment == "knee_32px" and demo.experiment == "knee"
    assert small.generator.max_minutes is None and small.generator.kimg <= 80  # work budget
    # Everything but the resolution and the generator's width, length and batch (cpu_32 stays
    # at the batch 16 its numbers were measured at) comes from cpu_demo.
    for key in ("encoder", "direction", "classifier", "normative"):
        assert small[key] == demo[key], key
    assert (small.generator.batch_size, demo.generator.batch_size) == (16, 8)
    own = {"G", "D", "kimg", "max_minutes", "snapshot_kimg", "batch_size"}
    assert {k: v for k, v in small.generator.items() if k not in own} == {
        k: v for k, v in demo.generator.items() if k not in own
    }
    assert small.generator.G.channel_base == small.generator.D.channel_base == 1024
    assert {k: v for k, v in small.data.items() if k != "resolution"} == {
        k: v for k, v in demo.data.items() if k != "resolution"
    }


def test_experiment_defaults_to_dataset_and_overrides():
    assert compose_config("+dataset=histology").experiment == "histology"
    assert compose_config("+dataset=knee", "experiment=mine").experiment == "mine"


def test_missing_dataset_lists_choices():
    with pytest.raises(ConfigError, match="knee.*histology|histology.*knee"):
        validate(compose_config())


def test_missing_root_is_named():
    with pytest.raises(ConfigError, match="data.root"):
        validate(compose_config("+dataset=folder"))


def test_unknown_stage_is_named():
    with pytest.raises(ConfigError, match="segmenter"):
        validate(compose_config("+dataset=knee", "stages=[classifier,segmenter]"))


def test_cli_without_dataset_exits_with_choices(tmp_path):
    r = run_cli("cfexplain.train", f"runs_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "+dataset=" in r.stderr and "knee" in r.stderr and "histology" in r.stderr
    assert "Traceback" not in r.stderr
