"""Classifier stage: the black box to explain, trained here or brought by the user.

Trained: a ResNet (``classifier=resnet``) or concept capsules (``classifier=capsules``: the
diagnosis plus, weighted by config, attribute lengths against ``meta["concepts"]`` and the
reconstruction) with AdamW, warm-up + cosine learning rate, early stopping on validation AUC,
resumable every ``checkpoint_every`` steps. External
(``classifier=external``): the user's module or TorchScript file, checked with one forward pass.
Either way the test split is scored and the model is saved in a form later stages load alone.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cfexplain.data import build_dataset, collate
from cfexplain.data.concepts import attribute_metrics, concept_targets
from cfexplain.nn.capsules import capsule_losses, capsule_net
from cfexplain.nn.classifier import BinaryLogitAdapter, check_classifier, load_external
from cfexplain.stages._shared import Checkpoint, epoch_loader, lr_at, write_artifact
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model
from cfexplain.utils.seeding import Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

WEIGHTS = "classifier.safetensors"
TORCHSCRIPT = "classifier.torchscript.pt"


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train (or import) the classifier; write weights and test metrics into ``run.dir``."""
    d = distributed.setup(cfg.device)
    splits = {s: build_dataset(cfg.data, s) for s in ("train", "val", "test")}
    for ds in splits.values():
        log.info(f"[classifier] {ds.source}")
    c = cfg.classifier
    if c.name == "external":
        model, files, info = _import_external(c, splits["test"], run.dir, d.device)
    else:
        model, files, info = _train(cfg, run, splits, d)
    probs, labels = predict(model, splits["test"], int(c.eval_batch_size), d.device)
    metrics = {f"test/{k}": v for k, v in classification_metrics(probs, labels).items()}
    metrics |= _attribute_metrics(model, splits["test"], int(c.eval_batch_size), d.device)
    info = {"data": splits["train"].source, "classes": list(splits["train"].class_names), **info}
    if run.is_main:
        run.log({k: v for k, v in metrics.items() if np.isscalar(v)})
        run.summary(metrics)
        _log_examples(run, splits["test"], probs)
    return write_artifact(run, metrics, files, info)


# ----------------------------------------------------------------------------- training


def _train(cfg: DictConfig, run: Run, splits: dict[str, Dataset], d: distributed.Dist):
    """Train with early stopping on validation AUC; the best epoch's model, files and info."""
    c = cfg.classifier
    _check_batch(int(c.batch_size), len(splits["train"]), d)
    model, kwargs = _build(cfg, splits["train"], d.device)
    opt = instantiate(c.optimizer)(model.parameters())
    steps_per_epoch = len(splits["train"]) // int(c.batch_size)
    total = int(c.epochs) * steps_per_epoch
    lr = dict(
        base=float(c.optimizer.lr),
        warmup=int(c.warmup_steps),
        total=total,
        min_ratio=float(c.min_lr_ratio),
    )
    ckpt = Checkpoint(run, d, rng=True, model=model, optimizer=opt)
    saved = ckpt.load()
    s: dict[str, Any] = saved["loop"] if saved else _start()
    if saved:
        ckpt.announce(f"at step {s['step']}", resumed_from_step=s["step"])
    ddp = distributed.wrap_ddp(model, d)
    bar = tqdm(
        total=total, initial=s["step"], desc="classifier", unit="step", disable=not run.is_main
    )
    while s["epoch"] < int(c.epochs) and s["bad_epochs"] < int(c.patience):
        _train_epoch(cfg, run, ddp, opt, splits["train"], s, lr, d, bar, ckpt)
        _validate(c, run, model, splits["val"], s, d, bar)
        ckpt.save(s["step"], loop=s)
    bar.close()
    if s["best"] is not None:
        model.load_state_dict(s["best"])
    files = {"weights": WEIGHTS}
    if run.is_main:
        save_model(run.dir / WEIGHTS, model, c.model._target_, kwargs)
    info = {
        "model": f"{c.model._target_} {kwargs}",
        "epochs_run": s["epoch"],
        "best_epoch": s["best_epoch"],
        "stopped_early": s["epoch"] < int(c.epochs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "processes": d.world,
        "device": str(d.device),
    }
    if c.name == "capsules":
        info |= {
            "attributes": kwargs["attributes"],
            "attribute_weight": float(c.attribute_weight),
            "reconstruction_weight": float(c.reconstruction_weight),
        }
    return model.eval(), files, info


def _start() -> dict[str, Any]:
    """The loop's counters before the first step."""
    return {
        "step": 0,
        "epoch": 0,
        "best_auc": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "best": None,  # the best epoch's weights so far
        "history": [],
    }


def _check_batch(batch: int, n_train: int, d: distributed.Dist) -> None:
    if batch % d.world:
        raise ValueError(
            f"classifier.batch_size={batch} must be divisible by the number of processes ({d.world})"
        )
    if n_train < batch:
        raise ValueError(
            f"classifier.batch_size={batch} is larger than the training split ({n_train} images)"
        )


def _build(
    cfg: DictConfig, train: Dataset, device: torch.device
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The untrained model and the constructor arguments it is saved with."""
    c = cfg.classifier
    kwargs = {
        k: v for k, v in OmegaConf.to_container(c.model, resolve=True).items() if k != "_target_"
    }
    kwargs |= {"in_channels": int(cfg.data.channels), "num_classes": int(train.num_classes)}
    if c.name == "capsules":
        kwargs = _capsule_kwargs(c, kwargs, train)
        model_cfg = OmegaConf.create({"_target_": c.model._target_, **kwargs})
    else:
        model_cfg = c.model
    torch.manual_seed(int(cfg.seed))  # initial weights: same on every rank, same for a seed
    extra = {k: kwargs[k] for k in ("in_channels", "num_classes")}
    model = instantiate(model_cfg, **extra)
    return model.to(device), kwargs


def _capsule_kwargs(c: DictConfig, kwargs: dict[str, Any], train: Dataset) -> dict[str, Any]:
    """The capsule classifier's constructor arguments: its attribute names (``attributes``, the
    data's concepts, or ``capsules`` unnamed ones when unsupervised), without the ResNet keys a
    preset sets (``blocks``, ``stem_stride``: said in the log)."""
    from cfexplain.utils.artifacts import import_target
    from cfexplain.utils.cli import ConfigError

    accepted = inspect.signature(import_target(c.model._target_)).parameters
    dropped = sorted(k for k in kwargs if k not in accepted)
    if dropped:
        log.info(
            f"[classifier] classifier.model.{', '.join(dropped)}: not parameters of "
            f"{c.model._target_} (a preset sets them for the ResNet); not used"
        )
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    concepts = train[0]["meta"].get("concepts") if len(train) else None
    if c.attributes:
        names = [str(a) for a in c.attributes]
    elif concepts:
        names = list(concepts)
    elif float(c.attribute_weight) == 0:
        names = [f"capsule_{i}" for i in range(int(c.capsules))]
    else:
        raise ConfigError(
            "classifier=capsules: the data has no concept annotations (meta['concepts']); use a "
            "phantom, data.attributes for a CSV, or classifier.attribute_weight=0"
        )
    if float(c.attribute_weight) > 0:
        concept_targets([train[0]["meta"]], names)  # a missing concept fails here, named
    return kwargs | {"attributes": names}


def _train_epoch(
    cfg: DictConfig,
    run: Run,
    ddp: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ds: Dataset,
    s: dict[str, Any],
    lr: dict[str, Any],
    d: distributed.Dist,
    bar: tqdm,
    ckpt: Checkpoint,
) -> None:
    """The rest of epoch ``s['epoch']``: its batches not done before a resume."""
    c, seed, batch = cfg.classifier, int(cfg.seed), int(cfg.classifier.batch_size)
    loader = epoch_loader(ds, batch, seed, s["epoch"], s["step"], d, int(cfg.data.num_workers))
    caps = capsule_net(ddp.module if hasattr(ddp, "module") else ddp)
    ddp.train()
    for x, y, metas in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if c.hflip:
            draw = generator(seed, Stream.CLASSIFIER_FLIP, s["step"], d.rank)
            flip = torch.rand(len(x), generator=draw) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        terms: dict[str, torch.Tensor] = {}
        with distributed.autocast(d.device, bool(c.amp)):
            if caps is None:
                loss = F.cross_entropy(ddp(x), y, label_smoothing=float(c.label_smoothing))
            else:
                terms = _capsule_terms(c, ddp, x, y, metas, caps.attributes, d.device)
                loss = terms.pop("loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(s["step"], **lr)
        opt.step()
        s["step"] += 1
        bar.update()
        if s["step"] % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            more = {f"train/{k}_loss": v.item() for k, v in terms.items()}
            run.log(
                {"train/loss": loss.item(), "train/lr": opt.param_groups[0]["lr"], **more},
                step=s["step"],
            )
        if s["step"] % int(cfg.checkpoint_every) == 0:
            ckpt.save(s["step"], loop=s)


def _capsule_terms(
    c: DictConfig,
    ddp: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    metas: list[dict],
    attributes: list[str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The capsule classifier's loss and its terms on one batch (through ``ddp``, so that the
    gradients are averaged over the processes)."""
    weight = float(c.attribute_weight)
    targets = None
    if weight > 0:
        targets = torch.from_numpy(concept_targets(metas, attributes)).to(device)
    return capsule_losses(
        ddp(x, outputs=True),
        x,
        y,
        targets,
        weight,
        float(c.reconstruction_weight),
        float(c.label_smoothing),
    )


def _validate(
    c: DictConfig,
    run: Run,
    model: torch.nn.Module,
    val_ds: Dataset,
    s: dict[str, Any],
    d: distributed.Dist,
    bar: tqdm,
) -> None:
    """End of an epoch: validation AUC, and the best model so far (early stopping). Supervised
    capsules are chosen on the mean of the diagnosis AUC and the mean attribute AUC: the
    attributes are half of what they are for."""
    val = classification_metrics(*predict(model, val_ds, int(c.eval_batch_size), d.device))
    score, extra = val["auc"], {}
    if c.name == "capsules" and float(c.attribute_weight) > 0:
        extra = _attribute_metrics(model, val_ds, int(c.eval_batch_size), d.device)
        extra = {k.replace("test/", "val/"): v for k, v in extra.items()}
        score = (val["auc"] + extra["val/attributes/auc"]) / 2
    s["epoch"] += 1
    improved = score > s["best_auc"]
    if improved:
        s["best_auc"], s["best_epoch"], s["bad_epochs"] = score, s["epoch"], 0
        s["best"] = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    else:
        s["bad_epochs"] += 1
    s["history"].append(
        {"epoch": s["epoch"], "val_auc": val["auc"], "val_accuracy": val["accuracy"]}
    )
    run.log(
        {"val/auc": val["auc"], "val/accuracy": val["accuracy"], "epoch": s["epoch"], **extra},
        step=s["step"],
    )
    if run.is_main:
        more = f"  attribute AUC {extra['val/attributes/auc']:.4f}" if extra else ""
        bar.write(
            f"epoch {s['epoch']:>3}  val AUC {val['auc']:.4f}  accuracy {val['accuracy']:.4f}{more}{'  *' if improved else ''}"
        )


# ----------------------------------------------------------------------------- external


def _import_external(c: DictConfig, test_ds: Dataset, out: Path, device: torch.device):
    kwargs = OmegaConf.to_container(c.kwargs, resolve=True) if c.get("kwargs") is not None else {}
    model, source = load_external(
        target=c.get("target"),
        kwargs=kwargs,
        weights=c.get("weights"),
        torchscript=c.get("torchscript"),
    )
    x = torch.stack([test_ds[i]["image"] for i in range(min(2, len(test_ds)))])
    single_logit = check_classifier(model, x, int(test_ds.num_classes), source)
    if c.get("torchscript"):
        shutil.copyfile(c.torchscript, out / TORCHSCRIPT)
        files = {"torchscript": TORCHSCRIPT}
    else:
        save_model(out / WEIGHTS, model, c.target, kwargs)
        files = {"weights": WEIGHTS}
    if single_logit:
        model = BinaryLogitAdapter(model)
    return model.to(device).eval(), files, {"model": source, "single_logit": single_logit}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(
    model: torch.nn.Module, ds: Dataset, batch: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``[N, K]`` and labels ``[N]`` over a whole split (eval mode)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for x, y, _ in DataLoader(ds, batch_size=batch, collate_fn=collate):
        probs.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def predict_attributes(
    model: torch.nn.Module, ds: Dataset, batch: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """A capsule classifier's attribute readings ``[N, A]`` over a split, and the ground truth
    ``[N, A]`` of its concepts (None when the data has none)."""
    net = capsule_net(model)
    assert net is not None, f"{type(model).__name__} has no attribute capsules"
    was_training = net.training
    net.eval()
    pred, metas = [], []
    for x, _, m in DataLoader(ds, batch_size=batch, collate_fn=collate):
        pred.append(net.attribute_values(x.to(device)).float().cpu())
        metas += m
    net.train(was_training)
    truth = None
    if all(set(net.attributes) <= set(m.get("concepts") or {}) for m in metas):
        truth = concept_targets(metas, net.attributes)
    return torch.cat(pred).numpy(), truth


def _attribute_metrics(
    model: torch.nn.Module, ds: Dataset, batch: int, device: torch.device
) -> dict[str, float]:
    """``test/attributes/<name>/{mae,auc}`` of a capsule classifier with ground truth; {} else."""
    if capsule_net(model) is None:
        return {}
    pred, truth = predict_attributes(model, ds, batch, device)
    if truth is None:
        return {}
    names = capsule_net(model).attributes  # type: ignore[union-attr]
    return {f"test/attributes/{k}": v for k, v in attribute_metrics(pred, truth, names).items()}


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """AUC (one-vs-rest macro over the classes present), accuracy, balanced accuracy, confusion matrix."""
    k = probs.shape[1]
    pred = probs.argmax(1)
    present = [c for c in range(k) if 0 < (labels == c).sum() < len(labels)]
    if k == 2:
        auc = float(roc_auc_score(labels, probs[:, 1])) if len(present) == 2 else float("nan")
    else:
        auc = (
            float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
            if present
            else float("nan")
        )
    return {
        "auc": auc,
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(k))).tolist(),
    }


def _log_examples(run: Run, ds: Dataset, probs: np.ndarray, n: int = 16) -> None:
    idx = list(range(min(n, len(ds))))
    images = torch.stack([ds[i]["image"] for i in idx])
    names = list(ds.class_names)
    caps = [
        f"true {names[int(ds[i]['label'])]} · p={probs[i].max():.2f} {names[int(probs[i].argmax())]}"
        for i in idx
    ]
    run.log_images("test/examples", images, caps)
