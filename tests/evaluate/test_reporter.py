"""``evaluate methods=[...,report]``: BLEU-4, findings read back and word pointing on the page."""

from __future__ import annotations

import json

from cfexplain.evaluate.__main__ import evaluate
from tests.evaluate.test_command import TINY, evaluate_cfg
from tests.explain.test_command import classifier_run  # noqa: F401 (fixture)
from tests.explain.test_reporter import reporter_run  # noqa: F401 (fixture)


def test_evaluation_page_has_the_reporter_section_beside_the_heatmaps(reporter_run):  # noqa: F811
    index = evaluate(evaluate_cfg(f"run={reporter_run}", "methods=[cam,report]", *TINY))
    summary = json.loads((index.parent / "summary.json").read_text())
    assert list(summary["table"]) == ["cam", "report"]
    # The report's attention never reads the classifier: randomising it leaves the map alone.
    assert summary["table"]["report"]["randomisation_cascade"] > 0.99
    rep = summary["reporter"]
    assert rep["images"] == 8 and 0.0 <= rep["bleu4"] <= 1.0
    assert 0.0 <= rep["finding_accuracy"] <= 1.0 and "accuracy/osteophyte" in rep
    assert rep["decode"] == "greedy" and rep["span"] == "peak"
    page = index.read_text()
    assert "Generated reports (reporter stage)" in page and "finding_accuracy" in page
