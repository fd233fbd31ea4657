"""explain methods=[...,report]: the written report under each image, a heatmap per finding
word in the gallery, the CSV, the W&B table and the per-image report page."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from cfexplain.explain.__main__ import explain
from cfexplain.explain.gallery import GalleryWriter
from cfexplain.explain.reporter import WordMap, WrittenReport, report_map
from tests.conftest import smoke_chain
from tests.explain.test_command import classifier_run, explain_cfg  # noqa: F401 (fixture)
from tests.explain.test_gallery import EVIL, make_row


def written(size: int = 16) -> WrittenReport:
    """A report with two present findings and one absent, each word's map one bright pixel."""

    def spot(r: int, c: int) -> torch.Tensor:
        m = torch.zeros(size, size)
        m[r, c] = 1.0
        return m

    return WrittenReport(
        f"Large osteophyte formation. Severe medial joint-space narrowing. {EVIL} No sclerosis.",
        [
            WordMap("osteophyte", 1, "osteophyte", True, spot(2, 3)),
            WordMap("narrowing", 8, "joint_space", True, spot(8, 8)),
            WordMap("sclerosis", 11, "sclerosis", False, spot(0, 0)),
        ],
    )


def report_row(name: str = "a.png"):
    row = make_row(name, counterfactual=False)
    row.report = written()
    return row


def test_gallery_row_table_and_csv_carry_the_report_and_word_maps(tmp_path):
    w = GalleryWriter(tmp_path / "g", target="sick", size=32)
    w.add_batch([report_row(), make_row("plain.png", counterfactual=False)], {"run": "r"})
    index = w.close({"run": "r"}, {})
    html = index.read_text()
    # The text is escaped (the evil name inside it stays text), the words are captions.
    assert "<b>report:</b> Large osteophyte formation." in html and "<img src=x" not in html
    assert "sclerosis (absent)" in html and ">osteophyte</figcaption>" in html
    folder = tmp_path / "g" / "images" / "00000"
    for col in ("report_osteophyte", "report_narrowing", "report_sclerosis"):
        assert (folder / f"{col}.png").is_file()
    assert not list((tmp_path / "g" / "images" / "00001").glob("report_*"))
    columns, table = w.table()
    assert {"report", "report_osteophyte", "report_narrowing"} <= set(columns)
    first, second = (dict(zip(columns, r)) for r in table)
    assert first["report"] == written().text and Path(first["report_narrowing"]).is_file()
    assert second["report"] is None  # a row without a report leaves its cells empty
    with open(tmp_path / "g" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["report"] == written().text


def test_a_repeated_word_gets_its_own_column_and_the_map_is_the_present_words_mean():
    r = written()
    r.words.append(WordMap("narrowing", 14, "joint_space", True, torch.zeros(16, 16)))
    assert [c for c, _ in r.word_columns()] == [
        "report_osteophyte",
        "report_narrowing",
        "report_sclerosis",
        "report_narrowing_2",
    ]
    m = report_map(r, (16, 16))
    assert m.shape == (1, 16, 16)
    # Present words only: osteophyte, narrowing and the second narrowing (absent sclerosis out).
    assert m[0, 2, 3] == pytest.approx(1 / 3) and m[0, 0, 0] == 0.0
    assert report_map(WrittenReport("", []), (4, 4)).abs().sum() == 0


@pytest.fixture(scope="module")
def reporter_run(classifier_run, tmp_path_factory):  # noqa: F811
    """The smoke classifier run with a smoke reporter stage beside it."""
    runs = tmp_path_factory.mktemp("reporter")
    run = smoke_chain(runs, "stages=[reporter]")
    shutil.copytree(classifier_run / "classifier", run / "classifier")
    return run


def test_explain_methods_report_writes_text_word_maps_and_report_pages(reporter_run, tmp_path):
    out = tmp_path / "g"
    explain(
        explain_cfg(
            f"run={reporter_run}",
            f"out={out}",
            "limit=3",
            "batch_size=2",
            "methods=[gradcam,report]",
            "reports=[1]",
            "logger=none",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["gradcam", "report"] and summary["notes"] == []
    html = (out / "index.html").read_text()
    assert html.count('<div class="report">') == 3
    assert (out / "images" / "00000" / "map_report.png").is_file()
    with open(out / "metrics.csv", newline="") as f:
        assert all(r["report"] for r in csv.DictReader(f))
    pages = list((out / "reports").glob("*.html"))
    assert len(pages) == 1 and "What a report-writing model wrote" in pages[0].read_text()


def test_report_without_a_reporter_stage_is_a_note(classifier_run, tmp_path):  # noqa: F811
    out = tmp_path / "g"
    explain(
        explain_cfg(
            f"run={classifier_run}", f"out={out}", "limit=2", "methods=[cam,report]", "logger=none"
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["cam"]
    assert any("no reporter stage" in n and "stages=[reporter]" in n for n in summary["notes"])
