"""``python -m cfexplain.evaluate`` on a smoke run: the table, its files, the checks' verdicts."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from cfexplain.evaluate.__main__ import evaluate
from cfexplain.explain.__main__ import ConfigError
from tests.explain.test_command import classifier_run, full_run  # noqa: F401 (fixtures)

METHODS = "methods=[counterfactual,gradcam,saliency,cam,normative]"
TINY = [
    "limit=8",
    "batch_size=4",
    "deletion.steps=4",
    "randomisation.images=2",
    "randomisation.direction_samples=64",
    "oracle.n_train=128",
    "oracle.n_test=64",
    "oracle.steps=20",
    "oracle.batch_size=32",
    "counterfactual.num_frames=5",
    "realism.min_count=2",
    "cout_steps=8",
]


def evaluate_cfg(*overrides: str, logger: str = "none") -> DictConfig:
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(
            config_name="evaluate", overrides=["device=cpu", f"logger={logger}", *overrides]
        )


@pytest.fixture(scope="module")
def evaluated(full_run) -> Path:  # noqa: F811
    return evaluate(evaluate_cfg(f"run={full_run}", METHODS, *TINY))


def test_table_has_every_method_and_metric(evaluated):
    out = evaluated.parent
    assert out.name == "evaluation" and not out.with_name("evaluation.partial").exists()
    for f in ("table.csv", "table.md", "per_image.csv", "summary.json", "randomisation.png"):
        assert (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["method"] for r in rows] == [
        "counterfactual",
        "gradcam",
        "saliency",
        "cam",
        "normative",
    ]
    summary = json.loads((out / "summary.json").read_text())
    for name, row in summary["table"].items():
        assert 0.0 <= row["deletion_auc"] <= 1.0 and 0.0 <= row["insertion_auc"] <= 1.0, name
        assert row["sanity"] in ("pass", "FAIL")
    # The normative residual never reads the classifier: randomising it cannot change the map.
    assert summary["table"]["normative"]["sanity"] == "FAIL"
    assert summary["table"]["normative"]["randomisation_cascade"] > 0.99
    cf = summary["counterfactual"]
    assert 0.0 <= cf["flip_rate"] <= 1.0 and cf["mnac"] >= 0.0
    assert set(cf["mean_change"]) == set(summary["oracle"]["factors"])
    assert -1.0 <= cf["cout"] <= 1.0
    # The fixed yardstick: each set against the real images of its class (8 images, 2 classes).
    for key in ("flip_frames", "reconstructions"):
        assert cf[f"realism_fixed_fd_{key}"] >= 0.0, key
    # Halves of 8 images leave a class with fewer than 2 on a side: NaN, never a made-up number.
    halves = cf["realism_fixed_fd_real_halves"]
    assert math.isnan(halves) or halves >= 0.0
    assert cf["realism_fixed_fd_ratio"] == pytest.approx(
        cf["realism_fixed_fd_flip_frames"] / cf["realism_fixed_fd_reconstructions"]
    )
    # Decisive exposure asks for a changed marker and more: never above the plain exposure.
    decisive = cf["marker_exposure_decisive"]
    assert 0.0 <= decisive <= summary["table"]["counterfactual"]["marker_exposure"] + 1e-9
    # The "what f reacts to" tile, judged like a heatmap on the marker (oracle-free).
    assert 0.0 <= cf["marker_exposure_effect"] <= 1.0
    assert 0.0 <= cf["marker_exposure_effect_corners"] <= 1.0
    # ... and the counterfactual reduced to what f reacts to, read by the oracle.
    assert 0.0 <= cf["marker_exposure_focused"] <= 1.0
    assert "focus_sufficiency_median" in cf
    reliance = summary["marker_reliance"]
    assert 0.0 <= reliance["accuracy_marker_removed"] <= 1.0
    assert summary["evidence_gap"] is None  # no guard stage (tests/explain/test_guard_run.py)
    per_image = list(csv.reader((out / "per_image.csv").open()))
    assert len(per_image) == 1 + 8
    assert "counterfactual/focused_marker_changed" in per_image[0]
    page = (out / "index.html").read_text()
    assert "cfexplain evaluation" in page and "randomisation.png" in page


def test_oracle_is_cached_and_a_rerun_replaces_the_folder(full_run, evaluated):  # noqa: F811
    before = (full_run.parent / "oracles" / "knee_32px" / "oracle.json").stat().st_mtime_ns
    again = evaluate(evaluate_cfg(f"run={full_run}", "methods=[cam]", *TINY))
    assert (full_run.parent / "oracles" / "knee_32px" / "oracle.json").stat().st_mtime_ns == before
    rows = list(csv.DictReader((again.parent / "table.csv").open()))
    assert [r["method"] for r in rows] == ["cam"]


def test_errors_name_the_field(classifier_run, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="images="):
        evaluate(evaluate_cfg(f"run={classifier_run}", "images=x.png"))
    with pytest.raises(ConfigError, match="run="):
        evaluate(evaluate_cfg(f"run={tmp_path}"))
    out = tmp_path / "e"
    for bad, message in [
        ("deletion.steps=0", "deletion.steps=0: expected an integer >= 1"),
        ("cout_steps=-1", "cout_steps=-1: expected an integer >= 1"),
        ("mnac_threshold=0", "mnac_threshold=0: expected a number > 0"),
        ("marker_decisive=1.5", "marker_decisive=1.5: expected a number >= 0 and <= 1"),
        (
            "randomisation.threshold=2",
            "randomisation.threshold=2: expected a number >= -1 and <= 1",
        ),
    ]:  # each read minutes into an evaluation: named before the run is opened
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            evaluate(evaluate_cfg(f"run={tmp_path / 'none'}", bad, f"out={out}"))
        assert not out.exists()


def test_wandb_offline_table_has_one_row_per_method(classifier_run, tmp_path, monkeypatch):  # noqa: F811

    from tests.utils.test_tracking import finished_run_records

    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger.mode=offline, the default
    index = evaluate(
        evaluate_cfg(
            f"run={classifier_run}",
            "methods=[cam,saliency]",
            f"out={tmp_path / 'e'}",
            *TINY,
            logger="wandb",
        )
    )
    summary = json.loads((index.parent / "summary.json").read_text())
    records = finished_run_records(Path(summary["wandb_dir"]))
    (art,) = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table"
    ]
    (table_file,) = [
        Path(c.local_path) for c in art.manifest.contents if c.path.endswith(".table.json")
    ]
    table = json.loads(table_file.read_text())
    assert table["columns"][0] == "method" and "deletion_auc" in table["columns"]
    assert [row[0] for row in table["data"]] == ["cam", "saliency"]
