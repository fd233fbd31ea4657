"""Encoder stage: E maps an image into the generator's W space, E(x) ≈ w with G(w) ≈ x.

Phase 1 (``encoder.steps``): synthetic pairs w = G.mapping(z), x = G.synthesis(w) with G frozen;
loss = latent MSE (in units of W's spread) + image L1 + LPIPS on ``image_samples`` of the batch
(0: the latent loss alone, much cheaper on a CPU: no backward pass through G and LPIPS).
Pairs come on the fly (``pool_size: 0``) or from a pool rendered once (``pool_size: N``), which
on CPU is the difference between rendering every step and rendering once.
Phase 2 (``encoder.real_steps``): ``real_batch_size`` real training images, image losses plus a prior keeping E(x)
inside W's typical shell, plus the latent loss on pool pairs so E does not drift off W.
Metrics on real test images: LPIPS, PSNR, SSIM, the classifier's agreement on x vs G(E(x)).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.nn.classifier import load_classifier
from cfexplain.nn.encoder import Encoder, load_generator
from cfexplain.nn.perceptual import Perceptual, build_perceptual
from cfexplain.stages._shared import (
    Checkpoint,
    lr_at,
    out_of_time,
    real_batch,
    sample_images,
    write_artifact,
)
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.images import save_grid
from cfexplain.utils.seeding import Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

WEIGHTS = "encoder.safetensors"


# ----------------------------------------------------------------------------- losses


def latent_loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """MSE between normalised latents ``[N, num_ws, w_dim]`` (1.0 = predicting w_avg)."""
    return (pred - true).square().mean()


def w_prior_loss(pred: torch.Tensor) -> torch.Tensor:
    """Penalty for normalised latents ``[N, num_ws, w_dim]`` outside W's typical shell.

    For w from the mapping, mean_d(((w - w_avg) / w_std)^2) ≈ 1: only the excess is penalised,
    so E may move anywhere inside the distribution but not beyond it.
    """
    return F.relu(pred.square().mean(dim=-1) - 1.0).mean()


def image_loss(
    rec: torch.Tensor, x: torch.Tensor, perceptual: Perceptual, l1: float, lpips: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """``l1 * |rec - x| + lpips * LPIPS(rec, x)`` for images ``[N, C, H, W]``, and its parts."""
    loss_l1 = (rec - x).abs().mean()
    loss_lp = perceptual(rec, x).mean() if lpips > 0 else rec.new_zeros(())
    return l1 * loss_l1 + lpips * loss_lp, {"l1": loss_l1.item(), "lpips": loss_lp.item()}


def decision_loss(f: torch.nn.Module, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """KL(f(x) || f(rec)) of the classifier's class distributions, per image, averaged.

    The counterfactual sequence starts at G(E(x)); a reconstruction the classifier reads
    differently from x explains another image. ``f`` is frozen: gradients reach E through G.
    """
    with torch.no_grad():
        target = torch.softmax(f(x).float(), dim=1)
    return F.kl_div(torch.log_softmax(f(rec).float(), dim=1), target, reduction="batchmean")


# ----------------------------------------------------------------------------- stage


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train E against the frozen generator; write its weights and reconstruction metrics."""
    d = distributed.setup(cfg.device)
    t = _build(cfg, run, d)
    ckpt = Checkpoint(run, d, rng=True, E=t.E, opt=t.opt)
    saved = ckpt.load()
    s: dict[str, Any] = saved["loop"] if saved else {"step": 0, "seconds": 0.0, "cut": []}
    if saved:
        ckpt.announce(f"at step {s['step']}", resumed_from_step=s["step"])
    if float(cfg.encoder.decision_weight) > 0 and int(cfg.encoder.real_steps) > 0:
        t.f = load_classifier(run.inputs["classifier"].dir, d.device).eval()
        t.f.requires_grad_(False)
    t.ddp = distributed.wrap_ddp(t.E, d)
    _train(cfg, run, t, s, ckpt, d)
    return _finish(cfg, run, t, s, d)


@dataclass
class _Trainee:
    """What the loop trains and what it trains against: the frozen G (and classifier f)."""

    G: torch.nn.Module
    E: Encoder
    kwargs: dict[str, Any]  # E's constructor arguments, saved with its weights
    opt: torch.optim.Optimizer
    perceptual: Perceptual
    pool: _Pool | None
    train_ds: Dataset | None
    f: torch.nn.Module | None = None  # the classifier of the decision loss
    ddp: torch.nn.Module | None = None  # E, or E under DistributedDataParallel


def _build(cfg: DictConfig, run: Run, d: distributed.Dist) -> _Trainee:
    """Load G, build E (initialised from the seed, with W's statistics), its optimiser, the pool."""
    e, seed = cfg.encoder, int(cfg.seed)
    G = load_generator(run.inputs["generator"].dir, d.device)
    res, ch = G.img_resolution, G.img_channels
    if (int(cfg.data.resolution), int(cfg.data.channels)) != (res, ch):
        raise ValueError(
            f"data.resolution/channels = {cfg.data.resolution}/{cfg.data.channels} but the generator "
            f"makes {res} px, {ch} channel(s): train the encoder on the generator's data"
        )
    if int(e.batch_size) % d.world:
        raise ValueError(
            f"encoder.batch_size={e.batch_size} must be divisible by the number of processes ({d.world})"
        )
    if int(e.real_steps) > 0 and int(e.real_batch_size) // d.world < 1:
        raise ValueError(
            f"encoder.real_batch_size={e.real_batch_size} must give every process at least one image"
        )
    perceptual = build_perceptual(str(e.perceptual), d.device)
    log.info(f"[encoder] perceptual distance: {perceptual.kind} — {perceptual.note}")

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        k: v for k, v in OmegaConf.to_container(e.model, resolve=True).items() if k != "_target_"
    }
    kwargs |= dict(img_resolution=res, img_channels=ch, w_dim=G.w_dim, num_ws=G.num_ws)
    E: Encoder = instantiate(
        e.model, **{k: kwargs[k] for k in ("img_resolution", "img_channels", "w_dim", "num_ws")}
    )
    E.set_w_stats(G.mapping.w_avg, _w_std(G, int(e.stats_samples), seed, d.device))
    E = E.to(d.device)
    opt = torch.optim.Adam(E.parameters(), lr=float(e.lr), betas=(0.9, 0.99))
    pool = _Pool(G, int(e.pool_size), seed, d.device) if int(e.pool_size) > 0 else None
    train_ds = build_dataset(cfg.data, "train") if int(e.real_steps) > 0 else None
    return _Trainee(G, E, kwargs, opt, perceptual, pool, train_ds)


def _train(
    cfg: DictConfig, run: Run, t: _Trainee, s: dict[str, Any], ckpt: Checkpoint, d: distributed.Dist
) -> None:
    """The synthetic phase, then the real one, from step ``s['step']`` to the end."""
    e = cfg.encoder
    total = int(e.steps) + int(e.real_steps)
    lr = dict(
        base=float(e.lr), warmup=int(e.warmup_steps), total=total, min_ratio=float(e.min_lr_ratio)
    )
    # A wall-clock budget (max_minutes) split between the phases in proportion to their steps.
    max_seconds = float(e.max_minutes) * 60 if e.get("max_minutes") else math.inf
    synthetic_seconds = max_seconds * int(e.steps) / max(total, 1)
    bar = tqdm(total=total, initial=s["step"], desc="encoder", unit="step", disable=not run.is_main)
    t0 = time.time() - s["seconds"]
    while s["step"] < total:
        step = s["step"]
        synthetic = step < int(e.steps)
        loss, loss_lat, parts = _loss(cfg, t, step, synthetic, d)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in t.opt.param_groups:
            group["lr"] = lr_at(step, **lr)
        t.opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"encoder loss is {loss.item()} at step {step}: lower encoder.lr"
            )
        s["step"] += 1
        bar.update()
        if s["step"] % 10 == 0 or s["step"] == total:
            bar.set_postfix(
                latent=f"{loss_lat.item():.3f}",
                l1=f"{parts['l1']:.3f}",
                lpips=f"{parts['lpips']:.3f}",
            )
            row = {f"train/{k}": parts.get(k, 0.0) for k in ("l1", "lpips", "prior", "decision")}
            run.log(
                {"train/latent": loss_lat.item(), **row}
                | {"train/phase": 0 if synthetic else 1, "train/lr": t.opt.param_groups[0]["lr"]},
                step=s["step"],
            )
        s["seconds"] = time.time() - t0
        budget, end = (synthetic_seconds, int(e.steps)) if synthetic else (max_seconds, total)
        if s["step"] < end and out_of_time(s["seconds"], budget, d):
            s["cut"].append(
                f"{'synthetic' if synthetic else 'real'} phase stopped by encoder.max_minutes at step {s['step']}"
            )
            log.warning(f"[encoder] {s['cut'][-1]}")
            bar.update(end - s["step"])
            s["step"] = end
        if s["step"] % int(cfg.checkpoint_every) == 0 or s["step"] == end:
            ckpt.save(s["step"], loop=s)
    bar.close()


def _loss(
    cfg: DictConfig, t: _Trainee, step: int, synthetic: bool, d: distributed.Dist
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One step's loss, its latent part and the parts it logs.

    Synthetic phase: the latent loss on pairs, plus image losses through G on ``image_samples``
    of them. Real phase: real images have no true w: image losses and the W prior, plus the
    latent loss on synthetic pairs so that E keeps speaking W (one forward pass for both).
    """
    e, seed, per_rank = cfg.encoder, int(cfg.seed), int(cfg.encoder.batch_size) // d.world
    w_true, x_syn = _pairs(t.G, t.pool, per_rank, seed, step, d)
    weights = float(e.l1_weight), float(e.lpips_weight)
    if synthetic:
        pred = t.ddp(x_syn)
        loss_lat = latent_loss(t.E.normalise(pred), t.E.normalise(w_true))
        loss, parts = float(e.latent_weight) * loss_lat, {"l1": 0.0, "lpips": 0.0}
        k_img = min(int(e.image_samples), per_rank)
        if k_img > 0:  # image losses through G: the costly part on a CPU
            rec = t.G.synthesis(pred[:k_img], noise_mode="const")
            loss_img, parts = image_loss(rec, x_syn[:k_img], t.perceptual, *weights)
            loss = loss + loss_img
        parts["prior"] = 0.0
        return loss, loss_lat, parts
    k_real = int(e.real_batch_size) // d.world
    real = real_batch(t.train_ds, k_real, seed, step, d).to(d.device)
    pred = t.ddp(torch.cat([real, x_syn]))
    pred_real, pred_syn = pred[:k_real], pred[k_real:]
    loss_lat = latent_loss(t.E.normalise(pred_syn), t.E.normalise(w_true))
    rec = t.G.synthesis(pred_real, noise_mode="const")
    loss_img, parts = image_loss(rec, real, t.perceptual, *weights)
    prior = w_prior_loss(t.E.normalise(pred_real))
    loss = float(e.latent_weight) * loss_lat + loss_img + float(e.prior_weight) * prior
    parts["prior"] = prior.item()
    if t.f is not None:
        decision = decision_loss(t.f, rec, real)
        loss = loss + float(e.decision_weight) * decision
        parts["decision"] = decision.item()
    return loss, loss_lat, parts


def _finish(
    cfg: DictConfig, run: Run, t: _Trainee, s: dict[str, Any], d: distributed.Dist
) -> Artifact:
    """Save E, measure its reconstructions (rank 0) and write the artifact."""
    e = cfg.encoder
    t.E.eval()
    files = {"encoder": WEIGHTS, "reconstructions": "reconstructions.png"}
    metrics: dict[str, Any] = {}
    if run.is_main:
        save_model(run.dir / WEIGHTS, t.E, e.model._target_, t.kwargs)
        metrics = _evaluate(cfg, run, t.G, t.E, t.perceptual, d.device)
        run.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=s["step"])
        run.summary(metrics)
    info = {
        "model": f"{e.model._target_} {t.kwargs}",
        "space": t.E.space,
        "perceptual": t.perceptual.kind,
        "perceptual_note": t.perceptual.note,
        "parameters": sum(p.numel() for p in t.E.parameters()),
        "pairs": f"pool of {int(e.pool_size)} rendered once" if t.pool else "rendered on the fly",
        "train_seconds": round(s["seconds"], 1),
        "stopped_by_time_budget": s["cut"],
        "processes": d.world,
        "device": str(d.device),
    }
    return write_artifact(run, metrics, files, info)


# ----------------------------------------------------------------------------- pieces


@torch.no_grad()
def _w_std(G: torch.nn.Module, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Per-dimension spread ``[w_dim]`` of w = G.mapping(z) over ``n`` seeded latents."""
    z = torch.randn(n, G.z_dim, generator=generator(seed, Stream.ENCODER_W_STD)).to(device)
    return G.mapping(z)[:, 0].std(dim=0)


@torch.no_grad()
def render(
    G: torch.nn.Module, z: torch.Tensor, chunk: int = 64, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [N, num_ws, w_dim], x [N, C, H, W])`` for latents ``z [N, z_dim]`` (psi 1, noise const).

    ``desc``: show a progress bar with that title.
    """
    ws, xs = [], []
    for zb in tqdm(z.split(chunk), desc=desc, unit="batch", disable=desc is None):
        w = G.mapping(zb)
        ws.append(w)
        xs.append(G.synthesis(w, noise_mode="const"))
    return torch.cat(ws), torch.cat(xs)


class _Pool:
    """``size`` synthetic pairs rendered once from seeded latents (the same after a resume)."""

    def __init__(self, G: torch.nn.Module, size: int, seed: int, device: torch.device) -> None:
        z = torch.randn(size, G.z_dim, generator=generator(seed, Stream.ENCODER_POOL)).to(device)
        self.w, self.x = render(G, z, desc=f"encoder: render a pool of {size} pairs")

    def sample(self, n: int, seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(
            len(self.w), (n,), generator=generator(seed, Stream.ENCODER_POOL_DRAW, step, rank)
        ).to(self.w.device)
        return self.w[idx], self.x[idx]


def _pairs(G, pool: _Pool | None, n: int, seed: int, step: int, d: distributed.Dist):
    """This rank's synthetic pairs ``(w [n, num_ws, w_dim], x [n, C, H, W])`` for ``step``."""
    if pool is not None:
        return pool.sample(n, seed, step, d.rank)
    z = torch.randn(n, G.z_dim, generator=generator(seed, Stream.ENCODER_PAIRS, step, d.rank)).to(
        d.device
    )
    return render(G, z)


@torch.no_grad()
def reconstruct(
    G: torch.nn.Module, E: torch.nn.Module, x: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """``G(E(x)) [N, C, H, W]`` for images ``x [N, C, H, W]``."""
    return torch.cat([G.synthesis(E(xb), noise_mode="const") for xb in x.split(chunk)])


@torch.no_grad()
def reconstruction_metrics(
    x: torch.Tensor,
    rec: torch.Tensor,
    perceptual: Perceptual,
    classifier: torch.nn.Module | None,
    chunk: int = 64,
) -> dict[str, float]:
    """LPIPS, PSNR (dB, range [-1, 1]), SSIM and classifier agreement of ``rec`` vs ``x`` ``[N, C, H, W]``."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    lp = torch.cat([perceptual(a, b) for a, b in zip(x.split(chunk), rec.split(chunk))])
    mse = (x - rec).square().flatten(1).mean(1).clamp_min(1e-12)
    out = {
        "lpips": lp.mean().item(),
        "psnr": (10 * torch.log10(4.0 / mse)).mean().item(),
        "ssim": ssim(rec.float().cpu(), x.float().cpu(), data_range=2.0).item(),
        "l1": (x - rec).abs().mean().item(),
    }
    if classifier is not None:
        p = torch.cat([torch.softmax(classifier(b), 1) for b in x.split(chunk)])
        q = torch.cat([torch.softmax(classifier(b), 1) for b in rec.split(chunk)])
        out["classifier_agreement"] = (p.argmax(1) == q.argmax(1)).float().mean().item()
        # Total variation between the class distributions: |p1 - q1| for a binary classifier.
        out["classifier_prob_diff"] = (0.5 * (p - q).abs().sum(1)).mean().item()
    return out


def _evaluate(
    cfg: DictConfig, run: Run, G, E: Encoder, perceptual: Perceptual, device: torch.device
) -> dict[str, Any]:
    e, seed = cfg.encoder, int(cfg.seed)
    test_ds: Dataset = build_dataset(cfg.data, "test")
    x = sample_images(
        test_ds, min(int(e.eval_images), len(test_ds)), seed, Stream.ENCODER_EVAL_REAL
    ).to(device)
    classifier = (
        load_classifier(run.inputs["classifier"].dir, device)
        if "classifier" in run.inputs
        else None
    )
    rec = reconstruct(G, E, x, int(e.eval_batch_size))
    metrics = {
        f"test/{k}": round(v, 4)
        for k, v in reconstruction_metrics(x, rec, perceptual, classifier).items()
    }
    # Held-out synthetic pairs: how well E inverts G where the true w is known.
    z = torch.randn(
        int(e.eval_images), G.z_dim, generator=generator(seed, Stream.ENCODER_EVAL_W)
    ).to(device)
    w_true, x_syn = render(G, z)
    with torch.no_grad():
        w_pred = torch.cat([E(b) for b in x_syn.split(int(e.eval_batch_size))])
        rec_syn = torch.cat(
            [G.synthesis(w, noise_mode="const") for w in w_pred.split(int(e.eval_batch_size))]
        )
        mean_img = G.synthesis(E.w_avg.expand(1, G.num_ws, -1), noise_mode="const")
    metrics |= {
        "synthetic/latent_nmse": round(
            latent_loss(E.normalise(w_pred), E.normalise(w_true)).item(), 4
        ),
        "synthetic/latent_nmse_w_avg": round(E.normalise(w_true).square().mean().item(), 4),
        "synthetic/l1": round((rec_syn - x_syn).abs().mean().item(), 4),
        "synthetic/l1_w_avg": round((mean_img - x_syn).abs().mean().item(), 4),
    }
    n = min(8, len(x))
    pair = torch.stack([x[:n], rec[:n]], 1).flatten(0, 1).cpu()
    save_grid(pair, run.dir / "reconstructions.png", nrow=2, scale=2)
    run.log_images(
        "test/reconstructions", pair, [f"{'x' if i % 2 == 0 else 'G(E(x))'}" for i in range(2 * n)]
    )
    log.info("[encoder] " + "  ".join(f"{k} {v}" for k, v in metrics.items()))
    return metrics
