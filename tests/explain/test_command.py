"""``python -m cfexplain.explain`` on real smoke runs: gallery files, user images, robustness, W&B."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from PIL import Image

from cfexplain.data.readers import DataError
from cfexplain.explain.__main__ import ConfigError, explain
from cfexplain.utils.artifacts import Artifact, save_model
from tests.conftest import run_cli, smoke_chain
from tests.utils.test_tracking import finished_run_records

EVIL = "<img src=x onerror=alert(1)>.png"
FAST = "methods=[gradcam,saliency,cam,counterfactual,normative]"


def explain_cfg(*overrides: str) -> DictConfig:
    """The explain config as ``python -m cfexplain.explain`` composes it."""
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name="explain", overrides=["device=cpu", *overrides])


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    """A smoke run with only the classifier stage (fast)."""
    runs = tmp_path_factory.mktemp("runs")
    return smoke_chain(runs, "stages=[classifier]")


def _stage(run: Path, name: str, models: dict, info: dict | None = None) -> None:
    """A finished stage folder holding ``models`` (name -> (module, target, kwargs))."""
    folder = run / name
    folder.mkdir()
    files = {}
    for key, (module, target, kwargs) in models.items():
        save_model(folder / f"{key}.safetensors", module, target, kwargs)
        files[key] = f"{key}.safetensors"
    Artifact(name, folder, fingerprint=name, files=files, info=info or {}).write()


def add_generative_stages(run: Path, directions: Callable[[], dict[str, torch.Tensor]]) -> Path:
    """Untrained generator, encoder and normative stages and a direction stage holding
    ``directions()`` (the tensors of ``directions.safetensors``, drawn after the networks) in
    ``run``, in the formats the training stages write: every explain path runs on real
    (random) networks."""
    from safetensors.torch import save_file

    from cfexplain.nn.encoder import Encoder
    from cfexplain.nn.normative import ConvAAE, ConvVAE
    from cfexplain.nn.stylegan2 import Generator

    torch.manual_seed(0)
    g_kw = dict(
        z_dim=16, w_dim=16, img_resolution=32, img_channels=1, channel_base=128, channel_max=16
    )
    G = Generator(**g_kw)
    _stage(run, "generator", {"G_ema": (G, "cfexplain.nn.stylegan2.Generator", g_kw)})
    e_kw = dict(
        img_resolution=32, img_channels=1, w_dim=16, num_ws=G.num_ws, width=8, channel_max=16
    )
    E = Encoder(**e_kw)
    _stage(
        run,
        "encoder",
        {"encoder": (E, "cfexplain.nn.encoder.Encoder", e_kw)},
        {"perceptual": "random"},
    )
    n_kw = dict(
        img_channels=1, img_resolution=32, latent_channels=2, width=8, levels=2, width_max=16
    )
    _stage(
        run,
        "normative",
        {
            "vae": (ConvVAE(**n_kw), "cfexplain.nn.normative.ConvVAE", n_kw),
            "aae": (ConvAAE(**n_kw), "cfexplain.nn.normative.ConvAAE", n_kw),
        },
        {"models": ["vae", "aae"]},
    )
    (run / "direction").mkdir()
    save_file(directions(), str(run / "direction" / "directions.safetensors"))
    Artifact(
        "direction", run / "direction", "direction", files={"directions": "directions.safetensors"}
    ).write()
    return run


@pytest.fixture(scope="module")
def full_run(classifier_run, tmp_path_factory) -> Path:
    """The classifier run plus untrained generator, encoder, direction and normative stages."""
    run = tmp_path_factory.mktemp("full") / "knee"
    shutil.copytree(classifier_run / "classifier", run / "classifier")
    return add_generative_stages(
        run, lambda: {"direction": torch.randn(16), "lambda_range": torch.tensor([3.0])}
    )


def test_full_run_gallery_has_sequences_plots_gifs_and_residuals(full_run, tmp_path):
    out = tmp_path / "g"
    with pytest.warns(UserWarning, match="random"):  # the untrained perceptual net says so loudly
        explain(
            explain_cfg(
                f"run={full_run}",
                f"out={out}",
                "limit=3",
                "batch_size=2",
                "methods=[counterfactual,gradcam,normative]",
                "lambdas=symmetric",
                "counterfactual.num_frames=5",
                "logger=none",
            )  # fmt: skip
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counterfactual"] is True and summary["methods"] == ["gradcam", "normative"]
    assert summary["notes"] == []
    rows = _rows(out)
    assert len(rows) == 3
    for key in ("flipped", "monotonicity", "recon_error", "proximity_l1"):
        assert key in rows[0], rows[0].keys()
    flipped = [float(r["flipped"]) for r in rows]
    assert summary["metrics"]["flip_rate"] == pytest.approx(sum(flipped) / 3)
    mono = [float(r["monotonicity"]) for r in rows]
    assert summary["metrics"]["mean_monotonicity"] == pytest.approx(sum(mono) / 3)
    for i in range(3):
        folder = out / "images" / f"{i:05d}"
        assert len(list(folder.glob("frame_*.png"))) == 5
        for name in (
            "reconstruction.png",
            "difference.png",
            "effect.png",
            "focused.png",
            "plot.png",
            "sequence.gif",
            "map_normative.png",
        ):
            assert (folder / name).is_file(), name
        with Image.open(folder / "sequence.gif") as gif:
            assert gif.n_frames == 8
        flip = rows[i]["flip_index"]
        assert flip == "-1" or 0 <= int(flip) < 5
    page = (out / "index.html").read_text()
    assert page.count('class="frame"') == 3 * 5 and "p vs λ" in page
    assert page.count("<figcaption>what f reacts to</figcaption>") == 3
    # the counterfactual reduced to those changes, with f's probability for it
    assert page.count("<figcaption>only that · p=") == 3
    assert all("focus_sufficiency" in r for r in rows)


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_classifier_only_run_gives_heatmaps_and_says_why_no_counterfactual(
    classifier_run, tmp_path
):
    out = tmp_path / "g"
    index = explain(
        explain_cfg(
            f"run={classifier_run}", f"out={out}", "limit=5", "batch_size=2", FAST, "logger=none"
        )
    )
    assert index == out / "index.html"
    page = index.read_text()
    assert page.count('<section class="row"') == 5
    assert "counterfactual column" in page and "generator, encoder and direction" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["counterfactual"] is False
    assert summary["methods"] == ["gradcam", "saliency", "cam"]
    rows = _rows(out)
    assert [r["name"] for r in rows] == [f"test #{i}" for i in range(5)]
    assert {r["true"] for r in rows} <= {"KL<2", "KL>=2"}
    for i in range(5):
        for m in ("gradcam", "saliency", "cam"):
            assert Image.open(out / "images" / f"{i:05d}" / f"map_{m}.png").size == (96, 96)
        assert (out / "images" / f"{i:05d}" / "strip.png").is_file()


def _user_images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (70, 60, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / EVIL)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def test_user_images_corrupt_file_skipped_and_names_escaped(classifier_run, tmp_path):
    _user_images(tmp_path / "mine")
    out = tmp_path / "g"
    explain(
        explain_cfg(
            f"run={classifier_run}",
            f"images={tmp_path / 'mine'}",
            f"out={out}",
            FAST,
            "logger=none",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3
    assert [Path(s["path"]).name for s in summary["skipped"]] == ["broken.png"]
    assert "corrupt" in summary["skipped"][0]["reason"]
    page = (out / "index.html").read_text()
    assert "<img src=x onerror" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert "Skipped broken.png" in page
    assert sorted(r["name"] for r in _rows(out)) == sorted([EVIL, "gray.png", "rgb.jpg"])


def test_impossible_conversion_names_the_file(classifier_run, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("CMYK", (32, 32), (10, 20, 30, 40)).save(folder / "four.jpg")
    with pytest.raises(DataError, match=r"four\.jpg.*cannot convert.*1 channel"):
        explain(
            explain_cfg(
                f"run={classifier_run}",
                f"images={folder}",
                f"out={tmp_path / 'g'}",
                FAST,
                "logger=none",
            )
        )


def test_config_errors_name_the_field(classifier_run, tmp_path):
    with pytest.raises(ConfigError, match="no finished classifier stage"):
        explain(explain_cfg(f"run={tmp_path / 'nope'}", "logger=none"))
    with pytest.raises(ConfigError, match="methods: unknown attribution method 'gradcum'"):
        explain(explain_cfg(f"run={classifier_run}", "methods=[gradcum]", "logger=none"))
    with pytest.raises(ConfigError, match=r"params\.occlusion: .*'size'"):
        explain(
            explain_cfg(
                f"run={classifier_run}",
                "methods=[occlusion]",
                "+params.occlusion.size=3",
                "logger=none",
            )
        )
    with pytest.raises(
        ConfigError,
        match=r"target=5: expected a class index \(0 to 1\) or name; the classifier's classes are \['KL<2', 'KL>=2'\]",
    ):
        explain(explain_cfg(f"run={classifier_run}", "target=5", "logger=none"))
    r = run_cli("cfexplain.explain", f"run={tmp_path / 'nope'}", "logger=none", cwd=tmp_path)
    assert r.returncode == 2 and "no finished classifier stage" in r.stderr
    assert "Traceback" not in r.stderr


def logged_table(records: list) -> tuple[dict, dict[str, Path]]:
    """The one W&B table of an offline run's records, and its files by their path there: the
    full table with its image cells travels in the run_table artifact the log lists."""
    (art,) = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table"
    ]
    entries = {c.path: Path(c.local_path) for c in art.manifest.contents}
    (table_file,) = [p for k, p in entries.items() if k.endswith(".table.json")]
    return json.loads(table_file.read_text()), entries


def test_wandb_offline_table_read_back_from_its_files(classifier_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logger.mode=offline, the default
    out = tmp_path / "g"
    explain(explain_cfg(f"run={classifier_run}", f"out={out}", "limit=3", FAST))
    summary = json.loads((out / "summary.json").read_text())
    wandb_dir = Path(summary["wandb_dir"])
    # Beside the gallery: out= keeps explain from writing into the run folder.
    assert wandb_dir.parent == out.parent / "wandb"
    assert not (classifier_run / "wandb").exists()
    records = finished_run_records(wandb_dir)
    ref = {}  # the table's reference, logged as one history item per field
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for i in r.history.item:
                if list(i.nested_key[:1]) == ["explain/gallery"]:
                    ref[i.nested_key[1]] = json.loads(i.value_json)
    assert ref["_type"] == "table-file" and ref["nrows"] == 3
    # The run folder's copy names the columns; the full table with its image cells travels in
    # the run_table artifact that the log's artifact record lists (file by file).
    table, entries = logged_table(records)
    columns = table["columns"]
    assert columns[:4] == ["name", "true", "pred", "prob"]
    assert [row[0] for row in table["data"]] == ["test #0", "test #1", "test #2"]
    image_cells = [row[columns.index("gradcam")] for row in table["data"]]
    assert all(c["_type"] == "image-file" for c in image_cells)
    assert all(c["path"] in entries and entries[c["path"]].is_file() for c in image_cells)
    gallery = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "gallery"
    ]
    assert any(c.path == "index.html" for a in gallery for c in a.manifest.contents)
    probs = [float(r["prob"]) for r in _rows(out)]
    assert [row[3] for row in table["data"]] == pytest.approx(probs)


def test_cli_prints_the_gallery_path(classifier_run, tmp_path):
    out = tmp_path / "g"
    r = run_cli(
        "cfexplain.explain", f"run={classifier_run}", f"out={out}", "limit=2", "methods=[cam]",
        "logger=none", "device=cpu", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"gallery: {out / 'index.html'}" in r.stdout
    assert not list(tmp_path.glob("*.log")), "hydra must not leave log files in the cwd"


def test_inputs_folder_labels_dicom_csv_and_glob(tmp_path):
    from cfexplain.explain.inputs import list_images, load_user_image
    from tests.data.test_readers import write_dicom

    root = tmp_path / "scans"
    (root / "KL>=2").mkdir(parents=True)
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(root / "KL>=2" / "a.png")
    (root / "other").mkdir()
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(root / "other" / "b.jpg")
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    write_dicom(root / "series" / "IM0001", pixels)  # no suffix: found by its DICM magic
    (root / "notes.txt").write_text("not an image")
    items = list_images(root, ["KL<2", "KL>=2"])
    assert [(p.relative_to(root).as_posix(), lab) for p, lab in items] == [
        ("KL>=2/a.png", "KL>=2"),
        ("other/b.jpg", None),
        ("series/IM0001", None),
    ]
    dicom = load_user_image(items[2][0], None, resolution=4, channels=1)
    assert dicom.image.shape == (1, 4, 4)
    # min..max of the ramp spread over [-1, 1]; the ramp rises row by row
    assert dicom.image.min() < -0.7 and dicom.image.max() > 0.7
    assert (dicom.image[0, 1:, 0] > dicom.image[0, :-1, 0]).all()
    assert "8x8 -> gray 4x4" in dicom.note
    rgb = load_user_image(items[1][0], None, resolution=4, channels=3)
    assert rgb.image.shape == (3, 4, 4) and "RGB 8x8 -> RGB 4x4" in rgb.note
    assert [p.name for p, _ in list_images(str(root / "**" / "*.png"))] == ["a.png"]
    (tmp_path / "list.csv").write_text("path,label\nscans/KL>=2/a.png,KL<2\nscans/other/b.jpg,\n")
    assert list_images(tmp_path / "list.csv") == [
        (tmp_path / "scans/KL>=2/a.png", "KL<2"),
        (tmp_path / "scans/other/b.jpg", None),
    ]
    with pytest.raises(DataError, match="no such file or folder"):
        list_images(tmp_path / "missing")


def test_counterfactual_and_normative_maps_through_the_registry(full_run):
    from cfexplain.explain.attribution import counterfactual_difference, get_method
    from cfexplain.explain.counterfactual import CounterfactualEngine
    from cfexplain.nn.classifier import load_classifier
    from cfexplain.nn.normative import load_normative

    model = load_classifier(full_run / "classifier")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.warns(UserWarning, match="random"):
        engine = CounterfactualEngine.from_run(full_run, device="cpu", num_frames=3)
    got = get_method("counterfactual")(model, engine=engine, lambdas="symmetric").attribute(x, 1)
    cf = engine(x, target=1, lambdas="symmetric")
    # No flip: the last frame in the direction a flip needed (λ first or last).
    fallback = torch.where(
        cf.recon_probs > 0.5, torch.zeros(2, dtype=torch.long), torch.full((2,), 2)
    )
    idx = torch.where(cf.flip_index() >= 0, cf.flip_index(), fallback)
    expected = (cf.images[torch.arange(2), idx] - cf.reconstruction).sum(1, keepdim=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(counterfactual_difference(cf), expected)
    residual = get_method("normative")(model, stage_dir=full_run / "normative", kind="aae")
    ref = load_normative(full_run / "normative")["aae"].anomaly(x)[1]
    torch.testing.assert_close(residual.attribute(x, 0), ref)
    assert not residual.signed and (ref >= 0).all()


def test_reports_dominant_class_and_evaluation_link(full_run, tmp_path):
    """``reports=[0]`` writes one self-contained page; the dominant-class map draws its colours;
    the gallery links the run's evaluation page when there is one."""
    (full_run / "evaluation").mkdir(exist_ok=True)
    (full_run / "evaluation" / "index.html").write_text("<html></html>")
    try:
        index = explain(
            explain_cfg(
                f"run={full_run}",
                f"out={tmp_path}",
                "limit=2",
                "methods=[counterfactual,gradcam,dominant_class,normative]",
                "reports=[1]",
                "logger=none",
            )
        )
    finally:
        shutil.rmtree(full_run / "evaluation")
    page = index.read_text()
    assert 'href="' in page and "evaluation/index.html" in page
    reports = sorted((tmp_path / "reports").glob("*.html"))
    assert [p.name for p in reports] == ["test_1.html"]
    report = reports[0].read_text()
    assert "What the model said" in report and 'src="http' not in report
    dominant = np.asarray(Image.open(next(tmp_path.glob("images/*/map_dominant_class.png"))))
    gradcam = np.asarray(Image.open(next(tmp_path.glob("images/*/map_gradcam.png"))))
    assert dominant.shape == gradcam.shape and not np.array_equal(dominant, gradcam)
