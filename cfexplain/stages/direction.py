"""Direction stage: α in W, the normal of a logistic regression that predicts f(G(w)) from w.

Sample ``direction.n_samples`` latents z → w = G.mapping(z) (psi 1) → G(w) → f; fit a
class-balanced ``LogisticRegressionCV`` on standardised w (C by cross-validation) to f's
decision; un-standardise the coefficients so α is the unit normal in W itself, pointing to
where the target's probability rises. Multi-class: one direction per class (one-vs-rest) and an
ordinal one (``ordinal_fit``: the unit gradient of f's expected grade averaged per grade and then
over the grades, or a Ridge regression of the expected grade; the Ridge fit's held-out R² is
reported either way). Reported as in Schutte et al. 2021: the latent predictor's AUC on held-out
generated samples and on real test images through E; and the counterfactual metrics (flip rate,
monotonicity, proximity) of the symmetric λ grid.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from sklearn.linear_model import RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.explain import metrics as cf_metrics
from cfexplain.explain.counterfactual import CounterfactualEngine
from cfexplain.explain.directions import (
    DIRECTIONS_FILE,
    fit_linear_direction,
    mean_gradient_direction,
)
from cfexplain.nn.classifier import load_classifier
from cfexplain.nn.encoder import load_encoder, load_generator
from cfexplain.nn.perceptual import build_perceptual
from cfexplain.stages._shared import Checkpoint, sample_images, write_artifact
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_tensors
from cfexplain.utils.seeding import Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

ORDINAL_FITS = ("gradient", "ridge")


# ----------------------------------------------------------------------------- fitting (pure)


def fit_ordinal_direction(
    w: np.ndarray, grade: np.ndarray, *, holdout: float, seed: int
) -> dict[str, Any]:
    """Ridge regression of the expected grade ``[N]`` on ``w [N, w_dim]``: unit normal and held-out R²."""
    w_fit, w_hold, g_fit, g_hold = train_test_split(w, grade, test_size=holdout, random_state=seed)
    scaler = StandardScaler().fit(w_fit)
    model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(scaler.transform(w_fit), g_fit)
    coef = model.coef_ / scaler.scale_
    return {
        "direction": coef / np.linalg.norm(coef),
        "r2": float(model.score(scaler.transform(w_hold), g_hold)),
    }


def decision_labels(p: np.ndarray, target: int, min_count: int) -> tuple[np.ndarray, str]:
    """``[N]`` 0/1 labels "f decides ``target``" from probabilities ``p [N, K]``, and a note.

    When f decides one way for nearly every sample (fewer than ``min_count`` on a side) the
    labels fall back to "probability of ``target`` above its median": the fit then finds the
    direction in which that probability rises, and the note says so.
    """
    y = (p.argmax(1) == target).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() >= min_count:
        return y, ""
    median = float(np.median(p[:, target]))
    return (p[:, target] > median).astype(int), (
        f"f decided it for {counts[1]} of {len(y)} generated samples: labels are "
        f"'probability of class {target} above its median {median:.3g}' instead"
    )


def boundary_distance(w: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """Signed distance ``[N]`` of ``w [N, w_dim]`` to the plane coef · w + intercept = 0 (W units)."""
    return (w @ coef + intercept) / np.linalg.norm(coef)


# ----------------------------------------------------------------------------- stage


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Sample, score, fit; write ``directions.safetensors`` and the latent and counterfactual metrics."""
    d = distributed.setup(cfg.device)
    c, seed = cfg.direction, int(cfg.seed)
    if c.ordinal_fit not in ORDINAL_FITS:
        raise ValueError(
            f"direction.ordinal_fit must be one of {ORDINAL_FITS}, got {c.ordinal_fit!r}"
        )
    G = load_generator(run.inputs["generator"].dir, d.device)
    f = load_classifier(run.inputs["classifier"].dir, d.device)
    w, p = _sample_scores(cfg, run, G, f, d)
    metrics: dict[str, Any] = {}
    files = {"directions": DIRECTIONS_FILE}
    info: dict[str, Any] = {"samples": len(w), "processes": d.world, "device": str(d.device)}
    if run.is_main:
        tensors, metrics, more = _fit_all(c, w, p, seed)
        info |= more
        if "ordinal" in tensors and c.ordinal_fit == "gradient":
            n = min(int(c.ordinal_gradient_samples), len(w))
            ridge = tensors["ordinal"]
            tensors["ordinal"] = mean_gradient_direction(
                G, f, torch.from_numpy(w[:n]), batch_size=int(c.batch_size), device=d.device
            )
            metrics["generated/ordinal_cos_ridge"] = round(float(tensors["ordinal"] @ ridge), 4)
            info["ordinal_fit"] = (
                f"grade-balanced mean unit gradient of the expected grade, {n} samples"
            )
        E = load_encoder(run.inputs["encoder"].dir, d.device)
        metrics |= _evaluate_real(cfg, run, G, E, f, tensors, d.device)
        save_tensors(run.dir / DIRECTIONS_FILE, tensors)
        run.log({k: v for k, v in metrics.items() if isinstance(v, float)})
        run.summary(metrics)
        log.info(
            "[direction] "
            + "  ".join(f"{k} {v}" for k, v in metrics.items() if isinstance(v, float))
        )
    artifact = write_artifact(run, metrics, files, info)
    d.barrier()
    return artifact


def _sample_scores(
    cfg: DictConfig, run: Run, G, f, d: distributed.Dist
) -> tuple[np.ndarray, np.ndarray]:
    """``w [n, w_dim]`` and f's probabilities ``[n, K]`` of G(w), chunk by chunk.

    Chunk ``i`` uses latents seeded by ``i``, so the samples do not depend on the number of
    processes; ranks share the chunks, and ``state.pt`` keeps every finished chunk (resume).
    """
    c, seed = cfg.direction, int(cfg.seed)
    n, bs = int(c.n_samples), int(c.batch_size)
    n_chunks = math.ceil(n / bs)
    ckpt = Checkpoint(run, d)  # its step: the number of chunks sampled
    saved = ckpt.load()
    done: dict[str, dict[str, torch.Tensor]] = saved["chunks"] if saved else {}
    if done:
        ckpt.announce(f"with {len(done)}/{n_chunks} chunks sampled", resumed_from_chunks=len(done))
    todo = [i for i in range(n_chunks) if str(i) not in done]
    rounds = math.ceil(len(todo) / d.world)
    mine: dict[str, dict[str, torch.Tensor]] = {}
    bar = tqdm(
        total=n_chunks,
        initial=len(done),
        desc="direction: sample",
        unit="chunk",
        disable=not run.is_main,
    )
    for r in range(rounds):
        j = r * d.world + d.rank
        if j < len(todo):
            i = todo[j]
            size = min(bs, n - i * bs)
            z = torch.randn(
                size, G.z_dim, generator=generator(seed, Stream.DIRECTION_SAMPLES, i)
            ).to(d.device)
            with torch.no_grad():
                wi = G.mapping(z)
                prob = torch.softmax(f(G.synthesis(wi, noise_mode="const")), dim=1)
            # A copy: the view wi[:, 0] would save all num_ws layers of its storage.
            mine[str(i)] = {"w": wi[:, 0].float().cpu().clone(), "p": prob.float().cpu()}
        bar.update(min(d.world, len(todo) - r * d.world))
        if (r + 1) % int(cfg.checkpoint_every) == 0 or r == rounds - 1:
            done |= _gather(mine, d)
            mine = {}
            ckpt.save(len(done), chunks=done)
    bar.close()
    order = [done[str(i)] for i in range(n_chunks)]
    return torch.cat([o["w"] for o in order]).numpy(), torch.cat([o["p"] for o in order]).numpy()


def _gather(part: dict, d: distributed.Dist) -> dict:
    if not d.enabled:
        return part
    parts: list[dict] = [{} for _ in range(d.world)]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _fit_all(c: DictConfig, w: np.ndarray, p: np.ndarray, seed: int) -> tuple[dict, dict, dict]:
    """Directions for every class (binary: one), their tensors, metrics and info."""
    k = p.shape[1]
    keep = (
        p.max(1) >= float(c.keep_confident)
        if float(c.keep_confident) > 0
        else np.ones(len(p), bool)
    )
    w_k, p_k = w[keep], p[keep]
    opts = dict(
        Cs=c.Cs, cv=int(c.cv), max_iter=int(c.max_iter), holdout=float(c.holdout), seed=seed
    )
    targets = [1] if k == 2 else list(range(k))
    labels, notes = {}, {}
    for t in targets:
        labels[t], notes[t] = decision_labels(p_k, t, min_count=2 * max(int(c.cv), 2))
        if notes[t]:
            log.warning(f"[direction] class {t}: {notes[t]}")
    fits = {t: fit_linear_direction(w_k, labels[t], **opts) for t in targets}
    dists = {t: boundary_distance(w_k, fits[t]["coef"], fits[t]["intercept"]) for t in targets}
    L = np.array([float(c.lambda_scale) * np.percentile(np.abs(dists[t]), 95) for t in targets])
    metrics: dict[str, Any] = {}
    for t in targets:
        suffix = "" if k == 2 else f"_class{t}"
        metrics[f"generated/auc{suffix}"] = round(fits[t]["auc"], 4)
        metrics[f"generated/C{suffix}"] = fits[t]["C"]
    metrics["generated/positive_share"] = round(
        float((p_k.argmax(1) == (1 if k == 2 else k - 1)).mean()), 4
    )
    info = {
        "kept_confident": int(keep.sum()),
        "labels": {str(t): notes[t] or "f's decision" for t in targets},
        "lambda_range": [round(float(x), 4) for x in L],
        "w_std_mean": round(float(w.std(0).mean()), 4),
    }
    if k == 2:
        tensors = {
            "direction": torch.tensor(fits[1]["direction"], dtype=torch.float32),
            "coef": torch.tensor(fits[1]["coef"], dtype=torch.float32)[None],
            "intercept": torch.tensor([fits[1]["intercept"]], dtype=torch.float32),
        }
    else:
        tensors = {
            "directions": torch.tensor(
                np.stack([fits[t]["direction"] for t in targets]), dtype=torch.float32
            ),
            "coef": torch.tensor(np.stack([fits[t]["coef"] for t in targets]), dtype=torch.float32),
            "intercept": torch.tensor([fits[t]["intercept"] for t in targets], dtype=torch.float32),
        }
        if c.ordinal is True or (c.ordinal == "auto" and k > 2):
            grade = p_k @ np.arange(k)
            o = fit_ordinal_direction(w_k, grade, holdout=float(c.holdout), seed=seed)
            tensors["ordinal"] = torch.tensor(o["direction"], dtype=torch.float32)
            metrics["generated/ordinal_r2"] = round(o["r2"], 4)
    tensors["lambda_range"] = torch.tensor(L, dtype=torch.float32)
    return tensors, metrics, info


def _evaluate_real(
    cfg: DictConfig, run: Run, G, E, f, tensors: dict, device: torch.device
) -> dict[str, Any]:
    """Latent-predictor AUC on real test images through E (vs f(x)), and counterfactual metrics."""
    c, seed = cfg.direction, int(cfg.seed)
    test_ds = build_dataset(cfg.data, "test")
    x = sample_images(
        test_ds, min(int(c.eval_images), len(test_ds)), seed, Stream.DIRECTION_EVAL_REAL
    ).to(device)
    with torch.no_grad():
        w = torch.cat([E(b) for b in x.split(64)]).mean(1).cpu().numpy()  # wplus: the layers' mean
        p = torch.cat([torch.softmax(f(b), 1) for b in x.split(64)]).cpu().numpy()
    coef, intercept = tensors["coef"].numpy(), tensors["intercept"].numpy()
    scores = w @ coef.T + intercept  # [N, T]
    k = p.shape[1]
    metrics: dict[str, Any] = {}
    targets = [1] if k == 2 else list(range(k))
    aucs = []
    for j, t in enumerate(targets):
        y = p.argmax(1) == t
        aucs.append(float(roc_auc_score(y, scores[:, j])) if 0 < y.sum() < len(y) else math.nan)
    metrics["real_through_E/auc"] = (
        round(float(np.nanmean(aucs)), 4) if not all(map(math.isnan, aucs)) else math.nan
    )
    direction = tensors["direction"] if "direction" in tensors else tensors["directions"]
    kind = (
        run.inputs["encoder"].info.get("perceptual", "auto") if "encoder" in run.inputs else "auto"
    )
    perceptual = build_perceptual(kind, device)
    engine = CounterfactualEngine(
        G,
        E,
        f,
        direction,
        lambda_range=tensors["lambda_range"],
        num_frames=int(c.num_frames),
        perceptual=perceptual,
        device=device,
    )
    target = 1 if k == 2 else k - 1
    cf = engine(x, target=target, lambdas="symmetric")
    for key, v in cf_metrics.summary(cf, perceptual).items():
        metrics[f"counterfactual/{key}"] = round(v, 4) if not math.isnan(v) else v
    return metrics
