"""What a sensitivity analysis sweeps: the transformations and their values, the images (the
run's split, or ``+dataset=`` without a run), the model (the run's classifier or segmentation
stage, or the user's own) and the outputs it is scored by.

``python -m cfexplain.sensitivity`` is the thin entry point over this module.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cfexplain.runs import TrainedRun, open_dataset
from cfexplain.sensitivity.transforms import TRANSFORMS, get_transform
from cfexplain.utils.cli import ConfigError, class_index, image_count, image_limit

STAGE_OF_TASK = {"classification": "classifier", "segmentation": "segmentation"}


def data_config(cfg: DictConfig, run: TrainedRun | None) -> DictConfig:
    """The data the images come from: the run's training config, else ``+dataset=`` sized here."""
    if run is not None:
        return run.config.data
    if cfg.data is None or "name" not in cfg.data:
        raise ConfigError(
            "no images: set run=runs/<experiment>, or +dataset=NAME for a model given by model.target"
        )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    limit = image_limit(cfg.limit, null_means="64 images")
    n = 64 if limit is None else limit
    data.setdefault("resolution", int(cfg.resolution))
    data.setdefault(f"n_{cfg.split}", n)
    return OmegaConf.create(data)


def external_model(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """The user's own model of ``model.target``/``model.torchscript`` and its description."""
    from cfexplain.nn.classifier import load_external

    m = cfg.model
    kwargs = OmegaConf.to_container(m.kwargs, resolve=True) if m.kwargs else {}
    try:
        return load_external(m.target, kwargs, m.weights, m.torchscript, field="model")
    except (ValueError, ImportError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


def load_images(cfg: DictConfig, data_cfg: DictConfig):
    from cfexplain.data import collate

    ds = open_dataset(data_cfg, str(cfg.split))
    n = image_count(cfg.limit, len(ds))
    if n == 0:
        raise ConfigError(f"split={cfg.split}: no images")
    x, labels, metas = collate([ds[i] for i in range(n)])
    return ds, x, metas, f"{n} images of {getattr(ds, 'source', cfg.split)}"


def model_and_outputs(
    cfg: DictConfig, run: TrainedRun | None, ds, x: torch.Tensor, metas, device: torch.device
) -> tuple[torch.nn.Module, str, list[str], torch.Tensor | None, dict[str, Any]]:
    """``(model, description, output names, masks or None, header facts)``."""
    from cfexplain.data.masks import mask_names, stack_masks
    from cfexplain.nn.classifier import BinaryLogitAdapter, check_classifier

    task = str(cfg.task)
    stage = STAGE_OF_TASK[task]
    external = bool(cfg.model.target or cfg.model.torchscript)
    art = None
    if external:
        model, source = external_model(cfg)
    else:
        if run is None or not run.has(stage):
            where = run.artifact_file(stage) if run else "no run= given"
            hint = (
                "python -m cfexplain.train +dataset=knee stages=[segmentation]"
                if task == "segmentation"
                else "python -m cfexplain.train +dataset=knee"
            )
            raise ConfigError(
                f"task={task} needs a finished {stage} stage ({where}; {hint} trains one) "
                "or your own model (model.target / model.torchscript)"
            )
        art = run.artifact(stage)
        model = run.classifier if task == "classification" else run.segmentation
        source = art.info.get("model", stage)
    model = model.to(device).eval()
    probe = x[:2].to(device)
    if task == "classification":
        classes = [str(c) for c in (art.info.get("classes") if art else None) or ds.class_names]
        target = class_index(cfg.target, classes)
        cfg.target = target  # a class name becomes its index
        if external:
            try:
                if check_classifier(model, probe, len(classes), source):
                    model = BinaryLogitAdapter(model)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        return model, source, [f"p({classes[target]})"], None, {"target": classes[target]}
    if cfg.classes is not None:
        names = [str(c) for c in cfg.classes]
    elif art is not None and art.info.get("classes"):
        names = [str(c) for c in art.info["classes"]]
    else:
        try:
            names = mask_names(ds)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    with torch.no_grad():
        try:
            out = model(probe)
        except Exception as e:
            raise ConfigError(
                f"{source}: forward pass on images {tuple(probe.shape)} failed: {e}"
            ) from e
    expected = (len(probe), len(names), *probe.shape[-2:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{source}: images {tuple(probe.shape)} gave {shape}, expected logits {expected} "
            f"(one channel per mask {names}; set classes=[...] to name them)"
        )
    masks = stack_masks(metas, names, x.shape[-2:])
    return model, source, names, masks, {"masks": ", ".join(names)}


def sweep_plan(cfg: DictConfig) -> list[tuple[str, list[float] | None]]:
    """``[(transform, params or None for its default range)]``, validated."""
    names = [str(t) for t in cfg.transforms]
    if not names:
        raise ConfigError(f"transforms: empty; choose from {list(TRANSFORMS)}")
    for n in names:
        try:
            get_transform(n)
        except ValueError as e:
            raise ConfigError(f"transforms: {e}") from e
    params = OmegaConf.to_container(cfg.params, resolve=True) or {}
    extra = sorted(set(params) - set(names))
    if extra:
        raise ConfigError(f"params: {extra} are not among transforms={names}")
    plan = []
    for n in names:
        values = params.get(n)
        if values is not None:
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"params.{n}: expected a non-empty list of numbers, got {values!r}"
                )
            values = [float(v) for v in values]
        plan.append((n, values))
    return plan
