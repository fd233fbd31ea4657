"""The shortcut scenario: does the classifier lean on the burned-in marker, and which
explanations show it?

With ``data.shortcut_rate=0.9`` the knee phantom's lead marker follows the label in 90% of the
images (:func:`cfexplain.data.phantoms.knee.marker_rule`), so a classifier can read the marker
instead of the joint. :func:`marker_reliance` proves it does by re-rendering the same knees (same
anatomy, disease and noise) with the marker removed, and with the marker set against the label;
:func:`heatmap_exposure` says per image whether a map puts more relevance on the marker than the
marker's share of the image; :func:`marker_effect` says how much of a counterfactual's move of
the classifier comes from the marker it changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfexplain.evaluate.heatmaps import relevance_mass


@torch.no_grad()
def _label_probs(model: nn.Module, samples: list[dict], device: torch.device, batch: int) -> Tensor:
    """``[N, 2]``: the probability ``model`` gives each sample's label, and whether it is the top."""
    out = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        x = torch.stack([s["image"] for s in chunk]).to(device)
        y = torch.tensor([int(s["label"]) for s in chunk], device=device)
        logits = model(x)
        p = torch.softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
        out.append(torch.stack([p, (logits.argmax(1) == y).float()], dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def marker_reliance(
    model: nn.Module,
    dataset,
    indices: Sequence[int],
    *,
    batch_size: int = 64,
    moved: float = 0.1,
) -> dict[str, float]:
    """Accuracy of ``model`` on knee phantom images as drawn, with the marker removed, and with
    the marker contradicting the label (present on healthy, absent on diseased knees); and
    ``marker_removed_moves``: the share of the images with a marker whose probability of their
    label moves by at least ``moved`` when the marker alone is removed (what the marker decides
    with the knee as it is).

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
    drawn_p, removed_p, against_p = (
        _label_probs(model, s, device, batch_size) for s in (drawn, removed, against)
    )
    acc = {
        "accuracy": float(drawn_p[:, 1].mean()),
        "accuracy_marker_removed": float(removed_p[:, 1].mean()),
        "accuracy_marker_against_label": float(against_p[:, 1].mean()),
    }
    acc["drop_marker_removed"] = acc["accuracy"] - acc["accuracy_marker_removed"]
    marked = torch.tensor([s["meta"]["factors"]["marker"] > 0.5 for s in drawn], dtype=torch.bool)
    acc["marker_present_share"] = float(marked.float().mean()) if len(drawn) else 0.0
    moves = (drawn_p[:, 0] - removed_p[:, 0]).abs()[marked] >= moved
    acc["marker_removed_moves"] = float(moves.float().mean()) if marked.any() else math.nan
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


def any_place_exposure(maps: Tensor, places: Tensor, has_marker: Tensor) -> Tensor:
    """``[N]`` float: :func:`heatmap_exposure` against each of the places a marker may be drawn
    (``places`` bool ``[P, H, W]``), 1.0 where the map exposes any one of them; NaN where the
    image has no marker (``has_marker [N]``). Judged per place, since a map on one plate should
    not have to outweigh the area of all of them."""
    n = maps.shape[0]
    per_place = torch.stack(
        [
            heatmap_exposure(maps, place.expand(n, -1, -1) & has_marker[:, None, None])
            for place in places
        ]
    )  # [P, N]
    return torch.where(has_marker, per_place.nan_to_num(0).amax(0), torch.nan)


@torch.no_grad()
def marker_effect(
    model: nn.Module,
    before: Tensor,
    after: Tensor,
    marker_masks: Tensor,
    target: int,
    *,
    grow: int = 2,
    batch_size: int = 64,
) -> Tensor:
    """``[N]`` the marker's part in the classifier's move from ``before`` to ``after``
    (``[N, C, H, W]``, e.g. a reconstruction and a counterfactual frame): the Shapley value
    (:func:`~cfexplain.explain.metrics.region_values`) of the pixels inside the marker mask
    (``marker_masks [N, H, W]`` grown by ``grow`` px, where G may draw the marker a little off)
    against the rest, in the probability of ``target``. It is the whole move when the
    classifier reads only the marker and 0 when it ignores it: a frame that changes the marker
    only exposes the shortcut when the classifier reacts to that change.
    """
    from cfexplain.explain.metrics import region_values

    k = 2 * grow + 1
    inside = F.max_pool2d(marker_masks.float()[:, None], k, 1, grow).to(before.device) > 0
    return region_values(model, before, after, inside[:, None], target, batch_size)[:, 0]
