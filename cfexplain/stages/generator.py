"""Generator stage: StyleGAN2-ADA trained on the stage chain's dataset.

The stage reads top to bottom: build → train → finish. An iteration draws a real batch and
runs its phases, written as data (:class:`Phase`, as the published loop does): G (non-saturating
loss, lazy path length), then D (logistic loss, lazy R1); then G EMA → ADA p → log →
snapshot/checkpoint. Gradients are averaged across ranks by hand (the published recipe), so the
same loop runs alone or under torchrun. Quality: Fréchet distance and KID on the trained classifier's features, and the class
shares the classifier gives generated vs real images.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.nn import gan
from cfexplain.nn.augment import AugmentPipe, ada_adjust
from cfexplain.nn.classifier import load_classifier
from cfexplain.stages._shared import (
    Checkpoint,
    out_of_time,
    real_batch,
    sample_images,
    write_artifact,
)
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.images import save_grid
from cfexplain.utils.quality import FeatureStats, inception_fd
from cfexplain.utils.seeding import METRIC_SEED, Stream, derived_seed, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


class DivergenceError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train G and D with ADA; write G_ema/G/D weights, snapshot grids and quality metrics."""
    d = distributed.setup(cfg.device)
    train_ds = build_dataset(cfg.data, "train")
    t = _build(cfg, d)
    quality = _Quality(cfg, run, d.device) if run.is_main else None
    ckpt = Checkpoint(run, d, **t.states())
    saved = ckpt.load()
    s: dict[str, Any] = saved["loop"] if saved else _start()
    if saved:
        t.G_best = saved.get("G_best")
        ckpt.announce(
            f"at {s['nimg'] / 1000:.1f} kimg, ADA p={t.augment.p.item():.3f}",
            resumed_from_kimg=round(s["nimg"] / 1000, 3),
        )
    _train(cfg, run, t, s, train_ds, quality, ckpt, d)
    more = {"data": train_ds.source, **(quality.info if quality else {})}
    return _finish(cfg, run, t, s, more, d)


def _start() -> dict[str, Any]:
    """The loop's counters before the first step."""
    return {
        "step": 0,
        "nimg": 0,
        "pl_mean": 0.0,
        "ada_acc": [0.0, 0.0],
        "train_seconds": 0.0,
        "snapshots": [],
        "best": None,  # index into snapshots of the kept G_ema (generator.keep=best)
    }


@dataclass
class _GAN:
    """The networks in training, their optimisers and the augment pipe."""

    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    augment: AugmentPipe
    G_opt: torch.optim.Optimizer
    D_opt: torch.optim.Optimizer
    g_kwargs: dict[str, Any]  # constructor arguments, saved with the weights
    d_kwargs: dict[str, Any]
    G_best: dict[str, torch.Tensor] | None = None  # the kept G_ema (generator.keep=best)

    def states(self) -> dict[str, Any]:
        """What ``state.pt`` keeps, by name."""
        return {
            "G": self.G,
            "D": self.D,
            "G_ema": self.G_ema,
            "augment": self.augment,
            "G_opt": self.G_opt,
            "D_opt": self.D_opt,
        }


def _build(cfg: DictConfig, d: distributed.Dist) -> _GAN:
    """G and D initialised from the seed, G's EMA copy, the ADA pipe, the lazy Adam optimisers."""
    g = cfg.generator
    res, ch = int(cfg.data.resolution), int(cfg.data.channels)
    if int(g.batch_size) % d.world:
        raise ValueError(
            f"generator.batch_size={g.batch_size} must be divisible by the number of processes ({d.world})"
        )
    torch.manual_seed(int(cfg.seed))
    g_kwargs = _kwargs(g.G, img_resolution=res, img_channels=ch)
    d_kwargs = _kwargs(g.D, img_resolution=res, img_channels=ch)
    G = instantiate(g.G, img_resolution=res, img_channels=ch).to(d.device)
    D = instantiate(g.D, img_resolution=res, img_channels=ch).to(d.device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    augment = AugmentPipe(**OmegaConf.to_container(g.ada.pipe, resolve=True)).to(d.device)
    if g.ada.fixed_p is not None:
        augment.p.fill_(float(g.ada.fixed_p))
    betas = tuple(float(b) for b in g.betas)
    g_lr, g_betas = gan.lazy_adam_hparams(
        float(g.glr), betas, _interval(g.pl_weight, g.pl_interval)
    )
    d_lr, d_betas = gan.lazy_adam_hparams(float(g.dlr), betas, _interval(g.r1_gamma, g.r1_interval))
    G_opt = torch.optim.Adam(G.parameters(), lr=g_lr, betas=g_betas, eps=1e-8)
    D_opt = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas, eps=1e-8)
    return _GAN(G, D, G_ema, augment, G_opt, D_opt, g_kwargs, d_kwargs)


def _interval(weight: float, interval: int) -> int:
    """Steps between two lazy regularisations; 0 when the regulariser is off."""
    return int(interval) if weight > 0 else 0


# ----------------------------------------------------------------------------- one iteration


@dataclass
class _Batch:
    """One iteration's draws for this rank, and what its phases measured (detached)."""

    real: torch.Tensor  # [n, C, H, W]
    z: torch.Tensor  # [n, z_dim]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """One optimiser step of an iteration, as data (the published loop's phases): ``loss(batch,
    reg)`` yields the losses to backpropagate into ``module``, one after the other: the main
    one, then its lazy regularisation when ``reg`` (every ``interval`` steps; 0: never) unless
    the loss folds it in; then ``opt`` steps."""

    name: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    interval: int
    loss: Callable[[_Batch, bool], Iterator[torch.Tensor]]


def _phases(g: DictConfig, t: _GAN, s: dict[str, Any], d: distributed.Dist) -> list[Phase]:
    """An iteration: G (non-saturating loss, lazy path length), then D (logistic, lazy R1)."""
    return [
        Phase(
            "G", t.G, t.G_opt, _interval(g.pl_weight, g.pl_interval), partial(_g_loss, g, t, s, d)
        ),
        Phase("D", t.D, t.D_opt, _interval(g.r1_gamma, g.r1_interval), partial(_d_loss, g, t)),
    ]


def _g_loss(
    g: DictConfig, t: _GAN, s: dict[str, Any], d: distributed.Dist, b: _Batch, reg: bool
) -> Iterator[torch.Tensor]:
    """Fool D; then, when ``reg``, the path-length penalty on half the batch (its own backward)."""
    fake = t.G.synthesis(_mapping(t.G, b.z, float(g.style_mixing)), noise_mode="random")
    yield gan.g_nonsaturating_loss(t.D(t.augment(fake)))
    if reg:
        n_pl = max(len(b.z) // 2, 1)
        ws_pl = _mapping(t.G, b.z[:n_pl], float(g.style_mixing)).detach().requires_grad_(True)
        lengths = gan.path_length(t.G.synthesis(ws_pl, noise_mode="random"), ws_pl)
        pl_mean = s["pl_mean"] + 0.01 * (_mean_across(lengths.mean().detach(), d) - s["pl_mean"])
        s["pl_mean"] = float(pl_mean)
        yield ((lengths - pl_mean).square().mean()) * float(g.pl_weight) * int(g.pl_interval)


def _d_loss(g: DictConfig, t: _GAN, b: _Batch, reg: bool) -> Iterator[torch.Tensor]:
    """Tell reals from fakes, with the R1 penalty on the reals when ``reg`` (one backward)."""
    with torch.no_grad():
        fake = t.G.synthesis(_mapping(t.G, b.z, float(g.style_mixing)), noise_mode="random")
    b.real.requires_grad_(reg)
    real_logits = t.D(t.augment(b.real))
    fake_logits = t.D(t.augment(fake))
    loss = gan.d_logistic_loss(real_logits, fake_logits)
    if reg:
        r1 = gan.r1_penalty(real_logits, b.real)
        loss = loss + r1.mean() * (float(g.r1_gamma) / 2) * int(g.r1_interval)
    b.stats |= {"real_logits": real_logits.detach(), "fake_logits": fake_logits.detach()}
    yield loss


def _run_phase(
    phase: Phase, phases: list[Phase], b: _Batch, step: int, d: distributed.Dist
) -> None:
    """Backpropagate the phase's losses (the other phases' modules frozen meanwhile), step."""
    others = [p.module for p in phases if p.module is not phase.module]
    for m in others:
        m.requires_grad_(False)
    phase.opt.zero_grad(set_to_none=True)
    for i, loss in enumerate(phase.loss(b, phase.interval > 0 and step % phase.interval == 0)):
        if i == 0:  # the main loss, logged as loss/<name>
            b.stats[f"loss/{phase.name}"] = loss.detach()
        loss.backward()
    _optimizer_step(phase.module, phase.opt, d)
    for m in others:
        m.requires_grad_(True)


def _iteration(
    cfg: DictConfig,
    t: _GAN,
    phases: list[Phase],
    s: dict[str, Any],
    ds: Dataset,
    d: distributed.Dist,
) -> _Batch:
    """Draw this rank's batch for step ``s['step']`` and run the phases on it."""
    seed, per_rank = int(cfg.seed), int(cfg.generator.batch_size) // d.world
    # Latents, noise and augmentations of a step come from (seed, step, rank): each rank draws
    # its own, a resumed run draws what the uninterrupted one did, and state.pt needs no RNG.
    torch.manual_seed(derived_seed(seed, Stream.GENERATOR_STEP, s["step"], d.rank))
    real = real_batch(ds, per_rank, seed, s["step"], d).to(d.device)
    b = _Batch(real, torch.randn(per_rank, t.G.z_dim, device=d.device))
    for phase in phases:
        _run_phase(phase, phases, b, s["step"], d)
    return b


def _advance(g: DictConfig, t: _GAN, s: dict[str, Any], b: _Batch, d: distributed.Dist) -> None:
    """After an iteration: count it, update G's EMA, adjust ADA p from the sign of D on reals."""
    batch = int(g.batch_size)
    s["nimg"] += batch
    s["step"] += 1
    gan.ema_update(t.G_ema, t.G, gan.ema_beta(batch, s["nimg"], float(g.ema_kimg), g.ema_rampup))
    signs = torch.tensor(
        [b.stats["real_logits"].sign().sum().item(), b.stats["real_logits"].numel()],
        dtype=torch.float64,
    )
    if d.enabled:
        dist.all_reduce(signs)
    s["ada_acc"] = [s["ada_acc"][0] + signs[0].item(), s["ada_acc"][1] + signs[1].item()]
    if g.ada.fixed_p is None and s["step"] % int(g.ada.interval) == 0:
        rt = s["ada_acc"][0] / max(s["ada_acc"][1], 1)
        t.augment.p.fill_(
            ada_adjust(
                t.augment.p.item(),
                rt,
                target=float(g.ada.target),
                batch=batch,
                interval=int(g.ada.interval),
                ada_kimg=float(g.ada.kimg),
            )
        )
        s["ada_acc"] = [0.0, 0.0]


# ----------------------------------------------------------------------------- the loop


def _train(
    cfg: DictConfig,
    run: Run,
    t: _GAN,
    s: dict[str, Any],
    ds: Dataset,
    quality: _Quality | None,
    ckpt: Checkpoint,
    d: distributed.Dist,
) -> None:
    """Iterate until ``generator.kimg`` (or the time budget); snapshot and checkpoint on the way."""
    g, batch = cfg.generator, int(cfg.generator.batch_size)
    total_nimg = int(float(g.kimg) * 1000)
    max_seconds = float(g.max_minutes) * 60 if g.get("max_minutes") else math.inf
    snapshot_nimg = int(float(g.snapshot_kimg) * 1000)
    phases = _phases(g, t, s, d)
    grid_z = torch.randn(
        int(g.grid_size), t.G.z_dim, generator=generator(int(cfg.seed), Stream.GENERATOR_GRID)
    ).to(d.device)
    bar = tqdm(
        total=total_nimg / 1000,
        initial=min(s["nimg"], total_nimg) / 1000,
        unit="kimg",
        desc="generator",
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]",
        disable=not run.is_main,
    )
    t0 = time.time() - s["train_seconds"]
    while s["nimg"] < total_nimg and not s.get("out_of_time"):
        b = _iteration(cfg, t, phases, s, ds, d)
        losses = torch.stack([b.stats["loss/G"], b.stats["loss/D"]])
        if not torch.isfinite(losses).all():
            raise DivergenceError(
                f"generator diverged at {s['nimg'] / 1000:.2f} kimg (G loss {losses[0]:.3g}, D loss {losses[1]:.3g}); "
                f"the last good checkpoint {ckpt.path} is untouched: lower generator.glr/dlr or raise generator.r1_gamma"
            )
        _advance(g, t, s, b, d)
        s["train_seconds"] = time.time() - t0
        bar.update((min(s["nimg"], total_nimg) - min(s["nimg"] - batch, total_nimg)) / 1000)
        if s["step"] % 10 == 0:
            _log(run, bar, t, s, b)
        s["out_of_time"] = out_of_time(s["train_seconds"], max_seconds, d)
        done = s["nimg"] >= total_nimg or s["out_of_time"]
        if done or s["nimg"] // snapshot_nimg > (s["nimg"] - batch) // snapshot_nimg:
            if quality is not None:
                _snapshot(g, t, s, quality, grid_z, final=done)
            ckpt.save(s["step"], loop=s, **({"G_best": t.G_best} if t.G_best is not None else {}))
        elif s["step"] % int(cfg.checkpoint_every) == 0:
            ckpt.save(s["step"], loop=s, **({"G_best": t.G_best} if t.G_best is not None else {}))
    bar.close()


def _log(run: Run, bar: tqdm, t: _GAN, s: dict[str, Any], b: _Batch) -> None:
    """The progress bar's speed and ADA p; losses and logits into the run's log."""
    sec_per_kimg = s["train_seconds"] / max(s["nimg"] / 1000, 1e-9)
    bar.set_postfix_str(f"{sec_per_kimg:.1f} s/kimg, p={t.augment.p.item():.3f}")
    run.log(
        {
            "loss/G": b.stats["loss/G"].item(),
            "loss/D": b.stats["loss/D"].item(),
            "ada/p": t.augment.p.item(),
            "real_logits": b.stats["real_logits"].mean().item(),
            "fake_logits": b.stats["fake_logits"].mean().item(),
            "pl_mean": s["pl_mean"],
            "kimg": s["nimg"] / 1000,
            "s_per_kimg": sec_per_kimg,
        },
        step=s["step"],
    )


def _snapshot(
    g: DictConfig, t: _GAN, s: dict[str, Any], quality: _Quality, grid_z: torch.Tensor, final: bool
) -> None:
    """Grid and quality of G_ema now (rank 0); with ``keep=best``, keep it if it is the best."""
    s["snapshots"].append(quality.snapshot(t.G_ema, grid_z, s, final=final))
    if g.keep == "best" and _better(s["snapshots"], s["best"]):
        s["best"] = len(s["snapshots"]) - 1
        t.G_best = {k: v.detach().clone() for k, v in t.G_ema.state_dict().items()}


def _finish(
    cfg: DictConfig, run: Run, t: _GAN, s: dict[str, Any], more: dict[str, Any], d: distributed.Dist
) -> Artifact:
    """Save the kept G_ema (and the last one, G and D) with its metrics; write the artifact
    with ``more`` info (the data, the quality metrics' references)."""
    g = cfg.generator
    files = {
        "G_ema": "G_ema.safetensors",
        "G_ema_last": "G_ema_last.safetensors",
        "G": "G.safetensors",
        "D": "D.safetensors",
        "grid": "grid.png",
    }
    metrics: dict[str, Any] = {}
    if run.is_main:
        target_g, target_d = g.G._target_, g.D._target_
        save_model(run.dir / files["G_ema_last"], t.G_ema, target_g, t.g_kwargs)
        kept = s["snapshots"][-1]
        if s["best"] is not None and t.G_best is not None:
            kept = s["snapshots"][s["best"]]
            t.G_ema.load_state_dict(t.G_best)
        save_model(run.dir / files["G_ema"], t.G_ema, target_g, t.g_kwargs)
        save_model(run.dir / files["G"], t.G, target_g, t.g_kwargs)
        save_model(run.dir / files["D"], t.D, target_d, t.d_kwargs)
        metrics = {k: v for k, v in kept.items() if k not in ("grid", "kimg")}
        (run.dir / files["grid"]).write_bytes((run.dir / kept["grid"]).read_bytes())
        last = s["snapshots"][-1]
        metrics |= {
            "kept": f"G_ema at {kept['kimg']} kimg ({g.keep}{': lowest FD on the validation split' if g.keep == 'best' else ''})",
            "kept_kimg": kept["kimg"],
            "last/fd_classifier": last.get("fd_classifier"),
            "last/class_share_gap": last.get("class_share_gap"),
        }
        metrics |= {
            "kimg": round(s["nimg"] / 1000, 3),
            "train_seconds": round(s["train_seconds"], 1),
            "s_per_kimg": round(s["train_seconds"] / max(s["nimg"] / 1000, 1e-9), 2),
            "ada_p": round(t.augment.p.item(), 4),
            "stopped_by_time_budget": bool(s.get("out_of_time")),
        }
        run.summary(metrics)
    info = {
        "G": f"{g.G._target_} {t.g_kwargs}",
        "D": f"{g.D._target_} {t.d_kwargs}",
        "G_parameters": sum(p.numel() for p in t.G.parameters()),
        "D_parameters": sum(p.numel() for p in t.D.parameters()),
        "processes": d.world,
        "device": str(d.device),
    }
    return write_artifact(run, metrics, files, more | info)


# ----------------------------------------------------------------------------- loop pieces


def _kwargs(node: DictConfig, **extra: Any) -> dict[str, Any]:
    return {
        k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_target_"
    } | extra


def _mapping(G: torch.nn.Module, z: torch.Tensor, mixing: float) -> torch.Tensor:
    """``w [N, num_ws, w_dim]`` with w_avg tracking, and style mixing with probability ``mixing``."""
    ws = G.mapping(z, update_w_avg=True)
    cutoff = gan.mixing_cutoff(G.num_ws, mixing)
    if cutoff is not None:
        ws = ws.clone()
        ws[:, cutoff:] = G.mapping(torch.randn_like(z))[:, cutoff:]
    return ws


def _optimizer_step(
    module: torch.nn.Module, opt: torch.optim.Optimizer, d: distributed.Dist
) -> None:
    """Average gradients over ranks (one flat all-reduce), clean NaN/inf as published, step."""
    params = [p for p in module.parameters() if p.grad is not None]
    if d.enabled and params:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= d.world
        torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
    else:
        for p in params:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    opt.step()


def _mean_across(x: torch.Tensor, d: distributed.Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# ----------------------------------------------------------------------------- quality


class _Quality:
    """Snapshot grids and metrics on fixed real test images, computed on rank 0."""

    def __init__(self, cfg: DictConfig, run: Run, device: torch.device) -> None:

        g = cfg.generator
        self.run, self.device, self.g = run, device, g
        n = int(g.metrics.num_images)
        test_ds = build_dataset(cfg.data, "test")
        train_ds = build_dataset(cfg.data, "train")
        self.real_test = sample_images(test_ds, n, int(cfg.seed), Stream.GENERATOR_REAL_TEST)
        self.classifier = None
        self.info: dict[str, Any] = {}
        if "classifier" in run.inputs:
            self.classifier = load_classifier(run.inputs["classifier"].dir, device)
            self.stats = FeatureStats(self.classifier, device)
            self.info["feature_source"] = self.stats.feature_source
            real_train = sample_images(train_ds, n, int(cfg.seed), Stream.GENERATOR_REAL_TRAIN)
            # Snapshots are chosen on the validation split and reported on the test split.
            real_val = sample_images(
                build_dataset(cfg.data, "val"), n, int(cfg.seed), Stream.GENERATOR_REAL_VAL
            )
            self.real_val_feats = self.stats.features(real_val)
            self.real_test_feats = self.stats.features(self.real_test)
            base = self.stats.compare(self.stats.features(real_train), self.real_test_feats)
            self.info["fd_classifier_real_train_vs_test"] = round(base["fd_classifier"], 4)
            self.real_shares = self.stats.class_shares(real_train)
            self.info["class_shares_real_train"] = [round(x, 4) for x in self.real_shares]
        else:
            self.info["metrics"] = (
                "no classifier stage in this run: Fréchet distance and class shares not computed"
            )

    @torch.no_grad()
    def snapshot(
        self, G_ema: torch.nn.Module, grid_z: torch.Tensor, s: dict[str, Any], final: bool
    ) -> dict[str, Any]:
        kimg = s["nimg"] / 1000
        grid = torch.cat([G_ema(z, noise_mode="const") for z in grid_z.split(64)]).cpu()
        rel = f"snapshots/grid_{kimg:07.2f}kimg.png"
        save_grid(grid, self.run.dir / rel)
        self.run.log_images("snapshot/grid", grid, step=s["step"])
        out: dict[str, Any] = {"grid": rel, "kimg": round(kimg, 3)}
        if self.classifier is not None:
            fake = _generate(
                G_ema, len(self.real_test), self.device, psi=float(self.g.metrics.truncation_psi)
            )
            fake_feats = self.stats.features(fake)
            cmp = self.stats.compare(fake_feats, self.real_test_feats, kid=True)
            shares = self.stats.class_shares(fake)
            out |= {k: round(v, 4) for k, v in cmp.items()}
            out["fd_classifier_val"] = round(
                self.stats.compare(fake_feats, self.real_val_feats)["fd_classifier"], 4
            )
            out["class_shares_generated"] = [round(x, 4) for x in shares]
            out["class_share_gap"] = round(
                float(np.max(np.abs(np.array(shares) - np.array(self.real_shares)))), 4
            )
            if self.g.metrics.get("inception_weights"):
                out["fid_inception"] = round(
                    inception_fd(
                        fake, self.real_test, self.g.metrics.inception_weights, self.device
                    ),
                    4,
                )
            self.run.log(
                {f"quality/{k}": v for k, v in out.items() if isinstance(v, float)}, step=s["step"]
            )
            tqdm.write(
                f"{kimg:7.2f} kimg  FD(classifier) {out['fd_classifier']:.3f}  KID {out.get('kid_classifier', float('nan')):.4f}  "
                f"shares generated {out['class_shares_generated']} vs real {self.info['class_shares_real_train']}"
            )
        return out


def _better(snapshots: list[dict[str, Any]], best: int | None) -> bool:
    """Whether the newest snapshot has a lower validation FD than the kept one."""
    new = snapshots[-1].get("fd_classifier_val")
    if new is None:
        return False
    return best is None or new < snapshots[best]["fd_classifier_val"]


@torch.no_grad()
def _generate(
    G: torch.nn.Module, n: int, device: torch.device, psi: float = 1.0, batch: int = 64
) -> torch.Tensor:
    """``n`` images ``[n, C, H, W]`` from fixed latents (seeded apart from training)."""
    z = torch.randn(n, G.z_dim, generator=generator(METRIC_SEED, Stream.GENERATOR_SAMPLES)).to(
        device
    )
    return torch.cat([G(zb, psi=psi, noise_mode="const").cpu() for zb in z.split(batch)])
