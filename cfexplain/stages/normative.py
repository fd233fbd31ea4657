"""Normative stage: a VAE and an AAE trained on healthy images only, scored on the test split.

The models in ``normative.models`` train one after the other; each keeps its own resumable
state inside the stage's ``state.pt``, so a kill resumes in the middle of the model it hit.
Training sees only images whose label is in ``normative.healthy_labels`` (checked per batch).
Metrics per model: image-level AUC of the anomaly score, diseased vs healthy test images; with
ground-truth masks (phantoms), pixel-level AUROC and best Dice of the residual map against the
pathology mask, over the diseased test images.
"""

from __future__ import annotations

import logging
import time
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
from cfexplain.stages._shared import write_artifact
from cfexplain.stages.classifier import epoch_batches, lr_at
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import STATE_FILE, Artifact, save_model, torch_load, torch_save
from cfexplain.utils.images import save_grid
from cfexplain.utils.seeding import Stream, generator, rng_state, set_rng_state
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

    state_file = run.dir / STATE_FILE
    state: dict[str, Any] = torch_load(state_file) if state_file.is_file() else {"models": {}}
    if state["models"]:
        set_rng_state(state["rng"])
        where = {m: s["loop"]["step"] for m, s in state["models"].items()}
        log.info(f"[normative] resumed from {state_file} at steps {where}")
        run.notes["resumed_from_steps"] = where

    def checkpoint() -> None:
        if run.is_main:
            torch_save({**state, "rng": rng_state()}, state_file)
        d.barrier()

    files: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    info: dict[str, Any] = {
        "data": train_ds.source,
        "models": names,
        "healthy_labels": healthy,
        **counts,
    }
    for name in names:
        model, loop = _train(name, cfg, run, healthy_ds, healthy, d, state, checkpoint)
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
            run.log({k: v for k, v in metrics.items() if k.startswith(name) and np.isscalar(v)})
            tqdm.write(
                f"[normative] {name}: image AUC {result['image_auc']:.4f}  pixel AUROC "
                f"{result.get('pixel_auroc', float('nan')):.4f}  best Dice {result.get('best_dice', float('nan')):.4f}"
            )
    info |= {"processes": d.world, "device": str(d.device)}
    if run.is_main:
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


def _train(
    name: str,
    cfg: DictConfig,
    run: Run,
    ds: Dataset,
    healthy: list[int],
    d: distributed.Dist,
    state: dict[str, Any],
    checkpoint,
) -> tuple[nm.NormativeModel, dict[str, Any]]:
    """Train one model (or finish a resumed one); its state lives in ``state['models'][name]``."""
    n, seed = cfg.normative, int(cfg.seed)
    key = nm.MODEL_NAMES.index(name) + 1  # separates the random streams of the two models
    batch = int(n.batch_size)
    if batch % d.world:
        raise ValueError(
            f"normative.batch_size={batch} must be divisible by the number of processes ({d.world})"
        )
    model = _build(cfg, name, d.device, seed + key)
    modules: dict[str, torch.nn.Module] = {"model": model}
    opts = {"ae": torch.optim.Adam(model.parameters(), lr=float(n.lr), betas=tuple(n.betas))}
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
    loop: dict[str, Any] = {"step": 0, "train_seconds": 0.0, "finished": False}
    if name in state["models"]:
        saved = state["models"][name]
        for k, m in modules.items():
            m.load_state_dict(saved["modules"][k])
        for k, o in opts.items():
            o.load_state_dict(saved["opts"][k])
        loop = dict(saved["loop"])

    def save() -> None:
        state["models"][name] = {
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "opts": {k: o.state_dict() for k, o in opts.items()},
            "loop": dict(loop),
        }
        checkpoint()

    total = int(n.steps)
    if loop["finished"]:
        log.info(f"[normative] {name}: finished before the resume, {loop['step']} steps")
        return model.eval(), loop
    perceptual = _perceptual(n, d.device)
    schedule = dict(
        base=1.0, warmup=int(n.warmup_steps), total=total, min_ratio=float(n.min_lr_ratio)
    )
    steps_per_epoch = len(ds) // batch
    bar = tqdm(
        total=total,
        initial=loop["step"],
        desc=f"normative {name}",
        unit="step",
        disable=not run.is_main,
    )
    t0 = time.time() - loop["train_seconds"]
    model.train()
    while loop["step"] < total:
        epoch = loop["step"] // steps_per_epoch
        batches = epoch_batches(len(ds), batch, seed + key, epoch, d.rank, d.world)
        skip = loop["step"] - epoch * steps_per_epoch
        loader = DataLoader(
            ds,
            batch_sampler=batches[skip:],
            collate_fn=collate,
            num_workers=int(cfg.data.num_workers),
        )
        for x, y, _ in loader:
            bad = sorted(set(y.tolist()) - set(healthy))
            assert not bad, f"normative: labels {bad} reached training; only {healthy} may"
            x = x.to(d.device, non_blocking=True)
            step = loop["step"]
            for k, o in opts.items():
                for g in o.param_groups:
                    g["lr"] = base_lr[k] * lr_at(step, **schedule)
            noise = torch.randn(
                (len(x), *model.latent_shape),
                generator=generator(seed, Stream.NORMATIVE_LATENT + key, step, d.rank),
            ).to(d.device)
            if name == "vae":
                losses = _vae_step(model, opts, x, noise, n, perceptual, d)
            else:
                losses = _aae_step(model, modules["disc"], opts, x, noise, n, perceptual, d)
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(
                    f"normative {name} diverged at step {step} ({losses}); the last checkpoint "
                    f"{run.dir / STATE_FILE} is untouched: lower normative.lr"
                )
            loop["step"] += 1
            loop["train_seconds"] = time.time() - t0
            bar.update()
            if loop["step"] % 10 == 0:
                bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
                run.log({f"{name}/train/{k}": v for k, v in losses.items()}, step=loop["step"])
            if loop["step"] % int(cfg.checkpoint_every) == 0:
                save()
            if loop["step"] >= total:
                break
    bar.close()
    loop["finished"] = True
    save()
    return model.eval(), loop


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
