"""Embeddings: the trained classifier's features separate the phantom classes better than pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cfexplain.inspect import embeddings as emb
from tests.conftest import smoke_chain

# A little more than the smoke preset: the smoke classifier (2 epochs on 96 images) is near
# chance, which would make the separation comparison meaningless. About 5 s on 2 cores.
TRAINED = ("classifier.epochs=10", "data.n_train=480", "data.n_test=96")


_TRAINED: dict[str, Path] = {}  # one training per session, also where test_command imports it


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A knee smoke run with a classifier trained well past chance (classifier stage only)."""
    # An imported fixture is a second definition to pytest, so it would train twice without this.
    if "run" in _TRAINED:
        return _TRAINED["run"]
    runs = tmp_path_factory.mktemp("inspect_runs")
    _TRAINED["run"] = smoke_chain(runs, "stages=[classifier]", *TRAINED)
    return _TRAINED["run"]


def _test_split(run: Path) -> tuple[torch.Tensor, np.ndarray]:
    from omegaconf import OmegaConf

    from cfexplain.data import build_dataset

    data = OmegaConf.load(run / "classifier" / "config.yaml").data
    ds = build_dataset(data, "test")
    samples = [ds[i] for i in range(len(ds))]
    return torch.stack([s["image"] for s in samples]), np.array([s["label"] for s in samples])


def test_classifier_features_separate_the_classes_better_than_pixels(trained_run):
    from cfexplain.nn.classifier import load_classifier

    model = load_classifier(trained_run / "classifier")
    x, y = _test_split(trained_run)
    assert 0.3 < y.mean() < 0.7  # both classes present in numbers
    feats = emb.classifier_features(model, x)
    assert feats.shape == (len(x), 16)  # width 8, two stages: 16 channels into the head
    pixels = x.flatten(1).double()
    for proj in ("pca", "tsne"):
        f2, p2 = emb.project(feats, proj), emb.project(pixels, proj)
        assert f2.shape == p2.shape == (len(x), 2) and np.isfinite(f2).all()
        acc_f, acc_p = emb.knn_accuracy(f2, y), emb.knn_accuracy(p2, y)
        sil_f, sil_p = emb.silhouette(f2, y), emb.silhouette(p2, y)
        # measured: features ~0.9 vs pixels 0.4-0.65 (k-NN), silhouette ~0.45 vs ~0
        assert acc_f > acc_p + 0.1, (proj, acc_f, acc_p)
        assert sil_f > sil_p + 0.1, (proj, sil_f, sil_p)


def test_knn_accuracy_and_silhouette_on_known_clusters():
    g = np.random.default_rng(0)
    a, b = g.normal(0, 1, (20, 2)), g.normal(10, 1, (20, 2))
    pts, y = np.concatenate([a, b]), np.array([0] * 20 + [1] * 20)
    assert emb.knn_accuracy(pts, y, k=3) == 1.0
    assert emb.silhouette(pts, y) > 0.8
    mixed = g.permutation(y)
    assert emb.knn_accuracy(pts, mixed, k=3) < 0.8
    assert np.isnan(emb.silhouette(pts, np.zeros(40)))  # one group: undefined


def test_knn_outlier_score_finds_the_planted_outlier():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 5, generator=g)
    feats[17] += 12.0
    scores = emb.knn_scores(feats, k=4)
    assert scores.shape == (30,) and int(np.argmax(scores)) == 17
    assert np.sort(scores)[-1] > 2 * np.sort(scores)[-2]


def test_encoder_latents_collapse_w_but_keep_wplus():
    class E(nn.Module):
        def __init__(self, plus: bool) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 4 * (3 if plus else 1))
            self.plus = plus

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.lin(x.flatten(1))
            return w.view(-1, 3, 4) if self.plus else w[:, None].repeat(1, 3, 1)

    x = torch.rand(5, 1, 4, 4)
    assert emb.encoder_latents(E(False), x, batch=2).shape == (5, 4)
    assert emb.encoder_latents(E(True), x, batch=2).shape == (5, 12)


def test_projection_errors_and_scatter_png():
    feats = torch.randn(10, 3)
    with pytest.raises(ValueError, match="projection must be one of"):
        emb.project(feats, "isomap")
    with pytest.raises(ValueError, match="at least 3 images"):
        emb.project(feats[:2], "pca")
    with pytest.raises(ValueError, match="all 10 feature vectors are identical"):
        emb.project(torch.ones(10, 3), "tsne")  # would crash t-SNE's Barnes-Hut tree
    if not emb.umap_available():
        with pytest.raises(ValueError, match="umap is not installed"):
            emb.project(feats, "umap")
    png = emb.scatter_png(emb.project(feats, "pca"), [0, 1] * 5, ["a<b", "c"], "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
