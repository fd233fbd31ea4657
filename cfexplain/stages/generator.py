"""Generator stage: StyleGAN2-ADA trained on the stage chain's dataset.

The stage reads top to bottom: build → train → finish. An iteration draws a real batch and
runs its phases, written as data (:class:`Phase`, as the published loop does): G (non-saturating
loss, lazy path length), then D (logistic loss, lazy R1) on a second pass of fakes; with
``generator.shared_fakes`` D first on the iteration's fakes, then G backpropagating through the
same fakes (one G pass per iteration); then G EMA → ADA p → log → snapshot/checkpoint.
Gradients are averaged across ranks by hand (the published recipe), so the same loop runs alone
or under torchrun. Every snapshot is measured on the run's classifier and on fixed yardsticks
(:mod:`cfexplain.stages._snapshots`); ``keep=best`` keeps the snapshot best on ``keep_metric``,
and the collapse guard rolls training back to that snapshot's state, with lower learning rates,
when the snapshots say it has collapsed.
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

import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.nn import gan
from cfexplain.nn.augment import AugmentPipe, ada_adjust
from cfexplain.stages._shared import Checkpoint, out_of_time, real_batch, write_artifact
from cfexplain.stages._snapshots import CollapseRule, SnapshotQuality, best_index
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.seeding import Stream, derived_seed, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


class DivergenceError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train G and D with ADA; write G_ema/G/D weights, snapshot grids and quality metrics."""
    d = distributed.setup(cfg.device)
    train_ds = build_dataset(cfg.data, "train")
    t = _build(cfg, d)
    quality = SnapshotQuality(cfg, run, d.device) if run.is_main else None
    ckpt = Checkpoint(run, d, **t.states())
    saved = ckpt.load()
    s: dict[str, Any] = saved["loop"] if saved else _start()
    if saved:
        t.best = saved.get("best_state")
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
        "best": None,  # index into snapshots of the best one on generator.keep_metric
        "lr_scale": 1.0,  # learning rates' factor, lowered by each collapse rollback
        "collapse_streak": 0,  # collapsed snapshots in a row
        "collapse_events": [],
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
    base_lrs: dict[str, float]  # the optimisers' learning rates before any rollback
    best: dict[str, Any] | None = None  # CPU copy of states() at the best snapshot

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
    # On a CPU oneDNN's convolutions run faster channels-last, forward and backward (the same
    # maths; benchmarks/bench_generator.py --train); the layout survives the optimiser steps,
    # the EMA and state.pt, and the safetensors weights are written contiguous.
    layout = torch.channels_last if d.device.type == "cpu" else torch.contiguous_format
    G = instantiate(g.G, img_resolution=res, img_channels=ch).to(d.device, memory_format=layout)
    D = instantiate(g.D, img_resolution=res, img_channels=ch).to(d.device, memory_format=layout)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    augment = AugmentPipe(**OmegaConf.to_container(g.ada.pipe, resolve=True)).to(d.device)
    if g.ada.fixed_p is not None:
        augment.p.fill_(float(g.ada.fixed_p))
    betas = tuple(float(b) for b in g.betas)
    g_lr, g_betas = gan.lazy_adam_hparams(
        float(g.glr), betas, _interval(g.pl_weight, g.pl_interval)
    )
    d_lr, d_betas = gan.lazy_adam_hparams(float(g.dlr), betas, _interval(g.r1_gamma, g.r1_interval))
    # One fused kernel per step instead of a dozen passes per parameter (CPU and CUDA alike).
    G_opt = torch.optim.Adam(G.parameters(), lr=g_lr, betas=g_betas, eps=1e-8, fused=True)
    D_opt = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas, eps=1e-8, fused=True)
    base_lrs = {"G_opt": g_lr, "D_opt": d_lr}
    return _GAN(G, D, G_ema, augment, G_opt, D_opt, g_kwargs, d_kwargs, base_lrs)


def _interval(weight: float, interval: int) -> int:
    """Steps between two lazy regularisations; 0 when the regulariser is off."""
    return int(interval) if weight > 0 else 0


# ----------------------------------------------------------------------------- one iteration


@dataclass
class _Batch:
    """One iteration's draws for this rank, and what its phases measured (detached)."""

    real: torch.Tensor  # [n, C, H, W]
    z: torch.Tensor  # [n, z_dim]
    fake: torch.Tensor | None = None  # G(z) with G's graph, shared by both phases
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
    """An iteration: G (non-saturating loss, lazy path length), then D (logistic, lazy R1);
    with ``shared_fakes`` D first, then G on the same fakes."""
    G = Phase(
        "G", t.G, t.G_opt, _interval(g.pl_weight, g.pl_interval), partial(_g_loss, g, t, s, d)
    )
    D = Phase("D", t.D, t.D_opt, _interval(g.r1_gamma, g.r1_interval), partial(_d_loss, g, t))
    return [D, G] if _shared_fakes(g) else [G, D]


def _g_loss(
    g: DictConfig, t: _GAN, s: dict[str, Any], d: distributed.Dist, b: _Batch, reg: bool
) -> Iterator[torch.Tensor]:
    """Fool D; then, when ``reg``, the path-length penalty on half the batch (its own backward)."""
    fake = _fakes(g, t, b)
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
    with torch.no_grad():  # the shared fakes detached, or a pass of G without a graph
        fake = _fakes(g, t, b).detach()
    b.real.requires_grad_(reg)
    real, fake = t.augment(b.real), t.augment(fake)
    if reg:  # R1's double backward needs the reals' pass only
        real_logits, fake_logits = t.D(real), t.D(fake)
    else:  # one pass, minibatch std within each half: the same logits as two passes
        real_logits, fake_logits = t.D(torch.cat([real, fake]), parts=2).chunk(2)
    loss = gan.d_logistic_loss(real_logits, fake_logits)
    if reg:
        r1 = gan.r1_penalty(real_logits, b.real)
        loss = loss + r1.mean() * (float(g.r1_gamma) / 2) * int(g.r1_interval)
    b.stats |= {"real_logits": real_logits.detach(), "fake_logits": fake_logits.detach()}
    yield loss


def _shared_fakes(g: DictConfig) -> bool:
    """One G pass per iteration (opt-in; a config from before the option has two)."""
    return bool(g.get("shared_fakes", False))


def _fakes(g: DictConfig, t: _GAN, b: _Batch) -> torch.Tensor:
    """The iteration's shared fakes, or a pass of G of the phase's own."""
    if b.fake is not None:
        return b.fake
    return t.G.synthesis(_mapping(t.G, b.z, float(g.style_mixing)), noise_mode="random")


def _run_phases(
    g: DictConfig, t: _GAN, phases: list[Phase], b: _Batch, step: int, d: distributed.Dist
) -> None:
    """G's one forward pass when the phases share it (its graph kept for the G phase; G's
    weights do not change before that backward), then each phase in turn."""
    if _shared_fakes(g):
        b.fake = _fakes(g, t, b)
    for phase in phases:
        _run_phase(phase, phases, b, step, d)
    b.fake = None


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
    _run_phases(cfg.generator, t, phases, b, s["step"], d)
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
    quality: SnapshotQuality | None,
    ckpt: Checkpoint,
    d: distributed.Dist,
) -> None:
    """Iterate until ``generator.kimg`` (or the time budget); snapshot and checkpoint on the way."""
    g, batch = cfg.generator, int(cfg.generator.batch_size)
    total_nimg = int(float(g.kimg) * 1000)
    max_seconds = float(g.max_minutes) * 60 if g.get("max_minutes") else math.inf
    snapshot_nimg = int(float(g.snapshot_kimg) * 1000)
    phases = _phases(g, t, s, d)
    rule = CollapseRule.from_config(g.get("collapse"))
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
            _snapshot(g, t, s, quality, grid_z, rule, d)
            ckpt.save(s["step"], loop=s, **_best_extra(t))
        elif s["step"] % int(cfg.checkpoint_every) == 0:
            ckpt.save(s["step"], loop=s, **_best_extra(t))
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
    g: DictConfig,
    t: _GAN,
    s: dict[str, Any],
    quality: SnapshotQuality | None,
    grid_z: torch.Tensor,
    rule: CollapseRule,
    d: distributed.Dist,
) -> None:
    """Measure G_ema (rank 0); keep the training state if this snapshot is the best on
    ``keep_metric``; roll back to the best state when the collapse rule says so (every rank)."""
    new_best = roll_back = False
    if quality is not None:
        snaps = s["snapshots"]
        snaps.append(quality.snapshot(t.G_ema, grid_z, s["nimg"], s["step"]))
        # Judged against the best so far; a collapsed snapshot is never the best, whatever its
        # metric (a collapsed G can score well on one yardstick: FD on fixed features fell
        # while recall went to 0 on a collapsing KL run).
        prev = None if s["best"] is None else snaps[s["best"]]
        roll_back = _collapsed(rule, s, prev, str(g.keep_metric))
        tolerance = float(g.get("keep_tolerance", 1.0))
        s["best"] = best_index(snaps, str(g.keep_metric), tolerance)
        new_best = s["best"] == len(snaps) - 1
    flags = torch.tensor([new_best, roll_back], dtype=torch.int64)
    if d.enabled:
        dist.broadcast(flags, src=0)
    if flags[0]:
        t.best = _training_state(t)
    elif flags[1] and t.best is not None:
        _roll_back(t, s, float(rule.lr_factor))


def _collapsed(
    rule: CollapseRule, s: dict[str, Any], best: dict[str, Any] | None, metric: str
) -> bool:
    """Count the newest snapshot into the collapse streak; whether to roll back now."""
    snap = s["snapshots"][-1]
    if not rule.enabled:
        return False
    reasons = rule.reasons(snap, best, metric)
    snap["collapsed"] = bool(reasons)
    if snap["kimg"] < float(rule.start_kimg):
        # Never kept nor rolled back to, but no rollback yet: early training swings and recovers.
        return False
    s["collapse_streak"] = s["collapse_streak"] + 1 if reasons else 0
    rollbacks = sum(e["action"] == "rollback" for e in s["collapse_events"])
    if not reasons or s["collapse_streak"] < int(rule.patience):
        return False
    act = rollbacks < int(rule.max_rollbacks) and best is not None
    event = {"kimg": snap["kimg"], "reasons": reasons, "action": "rollback" if act else "none"}
    if act:
        event |= {"to_kimg": best["kimg"], "lr_scale": s["lr_scale"] * float(rule.lr_factor)}
    s["collapse_events"].append(event)
    log.warning(
        f"[generator] collapse at {snap['kimg']} kimg: {'; '.join(reasons)}; "
        + (
            f"rolling back to {best['kimg']} kimg, learning rates x{event['lr_scale']:g}"
            if act
            else f"no rollback left (generator.collapse.max_rollbacks={rule.max_rollbacks})"
        )
    )
    return act


def _training_state(t: _GAN) -> dict[str, Any]:
    """A CPU copy of everything :meth:`_GAN.states` names."""
    return {name: _to_cpu(obj.state_dict()) for name, obj in t.states().items()}


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_cpu(v) for v in x)
    return copy.deepcopy(x)


def _roll_back(t: _GAN, s: dict[str, Any], lr_factor: float) -> None:
    """Restore the best state and lower the learning rates; the work budget keeps counting."""
    assert t.best is not None
    for name, obj in t.states().items():
        obj.load_state_dict(t.best[name])
    s["lr_scale"] *= lr_factor
    s["collapse_streak"] = 0
    for name, opt in (("G_opt", t.G_opt), ("D_opt", t.D_opt)):
        for group in opt.param_groups:
            group["lr"] = t.base_lrs[name] * s["lr_scale"]


def _best_extra(t: _GAN) -> dict[str, Any]:
    """What ``state.pt`` keeps beside the states: the best snapshot's training state."""
    return {"best_state": t.best} if t.best is not None else {}


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
        if g.keep == "best" and s["best"] is not None and t.best is not None:
            kept = s["snapshots"][s["best"]]
            t.G_ema.load_state_dict(t.best["G_ema"])
        save_model(run.dir / files["G_ema"], t.G_ema, target_g, t.g_kwargs)
        save_model(run.dir / files["G"], t.G, target_g, t.g_kwargs)
        save_model(run.dir / files["D"], t.D, target_d, t.d_kwargs)
        (run.dir / files["grid"]).write_bytes((run.dir / kept["grid"]).read_bytes())
        metrics = {k: v for k, v in kept.items() if k not in ("grid", "kimg", "collapsed")}
        metrics |= _kept_metrics(g, s, kept)
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


def _kept_metrics(g: DictConfig, s: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    """Which snapshot was kept and why, the last snapshot's headline metrics, the collapses."""
    tol = float(g.get("keep_tolerance", 1.0))
    within = f"latest within {tol:g}x the lowest" if tol > 1 else "lowest"
    why = f"{within} {g.keep_metric}" if g.keep == "best" else "the last snapshot"
    last = s["snapshots"][-1]
    out: dict[str, Any] = {
        "kept": f"G_ema at {kept['kimg']} kimg ({why})",
        "kept_kimg": kept["kimg"],
    }
    for key in ("fd_fixed", "precision", "recall", "fd_classifier", "class_share_gap"):
        if key in last:
            out[f"last/{key}"] = last[key]
    rollbacks = sum(e["action"] == "rollback" for e in s["collapse_events"])
    return out | {
        "collapse_events": s["collapse_events"],
        "collapse_rollbacks": rollbacks,
        "collapsed_at_end": bool(last.get("collapsed", False)),
        "lr_scale": s["lr_scale"],
    }


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
