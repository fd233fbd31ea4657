"""Generator stage: StyleGAN2-ADA trained on the stage chain's dataset.

The loop reads top to bottom: real batch → G step (non-saturating loss, lazy path length) →
D step (logistic loss, lazy R1) → G EMA → ADA p → log → snapshot/checkpoint. Gradients are
averaged across ranks by hand (the published recipe), so the same loop runs alone or under
torchrun. Quality: Fréchet distance and KID on the trained classifier's features, and the class
shares the classifier gives generated vs real images.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.nn import gan
from cfexplain.nn.augment import AugmentPipe, ada_adjust
from cfexplain.nn.classifier import load_classifier
from cfexplain.stages._shared import out_of_time, real_batch, sample_images, write_artifact
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import STATE_FILE, Artifact, save_model, torch_load, torch_save
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
    g = cfg.generator
    seed = int(cfg.seed)
    train_ds = build_dataset(cfg.data, "train")
    res, ch = int(cfg.data.resolution), int(cfg.data.channels)
    batch = int(g.batch_size)
    if batch % d.world:
        raise ValueError(
            f"generator.batch_size={batch} must be divisible by the number of processes ({d.world})"
        )

    torch.manual_seed(seed)
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
        float(g.glr), betas, int(g.pl_interval) if g.pl_weight > 0 else 0
    )
    d_lr, d_betas = gan.lazy_adam_hparams(
        float(g.dlr), betas, int(g.r1_interval) if g.r1_gamma > 0 else 0
    )
    G_opt = torch.optim.Adam(G.parameters(), lr=g_lr, betas=g_betas, eps=1e-8)
    D_opt = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas, eps=1e-8)

    total_nimg = int(float(g.kimg) * 1000)
    max_seconds = float(g.max_minutes) * 60 if g.get("max_minutes") else math.inf
    s: dict[str, Any] = {
        "step": 0,
        "nimg": 0,
        "pl_mean": 0.0,
        "ada_acc": [0.0, 0.0],
        "train_seconds": 0.0,
        "snapshots": [],
        "best": None,  # index into snapshots of the kept G_ema (generator.keep=best)
    }
    G_best: dict[str, torch.Tensor] | None = None
    quality = _Quality(cfg, run, d.device) if run.is_main else None
    state_file = run.dir / STATE_FILE
    if state_file.is_file():
        saved = torch_load(state_file)
        for name, module in (("G", G), ("D", D), ("G_ema", G_ema), ("augment", augment)):
            module.load_state_dict(saved[name])
        G_opt.load_state_dict(saved["G_opt"])
        D_opt.load_state_dict(saved["D_opt"])
        s = saved["loop"]
        G_best = saved.get("G_best")
        log.info(
            f"[generator] resumed from {state_file} at {s['nimg'] / 1000:.1f} kimg, ADA p={augment.p.item():.3f}"
        )
        run.notes["resumed_from_kimg"] = round(s["nimg"] / 1000, 3)

    def checkpoint() -> None:
        if run.is_main:
            torch_save(
                {
                    "G": G.state_dict(),
                    "D": D.state_dict(),
                    "G_ema": G_ema.state_dict(),
                    "augment": augment.state_dict(),
                    "G_opt": G_opt.state_dict(),
                    "D_opt": D_opt.state_dict(),
                    "loop": s,
                    **({"G_best": G_best} if G_best is not None else {}),
                },
                state_file,
            )
        d.barrier()

    grid_z = torch.randn(
        int(g.grid_size), G.z_dim, generator=generator(seed, Stream.GENERATOR_GRID)
    ).to(d.device)
    per_rank = batch // d.world
    snapshot_nimg = int(float(g.snapshot_kimg) * 1000)
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
        step = s["step"]
        # Latents, noise and augmentations of a step come from (seed, step, rank): each rank
        # draws its own, a resumed run draws what the uninterrupted one did, and state.pt needs
        # no RNG state.
        torch.manual_seed(derived_seed(seed, Stream.GENERATOR_STEP, step, d.rank))
        real = real_batch(train_ds, per_rank, seed, step, d).to(d.device)
        z = torch.randn(per_rank, G.z_dim, device=d.device)

        # G step: fool D; lazy path-length regularisation every pl_interval steps.
        D.requires_grad_(False)
        G_opt.zero_grad(set_to_none=True)
        ws = _mapping(G, z, float(g.style_mixing))
        fake = G.synthesis(ws, noise_mode="random")
        loss_g = gan.g_nonsaturating_loss(D(augment(fake)))
        loss_g.backward()
        if g.pl_weight > 0 and step % int(g.pl_interval) == 0:
            n_pl = max(per_rank // 2, 1)
            ws_pl = _mapping(G, z[:n_pl], float(g.style_mixing)).detach().requires_grad_(True)
            lengths = gan.path_length(G.synthesis(ws_pl, noise_mode="random"), ws_pl)
            pl_mean = s["pl_mean"] + 0.01 * (
                _mean_across(lengths.mean().detach(), d) - s["pl_mean"]
            )
            s["pl_mean"] = float(pl_mean)
            (
                ((lengths - pl_mean).square().mean()) * float(g.pl_weight) * int(g.pl_interval)
            ).backward()
        _step(G, G_opt, d)
        D.requires_grad_(True)

        # D step: tell reals from fakes; lazy R1 on the reals every r1_interval steps.
        D_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = G.synthesis(_mapping(G, z, float(g.style_mixing)), noise_mode="random")
        do_r1 = g.r1_gamma > 0 and step % int(g.r1_interval) == 0
        real.requires_grad_(do_r1)
        real_logits = D(augment(real))
        fake_logits = D(augment(fake))
        loss_d = gan.d_logistic_loss(real_logits, fake_logits)
        if do_r1:
            r1 = gan.r1_penalty(real_logits, real)
            loss_d = loss_d + r1.mean() * (float(g.r1_gamma) / 2) * int(g.r1_interval)
        loss_d.backward()
        _step(D, D_opt, d)

        losses = torch.stack([loss_g.detach(), loss_d.detach()])
        if not torch.isfinite(losses).all():
            raise DivergenceError(
                f"generator diverged at {s['nimg'] / 1000:.2f} kimg (G loss {losses[0]:.3g}, D loss {losses[1]:.3g}); "
                f"the last good checkpoint {state_file} is untouched: lower generator.glr/dlr or raise generator.r1_gamma"
            )

        # G EMA, ADA p from the sign of D on reals.
        s["nimg"] += batch
        s["step"] += 1
        gan.ema_update(G_ema, G, gan.ema_beta(batch, s["nimg"], float(g.ema_kimg), g.ema_rampup))
        signs = torch.tensor(
            [real_logits.detach().sign().sum().item(), real_logits.numel()], dtype=torch.float64
        )
        if d.enabled:
            dist.all_reduce(signs)
        s["ada_acc"] = [s["ada_acc"][0] + signs[0].item(), s["ada_acc"][1] + signs[1].item()]
        if g.ada.fixed_p is None and s["step"] % int(g.ada.interval) == 0:
            rt = s["ada_acc"][0] / max(s["ada_acc"][1], 1)
            augment.p.fill_(
                ada_adjust(
                    augment.p.item(),
                    rt,
                    target=float(g.ada.target),
                    batch=batch,
                    interval=int(g.ada.interval),
                    ada_kimg=float(g.ada.kimg),
                )
            )
            s["ada_acc"] = [0.0, 0.0]

        s["train_seconds"] = time.time() - t0
        bar.update((min(s["nimg"], total_nimg) - min(s["nimg"] - batch, total_nimg)) / 1000)
        if s["step"] % 10 == 0:
            sec_per_kimg = s["train_seconds"] / max(s["nimg"] / 1000, 1e-9)
            bar.set_postfix_str(f"{sec_per_kimg:.1f} s/kimg, p={augment.p.item():.3f}")
            run.log(
                {
                    "loss/G": loss_g.item(),
                    "loss/D": loss_d.item(),
                    "ada/p": augment.p.item(),
                    "real_logits": real_logits.mean().item(),
                    "fake_logits": fake_logits.mean().item(),
                    "pl_mean": s["pl_mean"],
                    "kimg": s["nimg"] / 1000,
                    "s_per_kimg": sec_per_kimg,
                },
                step=s["step"],
            )
        s["out_of_time"] = out_of_time(s["train_seconds"], max_seconds, d)
        done = s["nimg"] >= total_nimg or s["out_of_time"]
        if done or s["nimg"] // snapshot_nimg > (s["nimg"] - batch) // snapshot_nimg:
            if quality is not None:
                s["snapshots"].append(quality.snapshot(G_ema, grid_z, s, final=done))
                if g.keep == "best" and _better(s["snapshots"], s["best"]):
                    s["best"] = len(s["snapshots"]) - 1
                    G_best = {k: v.detach().clone() for k, v in G_ema.state_dict().items()}
            checkpoint()
        elif s["step"] % int(cfg.checkpoint_every) == 0:
            checkpoint()
    bar.close()

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
        save_model(run.dir / files["G_ema_last"], G_ema, target_g, g_kwargs)
        kept = s["snapshots"][-1]
        if s["best"] is not None and G_best is not None:
            kept = s["snapshots"][s["best"]]
            G_ema.load_state_dict(G_best)
        save_model(run.dir / files["G_ema"], G_ema, target_g, g_kwargs)
        save_model(run.dir / files["G"], G, target_g, g_kwargs)
        save_model(run.dir / files["D"], D, target_d, d_kwargs)
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
            "ada_p": round(augment.p.item(), 4),
            "stopped_by_time_budget": bool(s.get("out_of_time")),
        }
        run.summary(metrics)
    info = {
        "data": train_ds.source,
        "G": f"{g.G._target_} {g_kwargs}",
        "D": f"{g.D._target_} {d_kwargs}",
        "G_parameters": sum(p.numel() for p in G.parameters()),
        "D_parameters": sum(p.numel() for p in D.parameters()),
        "processes": d.world,
        "device": str(d.device),
        **(quality.info if quality else {}),
    }
    return write_artifact(run, metrics, files, info)


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


def _step(module: torch.nn.Module, opt: torch.optim.Optimizer, d: distributed.Dist) -> None:
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
