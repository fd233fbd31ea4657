"""2-d embeddings of the classifier's penultimate features and of the encoder's W latents.

PCA and t-SNE come from scikit-learn, UMAP from ``umap-learn`` when it is installed. Features
are standardised first, so no single dimension dominates the distances. Outliers are the images
whose mean distance to their k nearest neighbours (in the full feature space) is largest.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

PROJECTIONS = ("pca", "tsne", "umap")


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def classifier_features(model: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """``[N, F]`` float64 penultimate features (input of the last Linear) of ``images [N, C, H, W]``."""
    from cfexplain.utils.quality import FeatureStats

    device = next(model.parameters()).device
    return FeatureStats(model, device, batch=batch).features(images)


@torch.no_grad()
def encoder_latents(E: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """``[N, D]`` float64 latents E(x): ``w [N, num_ws, w_dim]`` gives ``[N, w_dim]`` when all ws
    are equal (W space), else the flattened ``[N, num_ws · w_dim]`` (W+)."""
    device = next(E.parameters()).device
    w = torch.cat([E(x.to(device)).double().cpu() for x in images.split(batch)])
    assert w.ndim == 3, f"encoder output must be w [N, num_ws, w_dim], got {tuple(w.shape)}"
    if torch.allclose(w, w[:, :1].expand_as(w)):
        return w[:, 0]
    return w.flatten(1)


def standardise(features: Tensor) -> np.ndarray:
    """``[N, F]`` → float64 array with zero mean and unit variance per dimension (constant
    dimensions stay zero)."""
    x = features.double().cpu().numpy()
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def project(features: Tensor, method: str, seed: int = 0) -> np.ndarray:
    """``[N, F]`` features → ``[N, 2]`` points by ``method`` (pca | tsne | umap)."""
    x = standardise(features)
    n = len(x)
    if n < 3:
        raise ValueError(f"embeddings need at least 3 images, got {n}")
    if not np.abs(x).max() > 0:
        # t-SNE's Barnes-Hut tree crashes the process on identical points: refuse them here
        raise ValueError(f"all {n} feature vectors are identical: nothing to embed")
    if method == "pca":
        from sklearn.decomposition import PCA

        out = PCA(n_components=2, random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        # perplexity must stay below N; 30 (the default) for large sets, smaller for few images
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        out = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    elif method == "umap":
        if not umap_available():
            raise ValueError("umap is not installed (pip install umap-learn)")
        import umap

        out = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {method!r}")
    return np.asarray(out, dtype=np.float64)


def _distances(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    np.fill_diagonal(d2, np.inf)  # a point is not its own neighbour
    return np.sqrt(d2)


def knn_scores(features: Tensor | np.ndarray, k: int = 5) -> np.ndarray:
    """``[N]`` mean distance of each point to its ``k`` nearest neighbours (standardised space)."""
    x = standardise(torch.as_tensor(np.asarray(features)))
    k = max(1, min(k, len(x) - 1))
    d = np.sort(_distances(x), axis=1)[:, :k]
    return d.mean(axis=1)


def knn_accuracy(points: np.ndarray, labels: Sequence[int], k: int = 5) -> float:
    """Leave-one-out accuracy of a ``k``-nearest-neighbour vote on ``points [N, D]``: how well
    nearby points share a label (ties go to the smaller label)."""
    x = np.asarray(points, dtype=np.float64)
    y = np.asarray(labels)
    k = max(1, min(k, len(x) - 1))
    near = np.argsort(_distances(x), axis=1)[:, :k]
    classes = np.unique(y)
    votes = np.stack([(y[near] == c).sum(axis=1) for c in classes], axis=1)
    return float((classes[votes.argmax(axis=1)] == y).mean())


def silhouette(points: np.ndarray, labels: Sequence[int]) -> float:
    """Mean silhouette of ``points [N, D]`` grouped by ``labels`` (NaN with fewer than two groups)."""
    from sklearn.metrics import silhouette_score

    y = np.asarray(labels)
    if len(np.unique(y)) < 2 or len(np.unique(y)) >= len(y):
        return float("nan")
    return float(silhouette_score(points, y))


def scatter_png(
    points: np.ndarray, values: Sequence[int], names: Sequence[str], title: str, px: int = 360
) -> bytes:
    """A PNG scatter plot of ``points [N, 2]`` coloured by the class index in ``values``."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(px / dpi, px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    v = np.asarray(values)
    cmap = colormaps["tab10"]
    for c in np.unique(v):
        sel = v == c
        label = names[int(c)] if 0 <= int(c) < len(names) else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=10, color=cmap(int(c) % 10), label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="best", markerscale=1.5)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
