"""Sweeps on models built to be invariant (or not), Dice on known masks, and the command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.nn.segmentation import UNet, dice_scores
from cfexplain.sensitivity.__main__ import ConfigError, sensitivity
from cfexplain.sensitivity.analysis import result_rows, sweep
from cfexplain.utils.artifacts import Artifact, save_model, write_text
from tests.conftest import compose_config, run_cli

EVIL = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- models


class MeanModel(nn.Module):
    """Logits ``[0, gain · (mean(x) + offset)]``: reads only the image mean, not where things are."""

    def __init__(self, gain: float = 4.0, offset: float = 0.0, note: str = "") -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))
        self.offset = offset

    def forward(self, x):
        z = self.gain * (x.mean(dim=(1, 2, 3)) + self.offset)
        return torch.stack([torch.zeros_like(z), z], dim=1)


class LeftHalfModel(MeanModel):
    """Reads the mean of the left half only: rotation moves content in and out of it."""

    def forward(self, x):
        return super().forward(x[..., : x.shape[-1] // 2])


class ContrastModel(MeanModel):
    """Reads the spread about the mean: invariant to added brightness (without clipping)."""

    def forward(self, x):
        return super().forward((x - x.mean(dim=(1, 2, 3), keepdim=True)).abs())


class MaskEcho(nn.Module):
    """A "segmentation model" whose logits are the image itself: it outputs the bright pixels."""

    def __init__(self, channels: int = 1, shift: float = 0.0) -> None:
        super().__init__()
        self.channels, self.shift = channels, shift

    def forward(self, x):
        return 20 * (x[:, :1] + self.shift).expand(-1, self.channels, -1, -1)


def _blobs(n: int = 4, r: int = 32) -> torch.Tensor:
    """Gaussian blobs off-centre (right) inside the inscribed disc, on black: ``[n, 1, r, r]``."""
    yy, xx = torch.meshgrid(torch.arange(r) + 0.5, torch.arange(r) + 0.5, indexing="ij")
    out = []
    for i in range(n):
        a = 0.4 * i  # all on the right-hand side: rotation carries them out of the left half
        cy, cx = r / 2 + 6 * math.sin(a), r / 2 + 6 * math.cos(a)
        out.append(torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2)) * 2 - 1)
    return torch.stack(out)[:, None]


# ----------------------------------------------------------------------------- sweeps


def test_curve_is_flat_for_an_invariant_model_and_moves_for_one_that_is_not():
    x = _blobs()
    angles = [-90, -45, 0, 45, 90, 135]
    # Offsets put both models' logits near 0 on these images (not saturated).
    flat = sweep(MeanModel(20, 0.89), x, "rotation", angles)
    moving = sweep(LeftHalfModel(20, 0.89), x, "rotation", angles)
    assert flat.values.shape == (6, 4, 1) and flat.examples.shape == (6, 4, 1, 32, 32)
    assert flat.summary()["p(class 1)"]["range"] < 0.005
    assert moving.summary()["p(class 1)"]["range"] > 0.05
    # Per image, the left-half reader follows its blob around: large spread, flat mean or not.
    assert (moving.values.amax(0) - moving.values.amin(0)).min() > 0.05
    # Brightness: the contrast reader is invariant, the mean reader is not.
    x = x * 0.5
    assert (
        sweep(ContrastModel(), x, "brightness", [-0.2, 0, 0.2]).summary()["p(class 1)"]["range"]
        < 1e-5
    )
    assert (
        sweep(MeanModel(), x, "brightness", [-0.2, 0, 0.2]).summary()["p(class 1)"]["range"] > 0.1
    )


def test_sweep_is_batched_restores_train_mode_and_summarises():
    x = _blobs(5)
    model = LeftHalfModel().train()
    a = sweep(model, x, "noise", batch_size=2, examples=2)
    b = sweep(model, x, "noise", batch_size=64)
    assert model.training and torch.allclose(a.values, b.values, atol=1e-6)
    assert a.examples.shape[1] == 2 and a.params == [float(p) for p in a.params]
    s = a.summary()["p(class 1)"]
    assert s["identity"] == pytest.approx(float(a.mean()[0, 0]))  # noise 0 comes first
    assert s["min"] <= s["identity"] <= s["max"] and s["range"] == pytest.approx(
        s["max"] - s["min"]
    )
    rows = result_rows(a)
    assert len(rows) == len(a.params) and rows[0]["images"] == 5


def test_dice_of_known_masks():
    truth = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    truth[0, 0, 2:6, 2:6] = True
    truth[0, 1, 2:6, 2:6] = True
    pred = torch.zeros_like(truth)
    pred[0, 0] = truth[0, 0]  # perfect
    pred[0, 1, 2:6, 2:4] = True  # half of the truth: 2·8 / (8 + 16)
    d = dice_scores(pred, truth)
    assert d[0, 0] == 1 and d[0, 1] == pytest.approx(2 / 3) and math.isnan(d[0, 2])
    assert dice_scores(torch.zeros_like(truth), truth)[0, 0] == 0


def test_segmentation_sweep_scores_dice_against_the_moved_masks():
    masks = torch.zeros(3, 2, 16, 16, dtype=torch.bool)
    masks[:, :, 2:7, 9:14] = True  # off-centre: rotation moves it
    masks[2] = False  # an image without the structure
    x = torch.where(masks[:, :1], 1.0, -1.0)
    # A model that outputs the mask itself: Dice 1 at every rotation (the truth turns with it).
    r = sweep(
        MaskEcho(2),
        x,
        "rotation",
        [0, 90, 180, 270],
        task="segmentation",
        masks=masks,
        outputs=["a", "b"],
    )
    assert r.values.shape == (4, 3, 2) and r.outputs == ["a", "b"]
    assert (r.values[:, :2] == 1).all() and torch.isnan(r.values[:, 2]).all()
    assert (r.mean() == 1).all() and r.example_masks.shape == (4, 3, 2, 16, 16)
    # Against the unmoved truth the rotated prediction would miss it: the masks really move.
    assert (dice_scores(r.example_masks[1], masks)[:2] == 0).all()
    empty = sweep(
        MaskEcho(2, shift=-5), x, "brightness", [0, 0.5], task="segmentation", masks=masks
    )
    assert (empty.values[:, :2] == 0).all()
    # Brightness +0.5 leaves black at -0.5 and the echo still finds exactly the square.
    assert (
        sweep(MaskEcho(2), x, "brightness", [0.5], task="segmentation", masks=masks).values[0, :2]
        == 1
    ).all()
    # Three of the square's five columns predicted: Dice = 2 · 3/5 / (1 + 3/5) = 0.75.
    part = masks.clone()
    part[..., 12:] = False
    xp = torch.where(part[:, :1], 1.0, -1.0)
    pr = sweep(MaskEcho(2), xp, "rotation", [0.0, 180.0], task="segmentation", masks=masks)
    assert torch.allclose(pr.values[:, :2], torch.tensor(0.75))


def test_segmentation_sweep_needs_masks_and_a_known_task():
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        sweep(MaskEcho(), _blobs(), "rotation", task="segmentation")
    with pytest.raises(ValueError, match="task must be"):
        sweep(MeanModel(), _blobs(), "rotation", task="regression")


# ----------------------------------------------------------------------------- the command


def sens_cfg(*overrides: str) -> DictConfig:
    """The config as ``python -m cfexplain.sensitivity`` composes it."""
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name="sensitivity", overrides=["device=cpu", *overrides])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run with an (untrained) classifier and segmentation stage in the stages' own formats."""
    run = tmp_path_factory.mktemp("runs") / "knee"
    train_cfg = compose_config("+dataset=knee", "preset=smoke", "logger=none")
    torch.manual_seed(0)
    stages = {
        "classifier": (
            ResNetClassifier(1, 2, width=4, blocks=[1]),
            "cfexplain.nn.classifier.ResNetClassifier",
            {"in_channels": 1, "num_classes": 2, "width": 4, "blocks": [1]},
            {"classes": ["KL<2", "KL>=2"], "model": "tiny resnet"},
        ),
        "segmentation": (
            UNet(1, 4, width=4, levels=1, width_max=8),
            "cfexplain.nn.segmentation.UNet",
            {"in_channels": 1, "num_classes": 4, "width": 4, "levels": 1, "width_max": 8},
            {"classes": ["osteophyte", "joint_space", "sclerosis", "marker"], "model": "tiny unet"},
        ),
    }
    for name, (module, target, kwargs, info) in stages.items():
        folder = run / name
        save_model(folder / f"{name}.safetensors", module, target, kwargs)
        write_text(folder / "config.yaml", OmegaConf.to_yaml(train_cfg, resolve=True))
        Artifact(name, folder, name, files={"weights": f"{name}.safetensors"}, info=info).write()
    return run


FAST = ("transforms=[rotation,noise,spike]", "+params.rotation=[-30,0,30]", "limit=5", "examples=2")


def test_command_writes_plots_strips_gifs_csv_and_page(fake_run, tmp_path):
    out = tmp_path / "s"
    index = sensitivity(sens_cfg(f"run={fake_run}", f"out={out}", "logger=none", *FAST))
    assert index == out / "index.html"
    for t, frames in (("rotation", 3), ("noise", 9), ("spike", 7)):
        for f in ("plot.png", "strip.png", "sweep.gif"):
            assert (out / t / f).is_file(), (t, f)
        with Image.open(out / t / "sweep.gif") as gif:
            assert gif.n_frames == 2 * frames - 2  # forward then back
        with Image.open(out / t / "strip.png") as strip:
            assert strip.width > frames * 64 and strip.height > 2 * 64  # 2 examples, tiles 64 px
    with open(out / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + 9 + 7 and {r["output"] for r in rows} == {"p(KL>=2)"}
    assert all(0 <= float(r["mean"]) <= 1 and r["images"] == "5" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["images"] == 5
    assert summary["transforms"]["rotation"]["params"] == [-30.0, 0.0, 30.0]
    page = index.read_text()
    assert page.count("<section") == 3 and "tiny resnet" in page
    for src in ("rotation/plot.png", "noise/sweep.gif", "spike/strip.png"):
        assert f'src="{src}"' in page  # relative: the folder can be moved


def test_user_models_and_escaped_strings(fake_run, tmp_path):
    out = tmp_path / "c"
    sensitivity(
        sens_cfg(
            f"run={fake_run}",
            f"out={out}",
            "logger=none",
            *FAST,
            "model.target=tests.sensitivity.test_analysis.MeanModel",
            f"+model.kwargs.note='{EVIL}'",
        )  # fmt: skip
    )
    page = (out / "index.html").read_text()
    assert (
        "MeanModel" in page and EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    )
    # Segmentation: the run's U-Net against the phantom's masks, names escaped too.
    out = tmp_path / "seg"
    evil_classes = f"classes=[a,'{EVIL}',c,d]"
    sensitivity(
        sens_cfg(
            f"run={fake_run}", f"out={out}", "logger=none", "task=segmentation", evil_classes, *FAST
        )
    )
    page = (out / "index.html").read_text()
    assert EVIL not in page and "&lt;script&gt;" in page and "tiny unet" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == ["a", EVIL, "c", "d"]
    with open(out / "sensitivity.csv", newline="") as f:
        dice = [float(r["mean"]) for r in csv.DictReader(f) if r["mean"] != "nan"]
    assert dice and all(0 <= v <= 1 for v in dice)
    # A user's segmentation model whose output does not fit is named with the shapes.
    with pytest.raises(ConfigError, match=r"expected logits \(2, 4, 32, 32\)"):
        sensitivity(
            sens_cfg(
                f"run={fake_run}",
                f"out={tmp_path / 'x'}",
                "logger=none",
                "task=segmentation",
                *FAST,
                "model.target=tests.sensitivity.test_analysis.MaskEcho",
                "+model.kwargs.channels=2",
            )  # fmt: skip
        )


def test_config_errors_name_the_field(fake_run, tmp_path):
    with pytest.raises(ConfigError, match="transforms: unknown transform 'warp'"):
        sensitivity(sens_cfg(f"run={fake_run}", "transforms=[warp]"))
    with pytest.raises(ConfigError, match=r"params: \['blur'\] are not among"):
        sensitivity(sens_cfg(f"run={fake_run}", "transforms=[noise]", "+params.blur=[1]"))
    with pytest.raises(ConfigError, match="no images: set run="):
        sensitivity(sens_cfg("model.target=tests.sensitivity.test_analysis.MeanModel"))
    with pytest.raises(ConfigError, match="target=5"):
        sensitivity(sens_cfg(f"run={fake_run}", "target=5"))
    with pytest.raises(ConfigError, match="^batch_size=0: expected an integer >= 1$"):
        sensitivity(sens_cfg(f"run={fake_run}", "batch_size=0"))
    with pytest.raises(ConfigError, match="^examples='all': expected an integer >= 1$"):
        sensitivity(sens_cfg(f"run={fake_run}", "examples=all"))
    r = run_cli("cfexplain.sensitivity", f"run={tmp_path / 'nowhere'}", "logger=none")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr


def test_model_without_a_run_reads_a_phantom_and_logs_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "w"
    with pytest.warns(UserWarning, match="WANDB_MODE=offline"):  # the mode's source is said
        sensitivity(
            sens_cfg(
                "+dataset=histology",
                "resolution=16",
                f"out={out}",
                "transforms=[gamma]",
                "limit=4",
                "model.target=tests.sensitivity.test_analysis.ContrastModel",
            )  # fmt: skip
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["outputs"] == ["p(tumour)"]
    assert list(Path(summary["wandb_dir"]).glob("run-*.wandb"))
