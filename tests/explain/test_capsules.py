"""Explaining a capsule classifier: attribute readings beside their ground truth, each capsule's
reconstruction, the counterfactual frames' readings, in the gallery, CSV, W&B table and report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from cfexplain.explain.__main__ import explain
from cfexplain.explain.gallery import Concepts, GalleryWriter, concepts_html
from cfexplain.nn.capsules import CapsuleClassifier
from tests.conftest import smoke_chain
from tests.explain.test_command import classifier_run, explain_cfg, full_run  # noqa: F401
from tests.explain.test_gallery import make_row

NAMES = ["narrowing_medial", "narrowing_lateral", "osteophytes", "sclerosis", "deformity"]


@pytest.fixture(scope="module")
def capsule_run(full_run, tmp_path_factory) -> Path:  # noqa: F811
    """The untrained counterfactual stages of ``full_run`` around a smoke capsule classifier."""
    trained = smoke_chain(
        tmp_path_factory.mktemp("caps"), "stages=[classifier]", "classifier=capsules"
    )
    run = tmp_path_factory.mktemp("capsrun") / "knee"
    shutil.copytree(full_run, run)
    shutil.rmtree(run / "classifier")
    shutil.copytree(trained / "classifier", run / "classifier")
    return run


def capsule_gallery(run: Path, out: Path, *extra: str) -> Path:
    with pytest.warns(UserWarning, match="random"):  # the untrained perceptual net
        return explain(
            explain_cfg(
                f"run={run}",
                f"out={out}",
                "limit=3",
                "batch_size=2",
                "methods=[counterfactual,gradcam,saliency,lrp,cam]",
                "lambdas=symmetric",
                "counterfactual.num_frames=5",
                "logger=none",
                *extra,
            )
        )


def test_gallery_shows_readings_truth_reconstructions_and_frame_readings(capsule_run, tmp_path):
    from cfexplain.data import build_dataset

    out = tmp_path / "g"
    capsule_gallery(capsule_run, out, "reports=[0]")
    summary = json.loads((out / "summary.json").read_text())
    # grad-CAM and saliency run on the capsules; LRP and CAM say why they do not apply
    assert summary["methods"] == ["gradcam", "saliency"]
    notes = " ".join(summary["notes"])
    assert "lrp does not apply" in notes and "routes by agreement" in notes
    assert "cam does not apply" in notes
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test = build_dataset(
        {**_data(capsule_run), "n_test": 3}, "test"
    )  # the run's own test images, in order
    for i, row in enumerate(rows):
        truth = test[i]["meta"]["concepts"]
        for name in NAMES:
            assert 0 <= float(row[f"concept_{name}"]) < 1
            assert float(row[f"concept_{name}_true"]) == pytest.approx(truth[name], abs=1e-6)
        folder = out / "images" / f"{i:05d}"
        assert len(list(folder.glob("capsule_*.png"))) == len(NAMES)
    page = (out / "index.html").read_text()
    assert page.count('<table class="concepts">') == 3
    assert page.count('data-attribute="osteophytes"') == 3
    assert page.count("λ=") >= 3 * 5  # one reading column per counterfactual frame
    report = next((out / "reports").glob("*.html")).read_text()
    assert "What it saw, finding by finding" in report and "osteophytes capsule" in report


def _data(run: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "classifier" / "config.yaml").data)


def test_readings_of_the_frames_are_the_capsules_on_those_frames(capsule_run, tmp_path):
    from cfexplain.explain.pipeline import capsule_concepts
    from cfexplain.nn.classifier import load_classifier

    net = load_classifier(capsule_run / "classifier")
    assert isinstance(net, CapsuleClassifier)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    frames = {1: torch.rand(4, 1, 32, 32) * 2 - 1}
    got = capsule_concepts(net, x, [{n: 0.5 for n in NAMES}, None], frames)
    assert got[0].truth == [0.5] * 5 and got[1].truth is None
    assert got[0].frames is None and len(got[1].frames) == 4
    with torch.no_grad():
        assert torch.allclose(torch.tensor(got[1].frames), net.attribute_values(frames[1]))
        assert torch.allclose(torch.tensor(got[0].values), net.attribute_values(x[:1])[0])
    assert got[0].images.shape == (5, 1, 32, 32)


def concept_row(name: str = "a.png"):
    row = make_row(name)
    row.concepts = Concepts(
        names=["narrowing", "<b>spur</b>"],
        values=[0.25, 0.75],
        truth=[0.0, 1.0],
        images=torch.rand(2, 1, 16, 16) * 2 - 1,
        frames=[[0.1 * k, 0.9 - 0.1 * k] for k in range(5)],
    )
    return row


def test_writer_adds_concept_columns_to_csv_and_wandb_table_and_escapes_names(tmp_path):
    w = GalleryWriter(tmp_path / "g", target="sick", size=16)
    w.add_batch([concept_row(), make_row("plain.png")], {"run": "r"})
    w.close({"run": "r"}, {})
    with open(tmp_path / "g" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["concept_narrowing"] == "0.25" and rows[0]["concept_<b>spur</b>_true"] == "1.0"
    assert rows[1]["concept_narrowing"] == ""  # a row without capsules leaves them empty
    columns, table = w.table()
    assert {"concept_narrowing", "capsule_narrowing", "frame_concepts"} <= set(columns)
    frames = json.loads(table[0][columns.index("frame_concepts")])
    assert frames["narrowing"] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert table[0][columns.index("capsule_narrowing")].is_file()
    html = concepts_html(concept_row())
    assert "<b>spur</b>" not in html and "&lt;b&gt;spur&lt;/b&gt;" in html
    assert html.count("<tr") == 3 and "λ=+1.0 ★" in html  # header, two attributes; the flip


def test_capsule_images_are_written_atomically(tmp_path, monkeypatch):
    from cfexplain.utils import artifacts

    real, written = artifacts.atomic_write, []

    def atomic_write(path, write):
        written.append(Path(path).name)
        return real(path, write)

    monkeypatch.setattr(artifacts, "atomic_write", atomic_write)
    w = GalleryWriter(tmp_path / "g", target="sick", size=16)
    w.add_batch([concept_row()], {"run": "r"})
    assert {"capsule_00.png", "capsule_01.png"} <= set(written)
    folder = tmp_path / "g" / "images" / "00000"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left
