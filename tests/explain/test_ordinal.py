"""The ordinal walk end to end: a 5-grade (``data.task=kl``) smoke classifier with generative
stages and an ordinal direction; gallery rows, metrics, report and the W&B table read back."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from cfexplain.explain.__main__ import explain
from tests.conftest import smoke_chain
from tests.explain.test_command import add_generative_stages, explain_cfg, logged_table
from tests.utils.test_tracking import finished_run_records


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory) -> Path:
    """A smoke KL-grade classifier plus untrained G, E, normative and a direction stage with
    per-class and ordinal directions, as the direction stage writes them for 5 classes."""
    runs = tmp_path_factory.mktemp("runs")
    trained = smoke_chain(runs, "stages=[classifier]", "data.task=kl", "experiment=kl")
    run = tmp_path_factory.mktemp("full") / "kl"
    shutil.copytree(trained.parent / "kl" / "classifier", run / "classifier")
    return add_generative_stages(
        run,
        lambda: {
            "directions": torch.randn(5, 16),
            "ordinal": torch.randn(16),
            "lambda_range": torch.tensor([2.0, 2.5, 3.0, 2.5, 2.0]),
        },
    )


def test_kl_gallery_report_and_wandb_table_show_the_ordinal_walk(kl_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "g"
    with pytest.warns(UserWarning, match="random"):
        explain(
            explain_cfg(
                f"run={kl_run}",
                f"out={out}",
                "limit=3",
                "batch_size=2",
                "methods=[counterfactual,gradcam]",
                "counterfactual.num_frames=5",
                "+counterfactual.bisect_steps=6",
                "target=4",
                "reports=[0]",
            )
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["KL0", "KL1", "KL2", "KL3", "KL4"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for r in rows:
        assert r["grade_rises"] in ("0.0", "1.0")
        assert 0.0 <= float(r["grade_first"]) <= 4.0 and r["argmax_last"] in {
            f"{k}.0" for k in range(5)
        }
    rises = [float(r["grade_rises"]) for r in rows]
    assert summary["metrics"]["mean_grade_rises"] == pytest.approx(sum(rises) / 3)
    page = (out / "index.html").read_text()
    assert (
        page.count("<figcaption>grade vs λ</figcaption>") == 3 and page.count('class="frame"') == 15
    )
    assert "E=" in page and "KL" in page
    for i in range(3):
        for name in ("grade_plot.png", "effect.png", "focused.png"):
            assert (out / "images" / f"{i:05d}" / name).is_file(), name
    # what moves the expected grade, and the walk reduced to it, with its grade
    assert page.count("<figcaption>what f reacts to</figcaption>") == 3
    assert page.count("<figcaption>only that · E=") == 3
    (report,) = (out / "reports").glob("*.html")
    assert "most likely KL" in report.read_text() and "Grade at every step" in report.read_text()
    # The W&B table, read back from the offline run's files: grades per frame and the plot.
    records = finished_run_records(Path(summary["wandb_dir"]))
    table, entries = logged_table(records)
    columns = table["columns"]
    assert {"frame_grades", "frame_argmax", "grade_plot", "grade_rises"} <= set(columns)
    for row, csv_row in zip(table["data"], rows):
        grades = json.loads(row[columns.index("frame_grades")])
        argmax = json.loads(row[columns.index("frame_argmax")])
        assert len(grades) == len(argmax) == 5 and all(0 <= g <= 4 for g in grades)
        assert grades[0] == pytest.approx(float(csv_row["grade_first"]), abs=1e-4)
        assert argmax[-1] == int(float(csv_row["argmax_last"]))
        for col in ("grade_plot", "effect", "focused"):
            cell = row[columns.index(col)]
            assert cell["_type"] == "image-file" and entries[cell["path"]].is_file()
        assert 0.0 <= row[columns.index("focused_score")] <= 4.0


def test_walk_target_keeps_the_per_class_walk_and_ordinal_needs_a_direction(kl_run, tmp_path):
    from cfexplain.utils.cli import ConfigError

    out = tmp_path / "t"
    with pytest.warns(UserWarning, match="random"):
        explain(
            explain_cfg(
                f"run={kl_run}",
                f"out={out}",
                "limit=2",
                "methods=[counterfactual]",
                "counterfactual.walk=target",
                "lambdas=symmetric",
                "counterfactual.num_frames=3",
                "target=4",
                "logger=none",
            )  # fmt: skip
        )
    with open(out / "metrics.csv", newline="") as f:
        assert "grade_rises" not in next(csv.DictReader(f))
    with pytest.raises(ConfigError, match="counterfactual.walk=sideways"):
        explain(
            explain_cfg(
                f"run={kl_run}",
                f"out={tmp_path / 'x'}",
                "counterfactual.walk=sideways",
                "logger=none",
            )
        )


def test_evaluation_reports_the_grade_and_the_factors_along_the_walk(kl_run):
    from cfexplain.evaluate.__main__ import evaluate
    from tests.evaluate.test_command import TINY, evaluate_cfg

    index = evaluate(evaluate_cfg(f"run={kl_run}", "methods=[counterfactual]", "target=4", *TINY))
    summary = json.loads((index.parent / "summary.json").read_text())
    o = summary["counterfactual"]["ordinal"]
    assert o["images"] == 8 and 0.0 <= o["grade_rises_share"] <= 1.0
    assert len(o["mean_grade_per_frame"]) == 5 and sum(o["argmax_last_histogram"]) == 8
    for f in ("jsw_min", "osteophyte", "sclerosis", "deformity"):
        assert len(o[f"{f}_per_frame"]) == 5
        assert 0.0 <= o[f"{f}_moves_with_grade_share"] <= 1.0
    assert "Ordinal walk" in index.read_text()
    walk = summary["counterfactual"]["realism_fixed_fd_walk_frames"]
    assert walk >= 0.0 or walk != walk  # a number, or NaN when no grade has 2 frames and 2 reals
    with open(index.parent / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["counterfactual/grade_rises"] for r in rows} <= {"0.000", "1.000"}
