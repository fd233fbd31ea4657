"""Directions in W: the file a direction stage writes and the logistic fit behind α.

The counterfactual engine walks along the unit normal of a linear model that predicts the
classifier's decision from w; the evaluation refits it for randomised classifiers. The ordinal
walk (KL grades) follows the mean steepest rise of the classifier's expected grade.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from cfexplain.explain.counterfactual import expected_grade

DIRECTIONS_FILE = "directions.safetensors"


def fit_linear_direction(
    w: np.ndarray, y: np.ndarray, *, Cs, cv: int, max_iter: int, holdout: float, seed: int
) -> dict[str, Any]:
    """Logistic regression ``y [N] in {0, 1}`` on ``w [N, w_dim]``.

    Returns the unit normal ``direction [w_dim]`` in W (towards y = 1), the raw-W ``coef`` and
    ``intercept`` (logit = coef · w + intercept), the chosen ``C`` and the held-out ``auc``.
    """
    counts = np.bincount(y, minlength=2)
    if counts.min() < max(cv, 2) * 2:
        raise ValueError(
            f"the classifier's decisions on the generated samples are too one-sided to fit a direction "
            f"({counts[0]} negative, {counts[1]} positive): raise direction.n_samples or check the generator"
        )
    w_fit, w_hold, y_fit, y_hold = train_test_split(
        w, y, test_size=holdout, stratify=y, random_state=seed
    )
    scaler = StandardScaler().fit(w_fit)
    with warnings.catch_warnings():  # sklearn 1.8 announces changes of defaults we do not use
        warnings.simplefilter("ignore", FutureWarning)
        model = _logistic_cv(Cs, cv, max_iter, seed).fit(scaler.transform(w_fit), y_fit)
    coef = model.coef_[0] / scaler.scale_  # back to raw W: logit = coef · w + intercept
    intercept = float(model.intercept_[0] - (model.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    auc = float(roc_auc_score(y_hold, w_hold @ coef + intercept))
    return {
        "direction": coef / np.linalg.norm(coef),
        "coef": coef,
        "intercept": intercept,
        "C": float(model.C_[0]),
        "auc": auc,
    }


def _logistic_cv(Cs, cv: int, max_iter: int, seed: int) -> LogisticRegressionCV:
    return LogisticRegressionCV(
        Cs=list(Cs),
        cv=StratifiedKFold(cv, shuffle=True, random_state=seed),
        class_weight="balanced",
        scoring="roc_auc",
        max_iter=max_iter,
    )


def mean_gradient_direction(
    G: nn.Module, f: nn.Module, w: Tensor, *, batch_size: int, device: torch.device
) -> Tensor:
    """Unit ``[w_dim]``: the unit gradient with respect to w of f's expected grade Σ k·p_k on
    G(w) (noise const), averaged within each grade f gives the samples ``w [N, w_dim]`` and then
    over those grades.

    The direction along which the grade rises wherever the samples lie, each grade with an equal
    say (a generator's samples crowd some grades: 56% KL1 on the knee KL run), where a
    regression of the grade on w fits the grade's level across the samples instead.
    """
    G, f = G.to(device).eval(), f.to(device).eval()
    units, tops = [], []
    for wb in w.split(batch_size):
        wb = wb.to(device).float().requires_grad_(True)
        ws = wb[:, None].expand(-1, G.num_ws, -1)
        probs = torch.softmax(f(G.synthesis(ws, noise_mode="const")), dim=1)
        (grad,) = torch.autograd.grad(expected_grade(probs).sum(), wb)
        units.append(F.normalize(grad, dim=1).double().cpu())
        tops.append(probs.argmax(1).cpu())
    unit, top = torch.cat(units), torch.cat(tops)
    sums = torch.zeros(int(top.max()) + 1, unit.shape[1], dtype=unit.dtype).index_add_(0, top, unit)
    counts = torch.bincount(top, minlength=len(sums)).to(unit.dtype)
    mean = (sums[counts > 0] / counts[counts > 0, None]).mean(0)
    if not mean.norm() > 0:
        raise ValueError("the classifier's expected grade does not change with w on these samples")
    return (mean / mean.norm()).float()
