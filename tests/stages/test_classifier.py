"""Classifier stage: smoke run, skip/force, resume after a kill, determinism, external models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cfexplain.nn.classifier import ResNetClassifier, load_classifier
from cfexplain.stages._shared import epoch_batches, lr_at
from cfexplain.stages.classifier import classification_metrics
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact
from tests.conftest import kill_when, run_train, smoke_train


def test_smoke_run_writes_a_complete_artifact(smoke_cfg):
    cfg = smoke_cfg("stages=[classifier]")
    art = run_chain(cfg)["classifier"]
    assert art.dir.name == "classifier" and art.dir.parent.name == "knee"
    for key in ("test/auc", "test/accuracy", "test/balanced_accuracy", "test/confusion_matrix"):
        assert key in art.metrics
    cm = np.array(art.metrics["test/confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == cfg.data.n_test
    assert "knee phantom" in art.info["data"]
    assert (art.dir / "config.yaml").is_file() and (art.dir / "state.pt").is_file()
    model = load_classifier(art.dir)
    x = torch.zeros(3, 1, cfg.data.resolution, cfg.data.resolution)
    assert model(x).shape == (3, 2)
    assert not list(art.dir.parent.glob(".*.partial"))


def test_finished_stage_is_skipped_and_force_reruns(smoke_cfg, caplog):
    cfg = smoke_cfg("stages=[classifier]")
    first = run_chain(cfg)["classifier"]
    with caplog.at_level("INFO", logger="cfexplain"):
        again = run_chain(cfg)["classifier"]
    assert again.created == first.created and "up to date" in caplog.text
    changed = run_chain(smoke_cfg("stages=[classifier]", "classifier.optimizer.lr=0.01"))[
        "classifier"
    ]
    assert changed.fingerprint != first.fingerprint
    # runtime-only keys do not invalidate the stage
    same = run_chain(
        smoke_cfg("stages=[classifier]", "classifier.optimizer.lr=0.01", "data.num_workers=1")
    )["classifier"]
    assert same.created == changed.created
    forced = run_chain(
        smoke_cfg("stages=[classifier]", "classifier.optimizer.lr=0.01", "force=true")
    )["classifier"]
    assert forced.fingerprint == changed.fingerprint and forced.created >= changed.created


def test_same_seed_same_weights_other_seed_differs(smoke_cfg, tmp_path):
    w = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        art = run_chain(smoke_cfg("stages=[classifier]", f"experiment={name}", f"seed={seed}"))[
            "classifier"
        ]
        w.append(load_file(str(art.path("weights"))))
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not all(torch.equal(w[0][k], w[2][k]) for k in w[0])


def _train_cmd(runs, classifier="resnet"):
    return smoke_train(
        runs,
        "stages=[classifier]",
        "data.n_train=256",
        "classifier.epochs=3",
        "checkpoint_every=3",
        f"classifier={classifier}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("classifier", ["resnet", "capsules"])
def test_kill_then_resume_gives_the_same_weights(tmp_path, classifier):
    run_train(_train_cmd(tmp_path / "ref", classifier))
    runs = tmp_path / "killed"
    state = runs / "knee" / ".classifier.partial" / "state.pt"
    kill_when(_train_cmd(runs, classifier), state.exists)
    assert not (runs / "knee" / "classifier").exists()
    run_train(_train_cmd(runs, classifier))
    art = Artifact.load(runs / "knee" / "classifier")
    assert art.info["resumed_from_step"] > 0
    a = load_file(str(Artifact.load(tmp_path / "ref" / "knee" / "classifier").path("weights")))
    b = load_file(str(art.path("weights")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_capsules_train_on_the_phantom_concepts_and_load_like_any_classifier(smoke_cfg):
    art = run_chain(smoke_cfg("stages=[classifier]", "classifier=capsules"))["classifier"]
    names = ["narrowing_medial", "narrowing_lateral", "osteophytes", "sclerosis", "deformity"]
    assert art.info["attributes"] == names
    for name in names:
        assert 0 <= art.metrics[f"test/attributes/{name}/mae"] <= 1
        assert f"test/attributes/{name}/auc" in art.metrics
    model = load_classifier(art.dir)
    x = torch.zeros(3, 1, 32, 32)
    assert model(x).shape == (3, 2) and model.attributes == names
    # the smoke preset's ResNet keys were left out of the saved constructor arguments
    assert "blocks" not in art.info["model"]


def test_capsules_without_concepts_need_attribute_weight_0(smoke_cfg, tmp_path):
    from PIL import Image

    from cfexplain.utils.cli import ConfigError

    root = tmp_path / "csv"
    root.mkdir()
    rows = ["path,label,split"]
    for i in range(24):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    data = ["+dataset=csv", f"data.root={root}", "classifier.batch_size=4"]
    cfg = smoke_cfg("stages=[classifier]", "classifier=capsules", *data[1:], dataset="csv")
    with pytest.raises(ConfigError, match="no concept annotations"):
        run_chain(cfg)
    cfg = smoke_cfg(
        "stages=[classifier]",
        "classifier=capsules",
        "classifier.attribute_weight=0",
        "classifier.capsules=3",
        *data[1:],
        dataset="csv",
    )
    art = run_chain(cfg)["classifier"]
    assert art.info["attributes"] == ["capsule_0", "capsule_1", "capsule_2"]
    assert not any(k.startswith("test/attributes/") for k in art.metrics)


def test_failed_run_keeps_the_finished_stage(smoke_cfg, monkeypatch):
    cfg = smoke_cfg("stages=[classifier]")
    first = run_chain(cfg)["classifier"]
    import cfexplain.stages.classifier as stage

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(stage, "classification_metrics", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_chain(smoke_cfg("stages=[classifier]", "force=true"))
    assert Artifact.load(first.dir).created == first.created


def test_lr_schedule_and_batches_are_pure():
    lrs = [lr_at(s, base=1.0, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert epoch_batches(10, 4, 0, 0) == epoch_batches(10, 4, 0, 0) != epoch_batches(10, 4, 0, 1)
    one = epoch_batches(16, 4, 0, 3)
    two = [epoch_batches(16, 4, 0, 3, rank=r, world=2) for r in range(2)]
    assert [two[0][s] + two[1][s] for s in range(4)] == one


def test_metrics_on_known_predictions():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    m = classification_metrics(probs, labels)
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["confusion_matrix"] == [[2, 0], [0, 2]]
    probs5 = np.eye(5)[[0, 1, 2, 3, 3]]
    m5 = classification_metrics(probs5, np.array([0, 1, 2, 3, 4]))
    assert m5["accuracy"] == 0.8 and len(m5["confusion_matrix"]) == 5


# ----------------------------------------------------------------------------- external models


class OneLogit(torch.nn.Module):
    """A user's binary model with a single logit."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_external_target_with_weights(smoke_cfg, tmp_path):
    net = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1])
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))
    cfg = smoke_cfg(
        "stages=[classifier]",
        "classifier=external",
        "classifier.target=cfexplain.nn.classifier.ResNetClassifier",
        "+classifier.kwargs={width: 4, blocks: [1]}",
        f"classifier.weights={tmp_path / 'net.safetensors'}",
    )
    art = run_chain(cfg)["classifier"]
    loaded = load_classifier(art.dir)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded(x), net.eval()(x))
    assert 0.0 <= art.metrics["test/auc"] <= 1.0


def test_external_torchscript_single_logit(smoke_cfg, tmp_path):
    scripted = torch.jit.script(OneLogit())
    scripted.save(str(tmp_path / "net.pt"))
    art = run_chain(
        smoke_cfg(
            "stages=[classifier]",
            "classifier=external",
            f"classifier.torchscript={tmp_path / 'net.pt'}",
        )
    )["classifier"]
    assert art.info["single_logit"] is True
    model = load_classifier(art.dir)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(torch.softmax(model(x), 1)[:, 1], torch.sigmoid(scripted(x)[:, 0]))


def test_external_shape_mismatch_is_explained(smoke_cfg, tmp_path):
    torch.jit.script(OneLogit(channels=3)).save(str(tmp_path / "rgb.pt"))
    with pytest.raises(ValueError, match=r"rgb.pt.*\(2, 1, 32, 32\)"):
        run_chain(
            smoke_cfg(
                "stages=[classifier]",
                "classifier=external",
                f"classifier.torchscript={tmp_path / 'rgb.pt'}",
            )
        )


def test_external_wrong_weights_are_named(smoke_cfg, tmp_path):
    save_file({"nonsense": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad.safetensors.*missing"):
        run_chain(
            smoke_cfg(
                "stages=[classifier]",
                "classifier=external",
                "classifier.target=tests.stages.test_classifier.OneLogit",
                f"classifier.weights={tmp_path / 'bad.safetensors'}",
            )
        )
