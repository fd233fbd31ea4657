"""Reports from the phantoms' factors: deterministic per sample, every finding true, read back;
a CSV manifest's reports column."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cfexplain.data import build_dataset
from cfexplain.data.phantoms import HistologyPhantom, KneePhantom
from cfexplain.data.readers import DataError, open_dataset
from cfexplain.data.reports import (
    FINDING_MASKS,
    detokenize,
    findings_of,
    parse_report,
    tokenize,
    write_report,
)


def test_knee_reports_state_every_finding_of_the_factors_and_the_grade():
    ds = KneePhantom(60, resolution=16, seed=3, split="val", supersample=1)
    levels: dict[str, set[int]] = {}
    phrasings = set()
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        truth = findings_of("knee", meta["factors"])
        assert parse_report("knee", meta["report"]) == {**truth, "kl_grade": meta["grade"]}
        for name, level in truth.items():
            levels.setdefault(name, set()).add(level)
        phrasings.update(s.strip() for s in meta["report"].split("."))
    # The sample spans every level of the findings, and a level has several phrasings.
    assert levels["osteophyte"] == {0, 1, 2} and levels["marker"] == {0, 1}
    assert levels["narrowing_medial"] == {0, 1, 2} and levels["sclerosis"] == {0, 1, 2}
    negatives = {p for p in phrasings if "osteophyte" in p.lower() and p.lower().startswith("no")}
    assert len(negatives) == 2


def test_the_report_is_the_same_for_the_same_sample_and_varies_across_samples():
    a = KneePhantom(30, resolution=16, seed=1, supersample=1)
    b = KneePhantom(30, resolution=16, seed=1, supersample=1, cache=False)
    reports = [a[i]["meta"]["report"] for i in range(30)]
    assert reports == [b[i]["meta"]["report"] for i in range(30)]
    assert len(set(reports)) > 20
    factors = a.params(0)[0]
    # Same factors, other seed: other words for the same findings (at least once in a few seeds).
    texts = {write_report("knee", factors, (1, 0, s)) for s in range(8)}
    assert len(texts) > 1
    assert all(parse_report("knee", t) == findings_of("knee", factors) for t in texts)
    # A counterfactual render's report follows the overridden factors.
    cf = a.render(0, {"osteophyte": 0.11, "marker": 1.0})["meta"]
    found = parse_report("knee", cf["report"])
    assert found["osteophyte"] == 2 and found["marker"] == 1


def test_histology_reports_match_tumour_nuclei_and_lymphocytes():
    ds = HistologyPhantom(24, resolution=16, seed=0, split="test")
    seen = set()
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        found = parse_report("histology", meta["report"])
        assert found == findings_of("histology", meta["factors"])
        assert (found["tumour"] > 0) == (ds[i]["label"] == 1)
        seen.add(found["tumour"])
    assert seen == {0, 1, 2}


def test_tokens_round_trip_and_the_parser_ignores_what_it_does_not_know():
    text = "Moderate medial joint-space narrowing. No osteophytes. KL grade 3."
    tokens = tokenize(text)
    assert tokens[:4] == ["moderate", "medial", "joint-space", "narrowing"] and tokens[-1] == "."
    assert detokenize(tokens) == text
    parsed = parse_report(
        "knee", text + " Something else. No osteophytes. Large osteophyte formation."
    )
    # First statement wins; unknown sentences are left out; unstated findings are absent.
    assert parsed == {"narrowing_medial": 1, "osteophyte": 0, "kl_grade": 3}
    assert {"osteophyte", "narrowing", "sclerosis", "marker"} <= set(FINDING_MASKS)
    with pytest.raises(ValueError, match="report kind"):
        parse_report("chest", text)


def _csv(tmp_path, header: str, rows: list[str]):
    for i in range(len(rows)):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def test_csv_reports_column_reaches_meta_and_bad_columns_name_the_file(tmp_path):
    manifest = _csv(
        tmp_path,
        "path,label,split,Findings",
        [
            '0.png,0,train,"No osteophytes. KL grade 0."',
            "1.png,1,train,Large osteophyte formation.",
        ],
    )
    ds = open_dataset(manifest, "train", resolution=8, channels=1, reports="findings")
    assert [ds[i]["meta"]["report"] for i in range(2)] == [
        "No osteophytes. KL grade 0.",
        "Large osteophyte formation.",
    ]
    assert "report" not in open_dataset(manifest, "train", resolution=8, channels=1)[0]["meta"]
    with pytest.raises(DataError, match=r"m\.csv: no 'text' column \(data\.reports\)"):
        open_dataset(manifest, "train", resolution=8, channels=1, reports="text")
    manifest.write_text("path,label,split,findings\n0.png,0,train,\n")
    with pytest.raises(DataError, match=r"m\.csv line 2: empty 'findings' cell"):
        open_dataset(manifest, "train", resolution=8, channels=1, reports="findings")
    # Through the config: +dataset=csv data.reports=<column>.
    data = {
        "root": str(manifest),
        "format": "auto",
        "resolution": 8,
        "channels": 1,
        "classes": None,
        "on_bad_file": "error",
        "task": "multiclass",
        "reports": "nope",
    }
    with pytest.raises(DataError, match="data.reports"):
        build_dataset(data, "train")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train.png")
    with pytest.raises(DataError, match="only a CSV manifest"):
        open_dataset(tmp_path, "train", format="folder", resolution=8, channels=1, reports="x")
