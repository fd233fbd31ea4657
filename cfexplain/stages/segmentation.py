"""Segmentation stage: the built-in segmentation model that sensitivity analysis probes.

A U-Net (``segmentation=unet``) learns the phantoms' ground-truth masks (knee: osteophyte,
joint_space, sclerosis, marker; histology: tumour), one sigmoid channel per mask, with
BCE + soft Dice; AdamW, warm-up + cosine learning rate, resumable every ``checkpoint_every``
steps, DDP under ``torchrun``. Metrics: Dice per class on the test split, pooled over its
pixels, and the mean per-image Dice over the images where the class is present or predicted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cfexplain.data.masks import mask_names, stack_masks
from cfexplain.nn.segmentation import UNet, dice_scores, predict_masks, segmentation_loss
from cfexplain.stages._shared import (
    Checkpoint,
    check_batch,
    count_step,
    epoch_loader,
    lr_at,
    resume_loop,
    write_artifact,
)
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.images import save_grid
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

WEIGHTS = "segmentation.safetensors"
TARGET = "cfexplain.nn.segmentation.UNet"
SEED_KEY = 60  # separates this stage's batch order from the other stages'


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train the U-Net on the train split's masks; write weights and test Dice into ``run.dir``."""
    from cfexplain.data import build_dataset

    if cfg.get("segmentation") is None:
        raise ValueError(
            "the segmentation stage needs its config group: segmentation=unet (conf/config.yaml's defaults have it)"
        )
    d = distributed.setup(cfg.device)
    s = cfg.segmentation
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    log.info(f"[segmentation] {train_ds.source}")
    classes = mask_names(train_ds, s.get("classes"))
    kwargs = {
        k: v for k, v in OmegaConf.to_container(s.model, resolve=True).items() if k != "_target_"
    }
    kwargs |= {"in_channels": int(cfg.data.channels), "num_classes": len(classes)}
    model, loop = _train(cfg, run, train_ds, classes, kwargs, d)
    metrics = {
        f"test/{k}": v
        for k, v in evaluate(
            model, test_ds, classes, int(s.eval_batch_size), d.device, float(s.threshold)
        ).items()
    }
    metrics |= {"steps": loop["step"], "train_seconds": round(loop["train_seconds"], 1)}
    files = {"weights": WEIGHTS}
    info = {
        "data": train_ds.source,
        "classes": classes,
        "model": f"{TARGET} {kwargs}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "threshold": float(s.threshold),
        "processes": d.world,
        "device": str(d.device),
    }
    if run.is_main:
        save_model(run.dir / WEIGHTS, model, TARGET, kwargs)
        files["examples"] = "examples.png"
        _examples(run, model, test_ds, classes, float(s.threshold), run.dir / files["examples"])
        run.log({k: v for k, v in metrics.items() if np.isscalar(v)})
        run.summary(metrics)
        per_class = "  ".join(f"{c} {metrics[f'test/dice/{c}']:.3f}" for c in classes)
        tqdm.write(f"[segmentation] test Dice: {per_class}")
    return write_artifact(run, metrics, files, info)


# ----------------------------------------------------------------------------- data


def _collate(classes: Sequence[str]):
    from cfexplain.data import collate

    def fn(samples):
        x, _, metas = collate(samples)
        return x, stack_masks(metas, classes, x.shape[-2:])

    return fn


# ----------------------------------------------------------------------------- training


def _train(
    cfg: DictConfig,
    run: Run,
    ds: Dataset,
    classes: list[str],
    kwargs: dict[str, Any],
    d: distributed.Dist,
) -> tuple[UNet, dict[str, Any]]:
    s = cfg.segmentation
    check_batch("segmentation.batch_size", int(s.batch_size), len(ds), d)
    torch.manual_seed(int(cfg.seed))  # initial weights: same on every rank, same for a seed
    model = UNet(**kwargs).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(s.lr), weight_decay=float(s.weight_decay))
    ckpt = Checkpoint(run, d, rng=True, model=model, optimizer=opt)
    loop = resume_loop(ckpt)
    if loop["finished"]:
        return model.eval(), loop
    ddp = distributed.wrap_ddp(model, d)
    bar = tqdm(
        total=int(s.steps),
        initial=loop["step"],
        desc="segmentation",
        unit="step",
        disable=not run.is_main,
    )
    t0 = time.time() - loop["train_seconds"]
    model.train()
    while loop["step"] < int(s.steps):
        _train_epoch(cfg, run, ddp, opt, ds, classes, loop, t0, d, bar, ckpt)
    bar.close()
    loop["finished"] = True
    ckpt.save(loop["step"], loop=loop)
    return model.eval(), loop


def _train_epoch(
    cfg: DictConfig,
    run: Run,
    ddp: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ds: Dataset,
    classes: list[str],
    loop: dict[str, Any],
    t0: float,
    d: distributed.Dist,
    bar: tqdm,
    ckpt: Checkpoint,
) -> None:
    """The rest of the current epoch (its batches not done before a resume), up to the end."""
    s, total, batch = (
        cfg.segmentation,
        int(cfg.segmentation.steps),
        int(cfg.segmentation.batch_size),
    )
    schedule = dict(
        base=float(s.lr), warmup=int(s.warmup_steps), total=total, min_ratio=float(s.min_lr_ratio)
    )
    epoch = loop["step"] // (len(ds) // batch)
    seed, workers = int(cfg.seed) + SEED_KEY, int(cfg.data.num_workers)
    loader = epoch_loader(ds, batch, seed, epoch, loop["step"], d, workers, _collate(classes))
    for x, masks in loader:
        x, masks = x.to(d.device, non_blocking=True), masks.to(d.device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(loop["step"], **schedule)
        with distributed.autocast(d.device, bool(s.amp)):
            logits = ddp(x)
        loss = segmentation_loss(logits, masks, float(s.dice_weight))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count_step(run, loop, loss, opt, ckpt, t0, bar, int(cfg.checkpoint_every))
        if loop["step"] >= total:
            break


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ds: Dataset,
    classes: Sequence[str],
    batch: int,
    device: torch.device,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Per class: Dice pooled over the split's pixels (``dice/<class>``) and the mean per-image
    Dice (``image_dice/<class>``, images with an empty truth and prediction left out);
    ``dice_mean`` averages the pooled Dice over the classes present in the split."""
    was_training = model.training
    model.eval()
    inter = torch.zeros(len(classes), dtype=torch.float64)
    total = torch.zeros(len(classes), dtype=torch.float64)
    per_image = []
    for x, truth in DataLoader(ds, batch_size=batch, collate_fn=_collate(classes)):
        pred = predict_masks(model(x.to(device)), "sigmoid", threshold).cpu()
        inter += (pred & truth).sum(dim=(0, 2, 3)).double()
        total += (pred.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3))).double()
        per_image.append(dice_scores(pred, truth))
    model.train(was_training)
    pooled = torch.where(
        total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, math.nan)
    )
    images = torch.cat(per_image).nanmean(dim=0)
    out: dict[str, float] = {}
    for k, name in enumerate(classes):
        out[f"dice/{name}"] = float(pooled[k])
        out[f"image_dice/{name}"] = float(images[k])
    finite = [float(v) for v in pooled if not math.isnan(float(v))]
    out["dice_mean"] = sum(finite) / len(finite) if finite else math.nan
    return out


def _examples(
    run: Run,
    model: torch.nn.Module,
    ds: Dataset,
    classes: Sequence[str],
    threshold: float,
    path,
    n: int = 8,
) -> None:
    """A grid: test images (first row), then per class the truth and the prediction (rows)."""
    from cfexplain.data import collate

    x, _, metas = collate([ds[i] for i in range(min(n, len(ds)))])
    truth = stack_masks(metas, classes, x.shape[-2:])
    with torch.no_grad():
        pred = predict_masks(model(x.to(next(model.parameters()).device)), "sigmoid", threshold)
    gray = x.mean(1, keepdim=True)
    rows = [gray]
    for k in range(len(classes)):
        rows += [truth[:, k : k + 1].float() * 2 - 1, pred[:, k : k + 1].cpu().float() * 2 - 1]
    grid = torch.cat(rows)
    save_grid(grid, path, nrow=len(x), scale=2)
    caps = ["input"] * len(x)
    for c in classes:
        caps += [f"{c} truth"] * len(x) + [f"{c} predicted"] * len(x)
    run.log_images("test/examples", grid, caps)
