"""The shortcut scenario: does the classifier lean on the burned-in marker, and which
explanations show it?

With ``data.shortcut_rate=0.9`` the knee phantom's lead marker follows the label in 90% of the
images (:func:`cfexplain.data.phantoms.knee.marker_rule`), so a classifier can read the marker
instead of the joint. :func:`marker_reliance` proves it does by re-rendering the same knees (same
anatomy, disease and noise) with the marker removed, and with the marker set against the label;
:func:`heatmap_exposure` says per image whether a map puts more relevance on the marker than the
marker's share of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cfexplain.evaluate.heatmaps import relevance_mass


@torch.no_grad()
def _accuracy(model: nn.Module, samples: list[dict], device: torch.device, batch: int) -> float:
    correct = 0
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        x = torch.stack([s["image"] for s in chunk]).to(device)
        y = torch.tensor([int(s["label"]) for s in chunk], device=device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(samples), 1)


def marker_reliance(
    model: nn.Module,
    dataset,
    indices: Sequence[int],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy of ``model`` on knee phantom images as drawn, with the marker removed, and with
    the marker contradicting the label (present on healthy, absent on diseased knees).

    ``dataset`` is a :class:`cfexplain.data.phantoms.KneePhantom` (it re-renders sample i with
    ``render(i, overrides)``). A classifier that reads the joint scores about the same on all
    three; one that reads the marker drops when it is removed and collapses when it lies.
    """
    if not hasattr(dataset, "render") or "marker" not in dataset.params(0)[0]:
        raise ValueError(
            f"marker reliance needs the knee phantom (render with a 'marker' factor); got {type(dataset).__name__}"
        )
    device = next(model.parameters()).device
    model.eval()
    drawn = [dataset[i] for i in indices]
    removed = [dataset.render(i, {"marker": 0.0}) for i in indices]
    # The label does not depend on the marker, so the re-rendered samples keep theirs.
    against = [
        dataset.render(i, {"marker": float(1 - int(s["label"] > 0))})
        for i, s in zip(indices, drawn)
    ]
    acc = {
        "accuracy": _accuracy(model, drawn, device, batch_size),
        "accuracy_marker_removed": _accuracy(model, removed, device, batch_size),
        "accuracy_marker_against_label": _accuracy(model, against, device, batch_size),
    }
    acc["drop_marker_removed"] = acc["accuracy"] - acc["accuracy_marker_removed"]
    acc["marker_present_share"] = sum(s["meta"]["factors"]["marker"] > 0.5 for s in drawn) / max(
        len(drawn), 1
    )
    return acc


def heatmap_exposure(maps: Tensor, marker_masks: Tensor) -> Tensor:
    """``[N]`` float: 1.0 where the map's relevance mass on the marker exceeds the marker's area
    share of the image (what a map with no preference for the marker would put there), NaN
    where the image has no marker.

    ``maps [N, 1, H, W]`` (non-negative relevance), ``marker_masks`` bool ``[N, H, W]``.
    """
    mass = relevance_mass(maps, marker_masks)
    share = marker_masks.flatten(1).float().mean(1)
    out = (mass > share).float()
    return torch.where(marker_masks.flatten(1).any(1) & ~mass.isnan(), out, torch.nan)
