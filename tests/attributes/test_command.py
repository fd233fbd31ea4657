"""``python -m cfexplain.attributes`` on a run with real (untrained) G and E, and what explain
shows of its attributes: gallery strips, metrics.csv, the W&B table and the per-image report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from cfexplain.attributes.__main__ import ConfigError, attributes
from cfexplain.explain.__main__ import explain
from cfexplain.explain.attributes import AttributeSet, render, to_styles
from cfexplain.explain.attribution import Attributes
from cfexplain.explain.counterfactual import CounterfactualEngine, project
from cfexplain.explain.pipeline import method_params
from cfexplain.runs import TrainedRun
from tests.conftest import run_cli
from tests.explain.test_command import (  # noqa: F401 (fixtures)
    classifier_run,
    explain_cfg,
    full_run,
    logged_table,
)
from tests.utils.test_tracking import finished_run_records

TINY = ("limit=3", "k=2", "std_samples=64", "batch_size=64", "shift=4", "logger=none")


def attributes_cfg(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name="attributes", overrides=["device=cpu", *overrides])


@pytest.fixture(scope="module")
def attr_run(full_run) -> Path:  # noqa: F811
    table = attributes(attributes_cfg(f"run={full_run}", *TINY))
    assert table == full_run / "attributes" / "attributes.csv"
    return full_run


def test_command_writes_the_attributes_into_the_run(attr_run):
    folder = attr_run / "attributes"
    run = TrainedRun(attr_run)
    assert run.has("attributes") and not list(attr_run.glob(".attributes*"))
    found = run.attributes
    assert isinstance(found, AttributeSet) and found.shift == 4.0
    assert found.info["images"] == 3 and found.info["source"] == "encoded"
    assert sorted({a.cls for a in found.attributes}) == [0, 1]
    assert len(found.of_class(1)) == 2 and len(found.std) == found.layout.size
    with open(folder / "attributes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], int(r["channel"])) for r in rows] == [
        (a.layer, a.channel) for a in found.attributes
    ]
    # the effect the table gives is the one the shift has on the same images, whose latents
    # are refined as the counterfactual's (the default refine_steps)
    assert found.info["refine_steps"] == 100
    a = found.of_class(1)[0]
    ds = run.dataset("test")
    x = torch.stack([ds[i]["image"] for i in range(3)])
    w = project(run.generator, run.encoder, x, 100, run.perceptual)
    with torch.no_grad():
        s = to_styles(run.generator, w)
        moved = s.clone()
        moved[:, a.coordinate] += found.step(a)

        def log_odds(s):
            z = run.classifier(render(run.generator, s)).float()
            return z[:, 1] - z[:, 0]

        delta = log_odds(moved) - log_odds(s)
    pred = run.classifier(render(run.generator, s)).argmax(1)
    images = pred != 1 if (pred != 1).any() else torch.ones(3, dtype=torch.bool)
    assert float(delta[images].mean()) == pytest.approx(a.effect, abs=1e-4)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["style_coordinates"] == found.layout.size
    assert "| rank |" in (folder / "attributes.md").read_text()


def test_attribute_strips_start_from_the_counterfactuals_refined_latents(attr_run):
    run = TrainedRun(attr_run)
    ds = run.dataset("test")
    x = torch.stack([ds[i]["image"] for i in range(3)])
    # explain hands its refine_steps to the strips as to the counterfactual
    params = method_params(explain_cfg(f"run={attr_run}", "refine_steps=7"))
    assert (
        params["attributes"][1]["refine_steps"] == 7 == params["counterfactual"][1]["refine_steps"]
    )
    kw = dict(top=1, num_frames=3, max_batch=64)  # one pass, as the engine's
    plain = Attributes.from_run(run, **kw, refine_steps=0).strips(x, 1)
    refined = Attributes.from_run(run, **kw, refine_steps=20).strips(x, 1)
    cf = CounterfactualEngine.from_run(run)(x, lambdas=[0.0], refine_steps=20)
    assert torch.allclose(refined.reconstruction, cf.reconstruction, atol=1e-5)
    error = lambda r: run.perceptual(r, x)  # noqa: E731
    assert (error(refined.reconstruction) < error(plain.reconstruction)).all()
    # in two passes the same up to rounding, which Adam's normalised steps can grow (2e-3 seen)
    halves = Attributes.from_run(run, top=1, num_frames=3, max_batch=2, refine_steps=20)
    assert torch.allclose(halves.strips(x, 1).reconstruction, cf.reconstruction, atol=2e-2)


def test_explain_projects_each_image_once_for_the_counterfactual_and_the_strips(attr_run):
    from cfexplain.explain.pipeline import build_methods, explain_batch

    run = TrainedRun(attr_run)
    ds = run.dataset("test")
    x = torch.stack([ds[i]["image"] for i in range(3)])
    cfg = explain_cfg(
        f"run={attr_run}", "refine_steps=5", "methods=[counterfactual,attributes]",
        "counterfactual.num_frames=3", "params.attributes.top=1", "params.attributes.num_frames=3",
    )  # fmt: skip
    methods = build_methods(cfg, run, [])
    encoded: list[int] = []
    hook = run.encoder.register_forward_hook(lambda m, i, o: encoded.append(len(i[0])))
    try:
        rows = explain_batch(run, methods, x, ["a", "b", "c"], [None] * 3, target=1)
    finally:
        hook.remove()
    assert sum(encoded) == 3  # E(x) and its refinement once, shared by both methods
    alone = methods["attributes"].strips(x, 1)  # type: ignore[attr-defined]
    for i, row in enumerate(rows):
        assert row.attributes[0].probs == pytest.approx([float(p) for p in alone.probs[i, 0]])
        assert torch.allclose(row.attributes[0].frames, alone.frames[i, 0].cpu(), atol=1e-5)


def test_command_errors_name_the_field(classifier_run, full_run, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="no finished generator stage"):
        attributes(attributes_cfg(f"run={classifier_run}", *TINY))
    with pytest.raises(ConfigError, match="refine_steps=-1"):
        attributes(
            attributes_cfg(f"run={full_run}", *TINY, "refine_steps=-1", f"out={tmp_path / 'a'}")
        )
    named = {"limit=null": "limit=null", "k=abc": "k='abc'", "std_samples=0": "std_samples=0"}
    for bad, shown in named.items():
        with pytest.raises(ConfigError, match=f"^{shown}: expected an integer >= 1$"):
            attributes(attributes_cfg(f"run={full_run}", *TINY, bad, f"out={tmp_path / 'a'}"))
    assert not list(tmp_path.glob("*a*"))  # refused before anything was written
    r = run_cli("cfexplain.attributes", f"run={tmp_path / 'nope'}", "logger=none", cwd=tmp_path)
    assert r.returncode == 2 and "no finished classifier stage" in r.stderr


def test_explain_shows_attribute_strips_and_reports(attr_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger.mode=offline
    out = tmp_path / "g"
    explain(
        explain_cfg(
            f"run={attr_run}",
            f"out={out}",
            "limit=3",
            "batch_size=2",
            "methods=[counterfactual,gradcam,attributes]",
            "params.attributes.top=2",
            "params.attributes.num_frames=3",
            "counterfactual.num_frames=3",
            "reports=[0]",
        )  # fmt: skip
    )
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    found = TrainedRun(attr_run).attributes
    labels = {a.label(["KL<2", "KL>=2"]) for a in found.of_class(1)}
    for i, r in enumerate(rows):
        assert {r["attribute_0_name"], r["attribute_1_name"]} == labels
        probs = json.loads(r["attribute_0_probs"])
        assert len(probs) == 3
        assert (out / "images" / f"{i:05d}" / "attribute_1.png").is_file()
    page = (out / "index.html").read_text()
    assert page.count('class="attribute"') == 3 * 2
    report = next((out / "reports").glob("*.html")).read_text()
    assert "Single features that would change its mind" in report
    # the W&B table, read back from the offline run's files
    records = finished_run_records(
        Path(json.loads((out / "summary.json").read_text())["wandb_dir"])
    )
    table, entries = logged_table(records)
    cols = table["columns"]
    assert {"attribute_0", "attribute_1", "attribute_0_name", "attribute_1_probs"} <= set(cols)
    cells = [row[cols.index("attribute_1")] for row in table["data"]]
    assert all(c["_type"] == "image-file" and entries[c["path"]].is_file() for c in cells)
    # the counterfactual's "what f reacts to" tile travels with it
    for col in ("effect", "focused"):
        cells = [row[cols.index(col)] for row in table["data"]]
        assert all(c["_type"] == "image-file" and entries[c["path"]].is_file() for c in cells)
    probs = [row[cols.index("focused_score")] for row in table["data"]]
    assert all(0.0 <= p <= 1.0 for p in probs)
    names = [row[cols.index("attribute_0_name")] for row in table["data"]]
    assert names == [r["attribute_0_name"] for r in rows]


def test_explain_without_attributes_says_how_to_find_them(full_run, tmp_path):  # noqa: F811
    import shutil

    run = tmp_path / "knee"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("attributes"))
    out = tmp_path / "g"
    explain(
        explain_cfg(
            f"run={run}", f"out={out}", "limit=1", "methods=[cam,attributes]", "logger=none"
        )
    )
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert any("python -m cfexplain.attributes" in n for n in notes), notes


def test_evaluate_reads_every_factor_of_every_attribute(attr_run, tmp_path):
    from cfexplain.evaluate.__main__ import evaluate
    from tests.evaluate.test_command import TINY as EVAL_TINY
    from tests.evaluate.test_command import evaluate_cfg

    out = tmp_path / "e"
    evaluate(evaluate_cfg(f"run={attr_run}", f"out={out}", "methods=[attributes]", *EVAL_TINY))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["table"] == {}  # judged by its factors, not as a map
    attrs = summary["attributes"]
    assert attrs["images"] == 8 and attrs["shift"] == 4.0
    found = TrainedRun(attr_run).attributes.of_class(1)
    assert [r["rank"] for r in attrs["rows"]] == [a.rank for a in found]
    for r in attrs["rows"]:
        assert set(r["change"]) == set(attrs["factors"]) and r["dominant"] in attrs["factors"]
        assert r["abs_change"][r["dominant"]] == max(r["abs_change"].values())
        assert 0.0 < r["specificity"] <= 1.0 and 0.0 <= r["marker_toggled_all"] <= 1.0
    edits = [r["attribute"] for r in attrs["calibration"]]
    assert "true edit: sclerosis" in edits and "true edit: marker" in edits
    sclerosis = attrs["calibration"][edits.index("true edit: sclerosis")]
    # a 20-step oracle reads little, so only the shape: signed changes of every factor
    assert set(sclerosis["change"]) == set(attrs["factors"])
    assert 0.0 < sclerosis["specificity_mean"] <= 1.0
    if attrs["images_with_marker"]:
        assert 0.0 <= attrs["marker_reconstructed"] <= 1.0
        corners = attrs["marker_by_corner"]["corners"]
        assert sum(c["images"] for c in corners) == attrs["images_with_marker"]
        rows = {r["attribute"]: r for r in attrs["rows"]}
        for c, entry in enumerate(corners):
            if entry["images"] and entry["attribute"] in rows:
                assert rows[entry["attribute"]]["marker_toggled_by_corner"][c] == entry["toggled"]
        weighted = sum(c["images"] * c["toggled"] for c in corners if c["images"])
        assert attrs["marker_by_corner"]["toggled"] == pytest.approx(
            weighted / attrs["images_with_marker"]
        )
        assert "The marker, corner by corner" in (out / "index.html").read_text()
    assert attrs["source"] == "test images encoded through E, refined 100 steps"
    # The best single coordinate per factor, over every coordinate of the scanned images.
    best = attrs["best_coordinates"]
    assert attrs["scan_images"] == 8 and [r["factor"] for r in best] == attrs["factors"]
    every = TrainedRun(attr_run).attributes.attributes
    for r in best:
        assert r["change"] >= 0.0 and 0.0 <= r["specificity"] <= 1.0
        top = r["most_specific"]
        assert top is None or (top["change"] >= 0.5 and top["specificity"] >= r["specificity"]
                               or r["change"] < 0.5)  # fmt: skip
        same = [a for a in every if a.coordinate == r["coordinate"]]
        if not same:
            assert r["attfind"] is None
        elif any(a.cls == 1 for a in same):  # the target's attribute is named first
            assert r["attfind"] == [1, next(a.rank for a in same if a.cls == 1)]
        else:
            assert r["attfind"] in [[a.cls, a.rank] for a in same]
    page = (out / "index.html").read_text()
    assert "StyleSpace attributes, factor by factor" in page
    assert page.count("true edit:") == len(edits)
    assert "The best single coordinate per factor" in page


def test_evaluate_judges_the_attributes_on_the_counterfactuals_latents(attr_run, tmp_path):
    from cfexplain.evaluate import pipeline
    from cfexplain.evaluate.__main__ import evaluate
    from tests.evaluate.test_command import TINY as EVAL_TINY
    from tests.evaluate.test_command import evaluate_cfg

    handed: list = []
    summary = pipeline.attribute_summary

    def spy(*args):
        handed.append(args[-1] if len(args) == 6 else None)  # the latents handed over
        return summary(*args)

    outs = {}
    for methods in ("[counterfactual,attributes]", "[attributes]"):
        outs[methods] = out = tmp_path / str(len(outs))
        cfg = evaluate_cfg(
            f"run={attr_run}", f"out={out}", f"methods={methods}", "refine_steps=5", *EVAL_TINY
        )
        with patch.object(pipeline, "attribute_summary", spy):
            evaluate(cfg)
    both, alone = handed
    assert alone is None and both is not None and both.shape[0] == 8  # no second refinement
    read = lambda out: json.loads((out / "summary.json").read_text())["attributes"]["rows"]  # noqa: E731
    rows, again = read(outs["[counterfactual,attributes]"]), read(outs["[attributes]"])
    assert [r["attribute"] for r in rows] == [r["attribute"] for r in again]
    for r, q in zip(rows, again, strict=True):  # the same latents as a refinement of its own
        assert r["change"] == pytest.approx(q["change"], abs=1e-3)


def test_without_an_encoder_attributes_come_from_and_are_judged_on_g_samples(
    full_run,  # noqa: F811
    tmp_path,
):
    import shutil

    from cfexplain.evaluate.__main__ import evaluate
    from tests.evaluate.test_command import TINY as EVAL_TINY
    from tests.evaluate.test_command import evaluate_cfg

    run = tmp_path / "knee"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("encoder", "attributes"))
    with pytest.raises(ConfigError, match="no finished encoder stage"):
        attributes(attributes_cfg(f"run={run}", *TINY))
    attributes(attributes_cfg(f"run={run}", "source=samples", *TINY))
    assert TrainedRun(run).attributes.info["source"] == "samples"
    out = tmp_path / "e"
    evaluate(evaluate_cfg(f"run={run}", f"out={out}", "methods=[attributes]", *EVAL_TINY))
    summary = json.loads((out / "summary.json").read_text())
    attrs = summary["attributes"]
    assert attrs["source"].startswith("G samples") and len(attrs["rows"]) == 2
    assert any("lacks encoder" in n for n in summary["notes"])
