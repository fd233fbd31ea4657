"""Normative stage: a VAE and an AAE trained on healthy images only, scored on the test split.

The models in ``normative.models`` train one after the other; each keeps its own resumable
state inside the stage's ``state.pt``, so a kill resumes in the middle of the model it hit.
Their steps count on in ``log.jsonl`` and ``state.pt``: the second model's step 1 is
``normative.steps + 1``.
Training sees only images whose label is in ``normative.healthy_labels`` (checked per batch).
Metrics per model: image-level AUC of the anomaly score, diseased vs healthy test images; with
ground-truth masks (phantoms), pixel-level AUROC and best Dice of the residual map against the
pathology mask, over the diseased test images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from cfexplain.data import build_dataset, collate
from cfexplain.data.masks import pathology_mask
from cfexplain.nn import normative as nm
from cfexplain.stages._shared import Checkpoint, epoch_loader, lr_at, write_artifact
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.images import save_grid
from cfexplain.utils.seeding import Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

TARGETS = {"vae": "cfexplain.nn.normative.ConvVAE", "aae": "cfexplain.nn.normative.ConvAAE"}


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train every model of ``normative.models`` on healthy train images; score the test split."""
    d = distributed.setup(cfg.device)
    n = cfg.normative
    names = list(n.models)
    unknown = [m for m in names if m not in TARGETS]
    if unknown or not names:
        raise ValueError(
            f"normative.models={names}: expected a non-empty subset of {list(TARGETS)}"
        )
    healthy = sorted(int(h) for h in n.healthy_labels)
    train_ds = build_dataset(cfg.data, "train")
    test_ds = build_dataset(cfg.data, "test")
    log.info(f"[normative] {train_ds.source}")
    healthy_ds, counts = healthy_subset(train_ds, healthy)
    if len(healthy_ds) < int(n.batch_size):
        raise ValueError(
            f"normative.healthy_labels={healthy}: only {len(healthy_ds)} healthy training images, "
            f"fewer than normative.batch_size={n.batch_size}"
        )

    ckpt = Checkpoint(run, d, rng=True)
    saved = ckpt.load()
    models: dict[str, Any] = saved["models"] if saved else {}
    if models:
        where = {m: s["loop"]["step"] for m, s in models.items()}
        ckpt.announce(f"at steps {where}", resumed_from_steps=where)

    files: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {
        "data": train_ds.source,
        "models": names,
        "healthy_labels": healthy,
        **counts,
    }
    for name in names:
        # Steps of log.jsonl and state.pt count on across the models.
        offset = names.index(name) * int(n.steps)
        model, loop = _train(name, cfg, run, healthy_ds, healthy, d, ckpt, models, offset)
        kwargs = _model_kwargs(cfg, name)
        files[name] = f"{name}.safetensors"
        result = evaluate(
            model,
            test_ds,
            healthy,
            int(n.eval_batch_size),
            d.device,
            int(n.pixel_samples),
            int(cfg.seed),
        )
        metrics |= {f"{name}/test/{k}": v for k, v in result.items()}
        metrics |= {
            f"{name}/train_seconds": round(loop["train_seconds"], 1),
            f"{name}/s_per_step": round(loop["train_seconds"] / max(loop["step"], 1), 4),
            f"{name}/steps": loop["step"],
        }
        info[f"{name}_model"] = f"{TARGETS[name]} {kwargs}"
        info[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
        if run.is_main:
            save_model(run.dir / files[name], model, TARGETS[name], kwargs)
            files[f"{name}_examples"] = f"{name}_examples.png"
            _examples(run, model, test_ds, healthy, name, run.dir / files[f"{name}_examples"])
            tqdm.write(
                f"[normative] {name}: image AUC {result['image_auc']:.4f}  pixel AUROC "
                f"{result.get('pixel_auroc', float('nan')):.4f}  best Dice {result.get('best_dice', float('nan')):.4f}"
            )
    info |= {"processes": d.world, "device": str(d.device)}
    if run.is_main:
        # Once all are trained: a resume re-evaluates the models finished before it.
        for name in names:
            run.log({k: v for k, v in metrics.items() if k.startswith(name) and np.isscalar(v)})
        run.summary(metrics)
    return write_artifact(run, metrics, files, info)


# ----------------------------------------------------------------------------- data


def healthy_subset(ds: Dataset, healthy: list[int]) -> tuple[Subset, dict[str, int]]:
    """The images of ``ds`` whose label is in ``healthy``, and the counts kept and left out."""
    labels = [int(ds[i]["label"]) for i in range(len(ds))]
    keep = [i for i, y in enumerate(labels) if y in healthy]
    return Subset(ds, keep), {"train_healthy": len(keep), "train_excluded": len(labels) - len(keep)}


# ----------------------------------------------------------------------------- training


def _model_kwargs(cfg: DictConfig, name: str) -> dict[str, Any]:
    n = cfg.normative
    # Shared architecture, with per-model overrides (normative.<name>.net).
    net = OmegaConf.to_container(n.net, resolve=True)
    if n[name].get("net") is not None:
        net |= OmegaConf.to_container(n[name].net, resolve=True)
    return {
        "img_channels": int(cfg.data.channels),
        "img_resolution": int(cfg.data.resolution),
        **net,
        "residual_sigma": float(n.residual_sigma),
        "score": str(n.score),
    }


def _build(cfg: DictConfig, name: str, device: torch.device, seed: int) -> nm.NormativeModel:
    torch.manual_seed(seed)  # initial weights: same on every rank, same for a seed
    cls = nm.ConvVAE if name == "vae" else nm.ConvAAE
    return cls(**_model_kwargs(cfg, name)).to(device)


@dataclass
class _Trainee:
    """One normative model in training: its modules, optimisers, base rates and counters."""

    name: str
    key: int  # separates the random streams of the models
    model: nm.NormativeModel
    modules: dict[str, torch.nn.Module]
    opts: dict[str, torch.optim.Optimizer]
    base_lr: dict[str, float]
    loop: dict[str, Any] = field(
        default_factory=lambda: {"step": 0, "train_seconds": 0.0, "finished": False}
    )

    def states(self) -> dict[str, Any]:
        """Modules and optimisers by their name in ``state.pt``."""
        return {f"{self.name}.{k}": m for k, m in self.modules.items()} | {
            f"{self.name}.opt.{k}": o for k, o in self.opts.items()
        }


def _trainee(name: str, cfg: DictConfig, d: distributed.Dist) -> _Trainee:
    """The untrained model ``name`` (with the AAE's latent discriminator) and its optimisers."""
    n, key = cfg.normative, nm.MODEL_NAMES.index(name) + 1
    model = _build(cfg, name, d.device, int(cfg.seed) + key)
    modules: dict[str, torch.nn.Module] = {"model": model}
    opts: dict[str, torch.optim.Optimizer] = {
        "ae": torch.optim.Adam(model.parameters(), lr=float(n.lr), betas=tuple(n.betas))
    }
    if name == "aae":
        disc = nm.LatentDiscriminator(int(np.prod(model.latent_shape)), int(n.aae.d_hidden)).to(
            d.device
        )
        modules["disc"] = disc
        opts["d"] = torch.optim.Adam(
            disc.parameters(), lr=float(n.aae.d_lr), betas=tuple(n.aae.betas)
        )
        opts["g"] = torch.optim.Adam(
            model.encoder.parameters(), lr=float(n.aae.g_lr), betas=tuple(n.aae.betas)
        )
    base_lr = {k: o.param_groups[0]["lr"] for k, o in opts.items()}
    return _Trainee(name, key, model, modules, opts, base_lr)


def _train(
    name: str,
    cfg: DictConfig,
    run: Run,
    ds: Dataset,
    healthy: list[int],
    d: distributed.Dist,
    ckpt: Checkpoint,
    models: dict[str, Any],
    offset: int,
) -> tuple[nm.NormativeModel, dict[str, Any]]:
    """Train one model (or finish a resumed one); ``models[name]['loop']`` holds its counters,
    and its log and checkpoint steps start at ``offset``."""
    n = cfg.normative
    if int(n.batch_size) % d.world:
        raise ValueError(
            f"normative.batch_size={n.batch_size} must be divisible by the number of processes ({d.world})"
        )
    t = _trainee(name, cfg, d)
    ckpt.add(**t.states())  # restored here when the checkpoint has them
    if name in models:
        t.loop = dict(models[name]["loop"])
    models[name] = {"loop": t.loop}
    if t.loop["finished"]:
        log.info(f"[normative] {name}: finished before the resume, {t.loop['step']} steps")
        return t.model.eval(), t.loop
    perceptual = _perceptual(n, d.device)
    bar = tqdm(
        total=int(n.steps),
        initial=t.loop["step"],
        desc=f"normative {name}",
        unit="step",
        disable=not run.is_main,
    )
    t0 = time.time() - t.loop["train_seconds"]
    t.model.train()
    while t.loop["step"] < int(n.steps):
        _train_epoch(cfg, run, ds, healthy, t, perceptual, t0, d, bar, ckpt, models, offset)
    bar.close()
    t.loop["finished"] = True
    ckpt.save(offset + t.loop["step"], models=models)
    return t.model.eval(), t.loop


def _train_epoch(
    cfg: DictConfig,
    run: Run,
    ds: Dataset,
    healthy: list[int],
    t: _Trainee,
    perceptual,
    t0: float,
    d: distributed.Dist,
    bar: tqdm,
    ckpt: Checkpoint,
    models: dict[str, Any],
    offset: int,
) -> None:
    """The rest of the current epoch of ``t`` (its batches not done before a resume)."""
    n, seed = cfg.normative, int(cfg.seed)
    batch, total = int(n.batch_size), int(n.steps)
    schedule = dict(
        base=1.0, warmup=int(n.warmup_steps), total=total, min_ratio=float(n.min_lr_ratio)
    )
    epoch = t.loop["step"] // (len(ds) // batch)
    workers = int(cfg.data.num_workers)
    loader = epoch_loader(ds, batch, seed + t.key, epoch, t.loop["step"], d, workers)
    for x, y, _ in loader:
        bad = sorted(set(y.tolist()) - set(healthy))
        assert not bad, f"normative: labels {bad} reached training; only {healthy} may"
        x = x.to(d.device, non_blocking=True)
        step = t.loop["step"]
        for k, o in t.opts.items():
            for g in o.param_groups:
                g["lr"] = t.base_lr[k] * lr_at(step, **schedule)
        noise = torch.randn(
            (len(x), *t.model.latent_shape),
            generator=generator(seed, Stream.NORMATIVE_LATENT + t.key, step, d.rank),
        ).to(d.device)
        if t.name == "vae":
            losses = _vae_step(t.model, t.opts, x, noise, n, perceptual, d)
        else:
            losses = _aae_step(t.model, t.modules["disc"], t.opts, x, noise, n, perceptual, d)
        if not all(np.isfinite(v) for v in losses.values()):
            raise FloatingPointError(
                f"normative {t.name} diverged at step {step} ({losses}); the last checkpoint "
                f"{ckpt.path} is untouched: lower normative.lr"
            )
        t.loop["step"] += 1
        t.loop["train_seconds"] = time.time() - t0
        bar.update()
        if t.loop["step"] % 10 == 0:
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
            run.log(
                {f"{t.name}/train/{k}": v for k, v in losses.items()}, step=offset + t.loop["step"]
            )
        if t.loop["step"] % int(cfg.checkpoint_every) == 0:
            ckpt.save(offset + t.loop["step"], models=models)
        if t.loop["step"] >= total:
            break


def _vae_step(model, opts, x, noise, n, perceptual, d) -> dict[str, float]:
    """One VAE step: reconstruction of a reparameterised sample + β · KL per image element."""
    mu, logvar = model.posterior(x)
    recon = model.decoder(nm.reparameterise(mu, logvar, noise))
    rec = nm.reconstruction_loss(x, recon, str(n.recon_loss)).mean()
    kl = nm.kl_standard_normal(mu, logvar).mean() / x[0].numel()
    loss = rec + float(n.vae.beta) * kl
    if perceptual is not None:
        loss = loss + float(n.lpips_weight) * perceptual(x, recon).mean()
    _update(opts["ae"], loss, model, d)
    return {"recon": rec.item(), "kl_per_element": kl.item(), "loss": loss.item()}


def _aae_step(model, disc, opts, x, prior, n, perceptual, d) -> dict[str, float]:
    """One AAE step: a reconstruction phase, then a regularisation phase (D, then the encoder)."""
    # Reconstruction phase: encoder and decoder.
    recon = model.decoder(model.encoder(x))
    rec = nm.reconstruction_loss(x, recon, str(n.recon_loss)).mean()
    loss = rec
    if perceptual is not None:
        loss = loss + float(n.lpips_weight) * perceptual(x, recon).mean()
    _update(opts["ae"], loss, model, d)
    # Regularisation phase: D tells prior samples from codes, then the encoder fools D.
    code = model.encoder(x)
    loss_d = nm.d_prior_loss(disc(prior), disc(code.detach()))
    _update(opts["d"], loss_d, disc, d)
    disc.requires_grad_(False)
    loss_g = float(n.aae.adv_weight) * nm.g_prior_loss(disc(code))
    _update(opts["g"], loss_g, model.encoder, d)
    disc.requires_grad_(True)
    return {"recon": rec.item(), "d": loss_d.item(), "g": loss_g.item()}


def _update(
    opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module, d: distributed.Dist
) -> None:
    """Backward, average the gradients of ``module`` over ranks (one flat all-reduce), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if d.enabled:
        params = [p for p in module.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        flat /= d.world
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))
    opt.step()


def _perceptual(n: DictConfig, device: torch.device):
    """The LPIPS model when ``normative.lpips_weight > 0`` (imported only then), else None."""
    if float(n.lpips_weight) <= 0:
        return None
    from cfexplain.nn.perceptual import build_perceptual

    model = build_perceptual(str(n.lpips_kind), device=device)
    log.info(f"[normative] perceptual loss: {model.note}")
    return model


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nm.NormativeModel,
    ds: Dataset,
    healthy: list[int],
    batch: int,
    device: torch.device,
    pixel_samples: int = 1_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Image AUC of the score (diseased = label not in ``healthy``); pixel AUROC and best Dice
    of the residual against :func:`pathology_mask` over the diseased images, when masks exist."""
    scores, diseased, res_px, mask_px = [], [], [], []
    for x, y, metas in DataLoader(ds, batch_size=batch, collate_fn=collate):
        _, residual, score = model.anomaly(x.to(device))
        sick = torch.tensor([int(v) not in healthy for v in y.tolist()])
        scores.append(score.cpu())
        diseased.append(sick)
        masks = [pathology_mask(m) for m, s in zip(metas, sick) if s]
        if masks and all(m is not None for m in masks):
            res_px.append(residual[sick.to(device)].cpu().flatten().numpy())
            mask_px.append(torch.stack(masks).flatten().numpy())
    score_all = torch.cat(scores).numpy()
    sick_all = torch.cat(diseased).numpy()
    out: dict[str, Any] = {
        "image_auc": _auc(sick_all, score_all),
        "n_healthy": int((~sick_all).sum()),
        "n_diseased": int(sick_all.sum()),
        "score_healthy_mean": float(score_all[~sick_all].mean())
        if (~sick_all).any()
        else float("nan"),
        "score_diseased_mean": float(score_all[sick_all].mean())
        if sick_all.any()
        else float("nan"),
    }
    if res_px:
        r, m = np.concatenate(res_px), np.concatenate(mask_px)
        if len(r) > pixel_samples:  # sklearn's AUROC sorts everything: subsample, seeded
            idx = np.random.default_rng(seed).choice(len(r), pixel_samples, replace=False)
            r, m = r[idx], m[idx]
        dice, thr = best_dice(r, m)
        out |= {
            "pixel_auroc": _auc(m, r),
            "best_dice": dice,
            "best_dice_threshold": thr,
            "pathology_pixel_share": float(m.mean()),
        }
    return out


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else float("nan")


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Best Dice over all thresholds of ``scores >= t`` against ``truth`` (pooled pixels) and its ``t``."""
    truth = truth.astype(bool)
    if not truth.any():
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    predicted = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every tie together
    dice = 2 * tp[last] / (predicted[last] + truth.sum())
    i = int(np.argmax(dice))
    return float(dice[i]), float(s[last][i])


def _examples(
    run: Run, model: nm.NormativeModel, ds: Dataset, healthy: list[int], name: str, path, n: int = 8
) -> None:
    """A grid of diseased test images: input, healthy reconstruction, residual (rows)."""
    idx = [i for i in range(len(ds)) if int(ds[i]["label"]) not in healthy][:n]
    if not idx:
        return
    x = collate([ds[i] for i in idx])[0].to(next(model.parameters()).device)
    recon, residual, score = model.anomaly(x)
    shown = (residual / residual.amax().clamp_min(1e-6) * 2 - 1).expand_as(x)
    rows = torch.cat([x, recon, shown]).cpu()
    save_grid(rows, path, nrow=len(idx), scale=2)
    caps = (
        [f"input s={s:.3f}" for s in score.tolist()]
        + ["reconstruction"] * len(idx)
        + ["residual"] * len(idx)
    )
    run.log_images(f"{name}/test/examples", rows, caps)
