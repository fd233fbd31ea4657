"""TrainedRun: opens a run folder, says which stages it has, loads each model once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import cfexplain.nn.classifier as classifier_module
from cfexplain.explain.attribution import MethodUnavailable, get_method
from cfexplain.explain.counterfactual import CounterfactualEngine
from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import Artifact, save_model, write_text
from cfexplain.utils.cli import ConfigError
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def classifier_only(tmp_path_factory) -> Path:
    """A run with an (untrained) classifier stage in the stage's own format, nothing else."""
    run = tmp_path_factory.mktemp("runs") / "knee"
    folder = run / "classifier"
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "num_classes": 2, "width": 4, "blocks": [1]}
    module = ResNetClassifier(**kwargs)
    save_model(
        folder / "classifier.safetensors",
        module,
        "cfexplain.nn.classifier.ResNetClassifier",
        kwargs,
    )
    train_cfg = compose_config("+dataset=knee", "preset=smoke", "logger=none")
    write_text(folder / "config.yaml", OmegaConf.to_yaml(train_cfg, resolve=True))
    info = {"classes": ["KL<2", "KL>=2"], "model": "tiny resnet"}
    Artifact(
        "classifier", folder, "abc", files={"weights": "classifier.safetensors"}, info=info
    ).write()
    return run


def test_opens_a_run_and_says_which_stages_it_has(classifier_only):
    run = TrainedRun(classifier_only, "cpu")
    assert run.dir == classifier_only.resolve() and run.name == "knee"
    assert run.has("classifier") and not run.has("generator") and not run.has("normative")
    assert run.classes == ["KL<2", "KL>=2"]
    assert run.check_target(1) == 1 and run.check_target("KL>=2") == 1
    for bad in (2, -1, "KL3", True):
        with pytest.raises(ConfigError, match=rf"^target={bad}: expected a class index \(0 to 1\)"):
            run.check_target(bad)
    assert run.artifact("classifier") is run.artifact("classifier")
    assert run.artifact("classifier").info["model"] == "tiny resnet"
    assert int(run.config.data.resolution) == 32
    ds = run.dataset("test")
    assert ds is run.dataset("test") and getattr(ds, "cache", False) is False
    assert run.output_dir("explain") == classifier_only.resolve() / "explain"
    assert run.output_dir("explain", stamped=True).parent == classifier_only.resolve() / "explain"
    assert set(run.provenance()) == {"classifier stage"}
    with pytest.raises(ConfigError, match="no finished generator stage"):
        run.stage_dir("generator")


def test_the_classifier_is_loaded_once(classifier_only, monkeypatch):
    calls = []
    real = classifier_module.load_classifier

    def counting(stage_dir, device="cpu"):
        calls.append(Path(stage_dir))
        return real(stage_dir, device)

    monkeypatch.setattr(classifier_module, "load_classifier", counting)
    run = TrainedRun(classifier_only, "cpu")
    first = run.classifier
    assert run.classifier is first and len(calls) == 1
    assert not first.training
    # The counterfactual engine of the run reuses that classifier: no second load.
    run.__dict__["generator"] = _TinyG()
    run.__dict__["encoder"] = nn.Linear(1, 1)
    run.__dict__["directions"] = {"direction": torch.ones(4), "lambda_range": torch.ones(1)}
    engine = CounterfactualEngine.from_run(run, perceptual=None)
    assert engine.f is first and len(calls) == 1
    assert engine.G is run.generator and engine.E is run.encoder


class _TinyG(nn.Module):
    w_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))


def test_a_folder_without_a_finished_classifier_is_an_error_naming_run(tmp_path):
    (tmp_path / "knee" / "generator").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"run=.*knee: no finished classifier stage"):
        TrainedRun(tmp_path / "knee")
    with pytest.raises(ConfigError, match=r"run=.*nowhere: no such folder"):
        TrainedRun(tmp_path / "nowhere", require=None)
    run = TrainedRun(tmp_path / "knee", require=None)  # e.g. sensitivity on its own model
    with pytest.raises(ConfigError, match="no stage config"):
        _ = run.config
    cfg = OmegaConf.create({"run": "???", "seed": 0, "device": "cpu", "target": 1})
    with pytest.raises(ConfigError, match="set run=runs/<experiment>"):
        TrainedRun.open(cfg)


def test_open_seeds_picks_the_device_and_checks_the_target(classifier_only):
    cfg = OmegaConf.create({"run": str(classifier_only), "seed": 0, "device": "cpu", "target": 1})
    run = TrainedRun.open(cfg)
    assert run.device == torch.device("cpu")
    cfg.target = 7
    with pytest.raises(ConfigError, match="target=7"):
        TrainedRun.open(cfg)


@pytest.mark.parametrize("bad", [0, -1, "abc", 2.5])
def test_a_command_batch_size_below_one_or_not_whole_is_named(classifier_only, bad):
    cfg = OmegaConf.create(
        {"run": str(classifier_only), "seed": 0, "device": "cpu", "target": 1, "batch_size": bad}
    )
    with pytest.raises(ConfigError, match=f"^batch_size={bad!r}: expected an integer >= 1$"):
        TrainedRun.open(cfg)
    cfg.batch_size = 10_000  # larger than the split: fine, the last batch is just shorter
    TrainedRun.open(cfg)


def test_methods_are_built_from_the_run_or_say_what_is_missing(classifier_only):
    run = TrainedRun(classifier_only, "cpu")
    saliency = get_method("saliency").from_run(run)
    assert saliency.model is run.classifier
    with pytest.raises(MethodUnavailable, match="lacks generator, encoder, direction"):
        get_method("counterfactual").from_run(run)
    with pytest.raises(MethodUnavailable, match="has no normative stage"):
        get_method("normative").from_run(run, kind="vae")
