"""The guard on a trained smoke run: images unlike the knees are flagged, the test split is not,
and every page a person reads says so (gallery banner, header counts, CSV, report, guard=skip)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cfexplain.data import build_dataset
from cfexplain.evaluate.__main__ import evaluate
from cfexplain.explain.__main__ import explain
from cfexplain.explain.guard import IN_DISTRIBUTION, UNLIKE_TRAINING, judge
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import Artifact
from tests.conftest import compose_config, smoke_chain
from tests.evaluate.test_command import TINY, evaluate_cfg
from tests.explain.test_command import explain_cfg

FAST = "methods=[counterfactual,gradcam]"


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory) -> Path:
    """The whole default chain (guard included) on the knee smoke preset."""
    runs = tmp_path_factory.mktemp("runs")
    run = smoke_chain(runs)
    assert (run / "guard" / "artifact.json").is_file()
    return run


def _unlike(run: TrainedRun) -> dict[str, torch.Tensor]:
    """Images no knee run was trained on, made here: histology tiles, rotated and inverted
    knees, noise, a constant image (8 each, ``[8, 1, R, R]``)."""
    ds = run.dataset("test")
    knees = torch.stack([ds[i]["image"] for i in range(8)])
    histology_cfg = compose_config("+dataset=histology", "preset=smoke")
    histology_ds = build_dataset(histology_cfg.data, "test")
    tiles = torch.stack([histology_ds[i]["image"] for i in range(8)]).mean(1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    return {
        "histology": tiles,
        "rotated": knees.rot90(1, (2, 3)),
        "inverted": -knees,
        "noise": torch.rand(knees.shape, generator=g) * 2 - 1,
        "constant": torch.zeros_like(knees),
    }


def test_unlike_images_are_flagged_and_the_test_split_is_not(guarded_run):
    run = TrainedRun(guarded_run)
    assert run.artifact("guard").metrics["test/flagged_share"] <= 0.01
    ds = run.dataset("test")
    test = torch.stack([ds[i]["image"] for i in range(len(ds))])
    verdicts = judge(run.guard_models(), test, run.guard)
    assert sum(v.flagged for v in verdicts) <= 0.01 * len(verdicts)
    for kind, x in _unlike(run).items():
        verdicts = judge(run.guard_models(), x, run.guard)
        assert all(v.status == UNLIKE_TRAINING for v in verdicts), (kind, verdicts[0])
        assert all(v.reasons for v in verdicts), kind


def _write_pngs(folder: Path, images: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, x in images.items():
        arr = ((x[0, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()  # the first image
        Image.fromarray(arr).save(folder / f"{name}.png")


def test_gallery_and_report_warn_and_skip(guarded_run, tmp_path):
    run = TrainedRun(guarded_run)
    unlike = _unlike(run)
    ds = run.dataset("test")
    _write_pngs(
        tmp_path / "in",
        {"knee": ds[0]["image"][None], "noise": unlike["noise"][:1], "rotated": unlike["rotated"]},
    )
    out = tmp_path / "warn"
    base = [f"run={guarded_run}", f"images={tmp_path / 'in'}", FAST, "logger=none"]
    explain(explain_cfg(*base, f"out={out}", "reports=[0,1,2]"))
    summary = json.loads((out / "summary.json").read_text())
    statuses = summary["guard"]["statuses"]
    assert summary["guard"]["flagged"] == 2 and statuses.get(IN_DISTRIBUTION) == 1, statuses
    with open(out / "metrics.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["knee.png"]["guard_status"] == IN_DISTRIBUTION
    assert rows["noise.png"]["guard_status"] == UNLIKE_TRAINING
    assert "feature_distance" in rows["rotated.png"]["guard_reasons"]
    html = (out / "index.html").read_text()
    assert html.count('class="guard-banner"') == 2
    assert "2 of 3 images flagged" in html
    assert 'data-filter="guard"' in html
    # The header's flip rate is the in-distribution image's alone; the flagged are apart.
    assert summary["metrics"]["flip_rate"] == float(rows["knee.png"]["flipped"])
    assert "flip_rate" in summary["guard"]["flagged_metrics"]
    report = (out / "reports" / "noise.html").read_text()
    assert "does not look like the images the model was trained on" in report
    assert "does not look like" not in (out / "reports" / "knee.html").read_text()

    skip = tmp_path / "skip"
    explain(explain_cfg(*base, f"out={skip}", "guard=skip"))
    with open(skip / "metrics.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["knee.png"]["flip_index"] != ""  # explained in full
    assert rows["noise.png"]["flip_index"] == "" and rows["rotated.png"]["flip_index"] == ""
    assert not (skip / "images" / "00001" / "sequence.gif").exists()


def test_guard_modes_and_unguarded_runs_are_named(guarded_run, tmp_path):
    from cfexplain.utils.cli import ConfigError

    with pytest.raises(ConfigError, match="guard=loud: choose one of off, warn, skip"):
        explain(explain_cfg(f"run={guarded_run}", "guard=loud", "limit=1", FAST, "logger=none"))
    out = tmp_path / "off"
    explain(
        explain_cfg(f"run={guarded_run}", "guard=off", "limit=2", f"out={out}", FAST, "logger=none")
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["guard"]["statuses"] == {"unchecked": 2}
    assert "guard=off" in summary["guard"]["unchecked"]
    assert "guard=off: no image was checked" in (out / "index.html").read_text()
    assert summary["guard"]["flagged"] == 0


def test_long_and_repeated_names_get_their_own_reports(guarded_run, tmp_path):
    """A legal 244-byte file name, and scan.png in two folders: one report each, none lost."""
    run = TrainedRun(guarded_run)
    knee = run.dataset("test")[0]["image"][None]
    long_name = "é" * 118 + "x.png"  # 241 bytes of UTF-8 + ".png": legal on Linux
    assert len(long_name.encode()) <= 255
    _write_pngs(tmp_path / "in" / "a", {"scan": knee, long_name.removesuffix(".png"): knee})
    _write_pngs(tmp_path / "in" / "b", {"scan": knee})
    out = tmp_path / "g"
    overrides = [f"run={guarded_run}", f"images={tmp_path / 'in'}/**/*.png", f"out={out}"]
    explain(explain_cfg(*overrides, FAST, "logger=none", "reports=[0,1,2]"))
    reports = sorted(p.name for p in (out / "reports").glob("*.html"))
    assert len(reports) == 3 and "scan.html" in reports and "scan_2.html" in reports
    assert all(len(p.encode()) < 200 for p in reports)


def test_a_generator_missing_the_classifiers_evidence_is_named_on_the_page(guarded_run, tmp_path):
    art = Artifact.load(guarded_run / "guard")
    gap = art.metrics["evidence_gap"]
    cal = TrainedRun(guarded_run).guard
    assert gap == pytest.approx(cal.evidence_gap) and gap > 0
    assert "evidence_loss" in cal.thresholds
    stats = cal.stats["evidence_loss"]
    assert stats["threshold"] > stats["generated_q50"]  # calibrated on G's own samples
    out = tmp_path / "quiet"
    explain(explain_cfg(f"run={guarded_run}", "limit=1", f"out={out}", FAST, "logger=none"))
    quiet = "does not redraw part of what the classifier reads" in (out / "index.html").read_text()
    assert quiet == (gap > cal.evidence_limit)
    # The same run recalibrated with a limit below its gap: the page must say it.
    copy = tmp_path / "runs" / "knee"
    shutil.copytree(guarded_run, copy)
    smoke_chain(copy.parent, "stages=[guard]", f"guard.evidence_gap={gap / 2}")
    assert TrainedRun(copy).guard.evidence_limit == pytest.approx(gap / 2)
    out = tmp_path / "loud"
    explain(explain_cfg(f"run={copy}", "limit=1", f"out={out}", FAST, "logger=none"))
    summary = json.loads((out / "summary.json").read_text())
    assert any("does not redraw part of what the classifier reads" in n for n in summary["notes"])
    assert "does not redraw part of what the classifier reads" in (out / "index.html").read_text()
    # The evaluation of the run says it as well: its counterfactual numbers share the blind spot.
    page = evaluate(
        evaluate_cfg(f"run={copy}", "methods=[gradcam]", *TINY, f"out={tmp_path / 'ev'}")
    )
    summary = json.loads((page.parent / "summary.json").read_text())
    assert summary["evidence_gap"] == pytest.approx(gap)
    assert any("does not redraw part of what the classifier reads" in n for n in summary["notes"])
