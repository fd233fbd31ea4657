"""explain at its edges: images= over symlink loops, volumes, tiny images, every file skipped,
damaged weights, and parameters that name their field (issue #16, sections 4 to 6)."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cfexplain.data.readers import DataError
from cfexplain.explain.__main__ import ConfigError, explain
from cfexplain.explain.attribution import Counterfactual
from cfexplain.explain.inputs import iter_images, iter_user_images, list_images, load_user_image
from cfexplain.utils.artifacts import ArtifactError, load_model, read_model_meta, save_model
from cfexplain.utils.cli import image_limit
from tests.conftest import run_cli
from tests.data.test_readers import write_dicom
from tests.explain.test_command import classifier_run, explain_cfg  # noqa: F401 (fixture)


def _png(path: Path, size: int = 8, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _within(seconds: float, fn):
    """``fn()`` run in a daemon thread; fails (instead of hanging the suite) past ``seconds``."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out["value"], time.monotonic() - start


def test_a_symlink_loop_is_walked_once_within_seconds(tmp_path):
    root = tmp_path / "scans"
    _png(root / "a.png")
    _png(root / "deep" / "b.png")
    (root / "deep" / "loop").symlink_to(root, target_is_directory=True)  # deep/loop -> scans
    (root / "self").symlink_to(".", target_is_directory=True)
    want = [root / "a.png", root / "deep" / "b.png"]

    found, seconds = _within(10, lambda: list_images(root))
    assert [p for p, _ in found] == want and seconds < 5
    pattern = str(root / "**" / "*.png")
    found, seconds = _within(10, lambda: list_images(pattern))
    assert [p for p, _ in found] == want and seconds < 5


def test_images_stream_one_at_a_time(tmp_path):
    root = tmp_path / "many"
    for i in range(5):
        _png(root / f"s{i}" / f"{i}.png")
    stream = iter_images(root)
    assert inspect.isgenerator(stream)
    assert next(stream)[0] == root / "s0" / "0.png"
    assert [p.name for p, _ in list_images(root, limit=2)] == ["0.png", "1.png"]
    assert [p.name for p, _ in list_images(str(root / "s[13]" / "*.png"))] == ["1.png", "3.png"]
    assert [p.name for p, _ in list_images(str(root / "**" / "[!0]*.png"))][:1] == ["1.png"]


def test_a_multi_frame_dicom_is_skipped_listed_and_named_in_the_log(tmp_path, caplog):
    volume = write_dicom(tmp_path / "series" / "volume.dcm", np.zeros((3, 4, 4), np.uint16))
    good = _png(tmp_path / "good.png")
    skipped: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING, logger="cfexplain"):
        got = list(
            iter_user_images(
                [(volume, None), (good, None)], resolution=8, channels=1, skipped=skipped
            )
        )
    assert [u.path for u in got] == [good]
    assert skipped == [(str(volume), "a volume of 3 frames; expected one 2D frame")]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"[explain] skipped {volume}: a volume of 3 frames; expected one 2D frame"]


def test_an_image_far_smaller_than_the_model_is_warned_about(tmp_path, caplog):
    tiny = _png(tmp_path / "tiny.png", size=6)
    with caplog.at_level(logging.WARNING, logger="cfexplain"):
        item = load_user_image(tiny, None, resolution=32, channels=1)
    assert item.image.shape == (1, 32, 32)
    assert "far smaller than data.resolution=32" in item.note
    assert any(str(tiny) in r.getMessage() for r in caplog.records)
    ok = load_user_image(_png(tmp_path / "ok.png", size=20), None, resolution=32, channels=1)
    assert "far smaller" not in ok.note


def test_every_file_skipped_lists_the_files_and_why(classifier_run, tmp_path):  # noqa: F811
    folder = tmp_path / "mine"
    broken = _png(folder / "broken.png", size=64)
    broken.write_bytes(broken.read_bytes()[:60])
    write_dicom(folder / "volume.dcm", np.zeros((2, 4, 4), np.uint16))
    cfg = explain_cfg(
        f"run={classifier_run}",
        f"images={folder}",
        f"out={tmp_path / 'g'}",
        "methods=[saliency]",
        "logger=none",
    )
    with pytest.raises(ConfigError, match="no image could be explained") as err:
        explain(cfg)
    message = str(err.value)
    assert f"{broken}: unreadable or corrupt image" in message
    assert f"{folder / 'volume.dcm'}: a volume of 2 frames" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "abc", "true"])
def test_a_limit_that_is_no_number_of_images_is_named(classifier_run, tmp_path, value):  # noqa: F811
    out = tmp_path / "g"
    cfg = explain_cfg(f"run={classifier_run}", f"limit={value}", f"out={out}", "logger=none")
    with pytest.raises(
        ConfigError, match=r"^limit=\S+: expected an integer >= 1, or null \(all\)$"
    ):
        explain(cfg)
    assert not out.exists()
    assert image_limit(None) is None and image_limit(3) == 3
    with pytest.raises(
        ConfigError, match=r"^limit=0: expected an integer >= 1, or null \(64 images\)$"
    ):
        image_limit(0, null_means="64 images")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_an_image_size_too_small_to_draw_is_named(classifier_run, tmp_path, value):  # noqa: F811
    out = tmp_path / "g"
    cfg = explain_cfg(f"run={classifier_run}", f"image_px={value}", f"out={out}", "logger=none")
    with pytest.raises(ConfigError, match=rf"^image_px={value}: expected an integer >= 8$"):
        explain(cfg)
    assert not out.exists()


def test_target_by_name_and_a_bad_split_or_device_are_named(classifier_run, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "g"
    base = (f"run={classifier_run}", f"out={out}", "methods=[saliency]", "limit=1", "logger=none")
    explain(explain_cfg(*base, "target='KL<2'"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "KL<2"  # the name, taken as class 0
    with pytest.raises(DataError, match="^split=nope: expected one of train, val, test$"):
        explain(explain_cfg(*base, "split=nope"))
    with pytest.raises(
        ConfigError, match=r"^device=tpu: expected auto, cpu, cuda or cuda:<index>$"
    ):
        explain(explain_cfg(*base, "device=tpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^device=cuda: CUDA is not available"):
        explain(explain_cfg(*base, "device=cuda"))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    path = save_model(tmp_path / "w.safetensors", torch.nn.Linear(3, 2), "torch.nn.Linear",
                      {"in_features": 3, "out_features": 2})  # fmt: skip
    assert isinstance(load_model(path), torch.nn.Linear)
    path.write_bytes(path.read_bytes()[:40])
    for read in (load_model, read_model_meta):
        with pytest.raises(ArtifactError, match="unreadable safetensors file") as err:
            read(path)
        assert str(err.value).startswith(str(path))


def test_damaged_classifier_weights_exit_2_in_one_line(classifier_run, tmp_path):  # noqa: F811
    run = tmp_path / "knee"
    shutil.copytree(classifier_run, run)
    weights = next((run / "classifier").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    r = run_cli("cfexplain.explain", f"run={run}", "logger=none", "device=cpu", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cfexplain.explain: ") and weights.name in last


def _stub_run() -> SimpleNamespace:
    """A run that claims every stage: the checks below fail before anything is loaded."""
    return SimpleNamespace(has=lambda stage: True, dir=Path("run"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lambdas": "bogus"}, "lambdas"),
        ({"num_frames": 0}, r"counterfactual\.num_frames=0"),
        ({"num_frames": "abc"}, r"counterfactual\.num_frames='abc'"),
        ({"max_batch": -1}, r"counterfactual\.max_batch=-1"),
        ({"refine_steps": -3}, r"refine_steps=-3"),
    ],
)
def test_counterfactual_arguments_name_their_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Counterfactual.from_run(_stub_run(), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            ["methods=[occlusion]", "params.occlusion.window=abc"],
            r"params\.occlusion\.window='abc'",
        ),
        (["methods=[occlusion]", "params.occlusion.stride=0"], r"params\.occlusion\.stride=0"),
        (["methods=[lrp]", "params.lrp.composite=bogus"], r"params\.lrp\.composite='bogus'"),
        (
            ["methods=[integrated_gradients]", "params.integrated_gradients.n_steps=x"],
            r"params\.integrated_gradients\.n_steps='x'",
        ),
    ],
)
def test_method_parameters_name_their_field(classifier_run, tmp_path, overrides, field):  # noqa: F811
    cfg = explain_cfg(f"run={classifier_run}", f"out={tmp_path / 'g'}", "logger=none", *overrides)
    with pytest.raises(ConfigError, match=field):
        explain(cfg)


def test_cli_prints_a_bad_method_parameter_in_one_line(classifier_run, tmp_path):  # noqa: F811
    r = run_cli(
        "cfexplain.explain",
        f"run={classifier_run}",
        "methods=[occlusion]",
        "params.occlusion.window=abc",
        "logger=none",
        "device=cpu",
        f"out={tmp_path / 'g'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("cfexplain.explain: params.occlusion.window='abc'")
    )
