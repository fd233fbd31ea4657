"""DeepMiner-style unit report (Wu et al. 2018): which channels of the last conv layer drive a class.

For a head ``logits = W · GAP(A) + b`` the target logit is a sum over units ``u`` of
``W[target, u] · mean_{h,w} A_u``, so a unit's contribution to the class is
``W[target, u] × (mean activation of u over the test images predicted as target)``: the part of
the logit of a typical positive image that the unit supplies. Units are ranked by it, and each top
unit is shown by the image patches where it fires most: a crop around the maximum of its map,
twice the layer's stride wide (an approximate receptive field: the theoretical one of a deep
ResNet covers the whole image, the effective one is much smaller).

An expert names the units in ``units.csv`` (unit, contribution, name, description); reruns only
append units that are not in it yet, so the names survive.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cfexplain.utils.artifacts import write_text

UNITS_COLUMNS = ("unit", "contribution", "name", "description")


def unit_layer(model: nn.Module) -> str:
    """Name of the layer whose channels are the units: ``cam_layer`` (the map that feeds GAP in
    our ResNet, also inside a wrapper), else the last ``Conv2d``."""
    names = {id(m): name for name, m in model.named_modules()}
    for m in model.modules():
        layer = getattr(m, "cam_layer", None)
        if isinstance(layer, nn.Module) and id(layer) in names:
            return names[id(layer)]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: no units to rank")
    return convs[-1]


def head_weight(model: nn.Module, channels: int) -> Tensor:
    """``[K, C]`` weight of the last ``Linear`` (the GAP + linear head); a ValueError when its
    input is not the ``channels`` units (the contribution is then not defined)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].in_features != channels:
        got = linears[-1].in_features if linears else "no Linear"
        raise ValueError(
            f"units: the contribution needs a GAP + linear head over the {channels} units; "
            f"the last Linear takes {got} inputs"
        )
    return linears[-1].weight.detach().float().cpu()


def unit_contributions(
    activations: Tensor, weight: Tensor, target: int, positive: Tensor
) -> Tensor:
    """``[C]`` contribution of each unit to the ``target`` logit.

    Args:
        activations: ``[N, C, h, w]`` maps of the unit layer over the test images.
        weight: ``[K, C]`` head weight.
        positive: ``[N]`` bool, the images predicted as ``target``; none: all images are used.
    """
    assert activations.ndim == 4 and weight.shape[1] == activations.shape[1], (
        f"activations {tuple(activations.shape)} and head weight {tuple(weight.shape)} disagree"
    )
    mean = activations.float().mean(dim=(2, 3))  # [N, C] what GAP gives the head
    rows = mean[positive] if bool(positive.any()) else mean
    return weight[target].float() * rows.mean(dim=0)


def patch_size(image_px: int, map_px: int) -> int:
    """Side of a unit's patch: twice the stride of a map ``map_px`` wide over ``image_px``
    pixels, at least an eighth of the image, at most all of it."""
    stride = image_px / map_px
    return int(min(image_px, max(2 * stride, image_px / 8)))


@dataclass
class Patch:
    index: int  # image index in the set the activations came from
    value: float  # the unit's maximum activation in that image
    y: int  # top-left corner of the crop in the image
    x: int
    image: Tensor  # [C, p, p] the crop


def top_patches(
    activations: Tensor, images: Tensor, unit: int, k: int = 6, size: int | None = None
) -> list[Patch]:
    """The ``k`` images where ``unit`` fires most, cropped around its maximum.

    ``activations [N, C, h, w]`` and ``images [N, C_img, H, W]`` index the same images.
    """
    n, _, h, w = activations.shape
    H, W = images.shape[-2:]
    size = size or patch_size(H, h)
    flat = activations[:, unit].flatten(1)  # [N, h·w]
    peak, where = flat.max(dim=1)
    out = []
    for i in peak.argsort(descending=True)[: min(k, n)].tolist():
        iy, ix = divmod(int(where[i]), w)
        # the centre of the map cell in image pixels; the window is shifted to stay inside
        cy, cx = (iy + 0.5) * H / h, (ix + 0.5) * W / w
        y0 = int(min(max(round(cy - size / 2), 0), H - size))
        x0 = int(min(max(round(cx - size / 2), 0), W - size))
        crop = images[i, :, y0 : y0 + size, x0 : x0 + size]
        out.append(Patch(index=i, value=float(peak[i]), y=y0, x=x0, image=crop))
    return out


def read_units_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``units.csv``; a ValueError naming the file when it has no ``unit`` column."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "unit" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a CSV with columns {list(UNITS_COLUMNS)}")
        return [dict(r) for r in reader]


def update_units_csv(path: str | Path, contributions: Mapping[int, float]) -> list[dict[str, str]]:
    """Append the units of ``contributions`` that ``path`` does not list yet (creating the file
    with a header when missing); existing rows, edited names included, are kept byte for byte.

    Returns every row of the file afterwards.
    """
    path = Path(path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        rows = read_units_csv(path)
        columns = list(csv.DictReader(io.StringIO(text)).fieldnames or UNITS_COLUMNS)
    else:
        text, rows, columns = "", [], list(UNITS_COLUMNS)
    known = {r["unit"].strip() for r in rows}
    new = [
        {"unit": str(u), "contribution": f"{c:.6g}", "name": "", "description": ""}
        for u, c in contributions.items()
        if str(u) not in known
    ]
    if not new:
        return rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", extrasaction="ignore")
    if not text:
        writer.writeheader()
    elif not text.endswith("\n"):
        buf.write("\n")
    writer.writerows(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text + buf.getvalue())
    return rows + [{c: r.get(c, "") for c in columns} for r in new]


def unit_names(rows: Sequence[Mapping[str, str]]) -> dict[int, tuple[str, str]]:
    """``{unit: (name, description)}`` of the rows an expert filled in (a name or a description)."""
    out = {}
    for r in rows:
        name, desc = (r.get("name") or "").strip(), (r.get("description") or "").strip()
        try:
            unit = int(str(r.get("unit", "")).strip())
        except ValueError:
            continue  # a row the expert added by hand without a unit number
        if name or desc:
            out[unit] = (name, desc)
    return out


def rank(contributions: Tensor, top: int) -> list[int]:
    """Indices of the ``top`` units with the largest contribution, largest first."""
    return contributions.argsort(descending=True)[: max(0, top)].tolist()


def activations(model: nn.Module, images: Tensor, layer: str, batch: int = 256) -> Tensor:
    """``[N, C, h, w]`` maps of ``layer`` over ``images [N, C, H, W]``, ``batch`` at a time."""
    from cfexplain.inspect.structure import feature_maps

    device = next(model.parameters()).device
    return torch.cat(
        [feature_maps(model, x.to(device), [layer])[layer] for x in images.split(batch)]
    )
