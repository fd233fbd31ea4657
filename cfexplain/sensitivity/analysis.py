"""Sweeps: a model's output as one controlled transformation varies over its parameter.

For a classifier the output is the probability of the target class; for a segmentation model
(logits ``[N, K, H, W]``), the Dice per class of its masks against the ground truth moved by
the same transformation (misas, Ankenbrand et al. 2021). Computing a sweep is separate from
drawing it (``page``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cfexplain.nn.segmentation import dice_scores, predict_masks
from cfexplain.sensitivity.transforms import Transform, get_transform

TASKS = ("classification", "segmentation")


@dataclass
class SweepResult:
    """One transformation swept over ``params`` (P values) for N images, on the CPU.

    Attributes:
        transform: registry name; ``unit`` what its parameter measures.
        params: the P parameter values, in sweep order.
        identity: the parameter value that leaves the image unchanged.
        task: ``classification`` or ``segmentation``.
        outputs: names of the output columns: ``[p(<target>)]`` or the K mask names.
        values: ``[P, N, O]`` per-image outputs (probabilities, or Dice per class; NaN where
            a class is neither in the truth nor in the prediction).
        examples: ``[P, E, C, H, W]`` the first E inputs, transformed.
        example_masks: ``[P, E, K, H, W]`` bool predicted masks of the examples (segmentation).
    """

    transform: str
    unit: str
    params: list[float]
    identity: float
    task: str
    outputs: list[str]
    values: Tensor
    examples: Tensor
    example_masks: Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def mean(self) -> Tensor:
        """``[P, O]`` mean over images (NaN entries left out)."""
        return self.values.nanmean(dim=1)

    def spread(self) -> Tensor:
        """``[P, O]`` standard deviation over images (NaN entries left out; 0 for one image)."""
        v = self.values
        ok = ~torch.isnan(v)
        n = ok.sum(1).clamp_min(1)
        mu = self.mean()
        var = torch.where(ok, (v - mu[:, None]) ** 2, torch.zeros_like(v)).sum(1) / n
        return var.sqrt()

    def summary(self) -> dict[str, dict[str, float]]:
        """Per output: the mean at the identity, the lowest and highest mean along the sweep,
        their difference (``range``: the sensitivity) and the parameter of the lowest mean."""
        m = self.mean()
        ident = min(range(len(self.params)), key=lambda i: abs(self.params[i] - self.identity))
        out = {}
        for o, name in enumerate(self.outputs):
            col = m[:, o]
            finite = ~torch.isnan(col)
            if not finite.any():
                out[name] = dict.fromkeys(("identity", "min", "max", "range", "worst"), math.nan)
                continue
            lo = int(torch.where(finite, col, torch.full_like(col, math.inf)).argmin())
            hi = float(col[finite].max())
            out[name] = {
                "identity": float(col[ident]),
                "min": float(col[lo]),
                "max": hi,
                "range": hi - float(col[lo]),
                "worst": float(self.params[lo]),
            }
        return out


def _device(model: nn.Module, x: Tensor) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else x.device


@torch.no_grad()
def sweep(
    model: nn.Module,
    x: Tensor,
    transform: str | Transform,
    params: Sequence[float] | None = None,
    *,
    task: str = "classification",
    target: int = 1,
    masks: Tensor | None = None,
    outputs: Sequence[str] | None = None,
    activation: str = "sigmoid",
    threshold: float = 0.5,
    batch_size: int = 64,
    examples: int = 4,
) -> SweepResult:
    """Sweep ``transform`` over ``params`` (default: its range) on images ``x [N, C, H, W]``.

    Classification: the model gives logits ``[N, K]``; the output is softmax[:, target].
    Segmentation: logits ``[N, K, H, W]``, masks ``[N, K, H, W]`` bool; the output is the Dice
    per class of ``predict_masks(logits, activation, threshold)`` against the masks, moved by
    the transform when it is geometric. Runs in batches of ``batch_size`` on the model's device,
    in eval mode (restored afterwards), without gradients.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    t = get_transform(transform) if isinstance(transform, str) else transform
    params = [float(p) for p in (t.params if params is None else params)]
    if not params:
        raise ValueError(f"{t.name}: no parameter values to sweep")
    assert x.ndim == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}"
    names = _output_names(x, task, target, masks, outputs)
    device = _device(model, x)
    was_training = getattr(model, "training", False)
    model.eval()
    n_ex = min(examples, len(x))
    values, shown, shown_masks = [], [], []
    try:
        for p in params:
            per_p = []
            for start in range(0, len(x), batch_size):
                xb = t.apply(x[start : start + batch_size].to(device), p)
                out = model(xb)
                if task == "classification":
                    per_p.append(_probability(out, target))
                else:
                    assert masks is not None  # _output_names asked for them
                    mb = masks[start : start + batch_size]
                    dice, pred = _dice(out, xb, mb, t, p, activation, threshold)
                    per_p.append(dice)
                    if start == 0:
                        shown_masks.append(pred[:n_ex])
                if start == 0:
                    shown.append(xb[:n_ex].float().cpu())
            values.append(torch.cat(per_p))
    finally:
        model.train(was_training)
    return SweepResult(
        transform=t.name,
        unit=t.unit,
        params=params,
        identity=t.identity,
        task=task,
        outputs=names,
        values=torch.stack(values),
        examples=torch.stack(shown),
        example_masks=torch.stack(shown_masks) if shown_masks else None,
    )


def _output_names(
    x: Tensor, task: str, target: int, masks: Tensor | None, outputs: Sequence[str] | None
) -> list[str]:
    """The O output column names, after checking that segmentation masks fit ``x``."""
    if task == "classification":
        return list(outputs) if outputs is not None else [f"p(class {target})"]
    if masks is None:
        raise ValueError("task=segmentation needs ground-truth masks [N, K, H, W]")
    assert masks.ndim == 4 and masks.shape[0] == x.shape[0] and masks.shape[-2:] == x.shape[-2:], (
        f"masks {tuple(masks.shape)} do not fit images {tuple(x.shape)}: expected [N, K, H, W]"
    )
    names = list(outputs) if outputs is not None else [f"class {k}" for k in range(masks.shape[1])]
    assert len(names) == masks.shape[1], f"{len(names)} output names for {masks.shape[1]} masks"
    return names


def _probability(logits: Tensor, target: int) -> Tensor:
    """Classifier logits ``[n, K]`` -> ``[n, 1]`` softmax probability of ``target``, on the CPU."""
    assert logits.ndim == 2 and 0 <= target < logits.shape[1], (
        f"classifier output {tuple(logits.shape)}: expected logits [N, K] with target {target} < K"
    )
    return torch.softmax(logits.float(), dim=1)[:, target : target + 1].cpu()


def _dice(
    logits: Tensor,
    xb: Tensor,
    masks: Tensor,
    t: Transform,
    p: float,
    activation: str,
    threshold: float,
) -> tuple[Tensor, Tensor]:
    """Dice ``[n, K]`` of the predicted masks of ``logits [n, K, H, W]`` against ``masks`` moved
    by ``t`` at ``p``, and the predicted masks ``[n, K, H, W]`` bool, on the CPU."""
    assert (
        logits.ndim == 4
        and logits.shape[1] == masks.shape[1]
        and logits.shape[-2:] == xb.shape[-2:]
    ), f"segmentation output {tuple(logits.shape)}: expected logits {tuple(masks.shape)}"
    pred = predict_masks(logits, activation, threshold).cpu()
    truth = t.apply_mask(masks.bool().cpu(), p)
    return dice_scores(pred, truth).float(), pred


def result_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per (parameter, output): mean, spread and count of the images it averages."""
    m, s = result.mean(), result.spread()
    counts = (~torch.isnan(result.values)).sum(1)
    rows = []
    for i, p in enumerate(result.params):
        for o, name in enumerate(result.outputs):
            rows.append(
                {
                    "transform": result.transform,
                    "param": p,
                    "output": name,
                    "mean": float(m[i, o]),
                    "std": float(s[i, o]),
                    "images": int(counts[i, o]),
                }
            )
    return rows
