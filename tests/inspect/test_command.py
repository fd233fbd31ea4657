"""``python -m cfexplain.inspect`` on a trained smoke run: the page, its files, escaping, W&B, errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from cfexplain.inspect.__main__ import ConfigError, inspect
from cfexplain.inspect.embeddings import umap_available
from cfexplain.inspect.page import Section, page_html, table
from cfexplain.utils.artifacts import Artifact, save_model
from tests.conftest import run_cli
from tests.inspect.test_embeddings import trained_run  # noqa: F401 (session fixture)
from tests.utils.test_tracking import finished_run_records

EVIL = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(1)</script>"
FAST = ("limit=40", "class_max.steps=5", "class_max.starts=2", "embeddings.outliers=3")


def inspect_cfg(*overrides: str) -> DictConfig:
    """The inspect config as ``python -m cfexplain.inspect`` composes it."""
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name="inspect", overrides=["device=cpu", *overrides])


def _stage(run: Path, name: str, key: str, module: torch.nn.Module, target: str, kw: dict) -> None:
    folder = run / name
    folder.mkdir()
    save_model(folder / f"{key}.safetensors", module, target, kw)
    Artifact(name, folder, fingerprint=name, files={key: f"{key}.safetensors"}).write()


@pytest.fixture(scope="module")
def full_run(trained_run, tmp_path_factory) -> Path:  # noqa: F811
    """The trained classifier in an experiment folder named like markup, plus untrained
    generator and encoder stages in the formats the training stages write."""
    from cfexplain.nn.encoder import Encoder
    from cfexplain.nn.stylegan2 import Generator

    run = tmp_path_factory.mktemp("full") / EVIL
    shutil.copytree(trained_run / "classifier", run / "classifier")
    torch.manual_seed(0)
    g_kw = dict(z_dim=8, w_dim=8, img_resolution=32, img_channels=1, channel_base=64, channel_max=8)
    G = Generator(**g_kw)
    _stage(run, "generator", "G_ema", G, "cfexplain.nn.stylegan2.Generator", g_kw)
    e_kw = dict(img_resolution=32, img_channels=1, w_dim=8, num_ws=G.num_ws, width=4, channel_max=8)
    E = Encoder(**e_kw)
    torch.nn.init.normal_(E.head[-1].weight, std=0.5)  # a fresh head outputs w_avg for every x
    _stage(run, "encoder", "encoder", E, "cfexplain.nn.encoder.Encoder", e_kw)
    return run


def _wandb_history_keys(wandb_dir: Path) -> set[str]:
    records = finished_run_records(wandb_dir)
    keys = set()
    for r in records:
        if r.WhichOneof("record_type") == "history":
            keys |= {i.key or i.nested_key[0] for i in r.history.item}
    return keys


def test_page_sections_files_escaping_wandb_and_expert_unit_names(full_run, tmp_path):
    out = tmp_path / "page"
    index = inspect(
        inspect_cfg(
            f"run='{full_run}'",
            f"out={out}",
            f"logger.dir={tmp_path / 'wb'}",
            "class_max.latent_start=encoder",
            "units.top=3",
            "images=[0,5]",
            *FAST,
        )
    )
    assert index == out / "index.html"
    page = index.read_text(encoding="utf-8")
    for key in ("filters", "feature_maps", "embeddings", "class_max", "units"):
        assert f'<section id="{key}">' in page
    # every image is a relative path to a file beside the page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) > 20
    for src in sources:
        assert not src.startswith(("/", "http")) and (out / src).is_file(), src
    # the experiment name is markup: escaped in the title and in the run path
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    if not umap_available():
        assert "umap-learn package is not installed" in page

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dead_share"]) == {"layers.0", "layers.1"}
    assert all(0.0 <= v <= 1.0 for v in summary["dead_share"].values())
    assert {"classifier features/tsne", "encoder latents E(x)/pca"} <= set(summary["embeddings"])
    assert "raw pixels (baseline)/pca" in summary["embeddings"]
    variants = summary["class_max"]
    assert len(variants) == 2 and any("through G" in v for v in variants)
    assert all(v["final_logit"] > v["start_logit"] for v in variants.values())
    assert summary["units"]["layer"] == "layers.1" and len(summary["units"]["top"]) == 3

    # W&B (offline): the media and tables were logged
    keys = _wandb_history_keys(Path(summary["wandb_dir"]))
    assert {"inspect/filters", "inspect/dead_maps", "inspect/units", "inspect/embeddings"} <= keys
    assert any(k.startswith("inspect/class_max/") for k in keys)

    # an expert names the top unit (with markup); a rerun with more units keeps it and shows it
    csv_path = full_run / "inspect" / "units.csv"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["unit"]) for r in rows] == summary["units"]["top"]
    rows[0]["name"], rows[0]["description"] = SCRIPT, "fires on the joint"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out2 = tmp_path / "again"
    page2 = inspect(
        inspect_cfg(
            f"run='{full_run}'", f"out={out2}", "logger=none", "what=[units]", "units.top=5", *FAST
        )
    ).read_text(encoding="utf-8")
    with open(csv_path, newline="", encoding="utf-8") as f:
        after = list(csv.DictReader(f))
    assert len(after) == 5 and after[0]["name"] == SCRIPT
    assert after[0]["description"] == "fires on the joint"
    assert SCRIPT not in page2 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page2
    assert "fires on the joint" in page2
    assert '<section id="filters">' not in page2  # only what was asked


def test_page_escapes_layer_names_and_cells():
    html = page_html(
        f"inspect {SCRIPT}",
        {"run": EVIL},
        [Section("feature_maps", f"maps {SCRIPT}", table(["layer"], [[SCRIPT]]), [SCRIPT])],
        notes=[EVIL],
    )
    assert SCRIPT not in html and EVIL not in html
    # title and h1, nav link and h2, the cell, the note
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 6
    # a column marked raw is the caller's own HTML (an <img> of a patch), kept as it is
    assert '<td><img src="a.png"></td>' in table(["p"], [['<img src="a.png">']], raw=[0])


def test_user_errors_name_the_field(trained_run, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"what=\['filtres'\]: choose from"):
        inspect(inspect_cfg(f"run={trained_run}", "what=[filtres]", "logger=none"))
    with pytest.raises(
        ConfigError,
        match=r"^target=5: expected a class index \(0 to 1\) or name; the classifier's classes are",
    ):
        inspect(inspect_cfg(f"run={trained_run}", "target=5", "logger=none", f"out={tmp_path}"))
    with pytest.raises(ConfigError, match=r"images=\[0, 999\]: \[999\] outside the test split"):
        inspect(
            inspect_cfg(
                f"run={trained_run}",
                "what=[feature_maps]",
                "images=[0,999]",
                "logger=none",
                f"out={tmp_path / 'o'}",
            )
        )
    with pytest.raises(ConfigError, match=r"layers: no module named '<script>'"):
        inspect(
            inspect_cfg(
                f"run={trained_run}",
                "what=[feature_maps]",
                "layers=['<script>']",
                "logger=none",
                f"out={tmp_path / 'o'}",
            )
        )
    bad = {
        "limit=0": "limit=0",
        "max_maps=abc": "max_maps='abc'",
        "embeddings.k=0": "embeddings.k=0",
        "class_max.steps=2.5": "class_max.steps=2.5",
        "class_max.jitter=-1": "class_max.jitter=-1",
        "units.patch_px=0": "units.patch_px=0",
        "class_max.lr=0": "class_max.lr=0",  # no step at all (and a negative one is ascent's opposite)
        "class_max.latent_l2=-1": "class_max.latent_l2=-1",
        "dead_eps=-1": "dead_eps=-1",  # every unit would count as alive
    }
    for override, named in bad.items():
        out = tmp_path / "counts"
        expected = f"^{re.escape(named)}: expected (an integer|a number) (>=|>) "
        with pytest.raises(ConfigError, match=expected):
            inspect(inspect_cfg(f"run={trained_run}", override, "logger=none", f"out={out}"))
        assert not out.exists()  # named before a folder is made
    r = run_cli("cfexplain.inspect", f"run={tmp_path / 'nope'}", "logger=none", cwd=tmp_path)
    assert r.returncode == 2 and "no finished classifier stage" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


class TwoLevelHead(torch.nn.Module):
    """A head over two pooled levels (like an attention head): not GAP + linear over the units."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(2 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a)
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_a_head_that_is_not_gap_linear_leaves_a_note_not_a_failed_page(trained_run, tmp_path):  # noqa: F811
    run = tmp_path / "knee"
    shutil.copytree(trained_run / "classifier", run / "classifier")
    torch.manual_seed(0)
    save_model(
        run / "classifier" / "classifier.safetensors",
        TwoLevelHead(),
        "tests.inspect.test_command.TwoLevelHead",
        {},
    )
    page = inspect(
        inspect_cfg(
            f"run={run}",
            f"out={tmp_path / 'o'}",
            "logger=none",
            "what=[units,feature_maps,embeddings]",
            "embeddings.projections=[pca]",
            *FAST,
        )
    ).read_text(encoding="utf-8")
    assert (
        "No unit report: units: the contribution needs a GAP + linear head over the 4 units" in page
    )
    assert "the last Linear takes 8 inputs" in page
    # the other sections still ran; a model without ResNet stages gets its convs as layers
    assert '<section id="embeddings">' in page and "<td>a.0</td>" in page and "<td>b.0</td>" in page
