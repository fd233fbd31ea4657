"""``python -m cfexplain.sensitivity run=runs/<experiment>``: sensitivity analysis of a model.

Sweeps each of ``transforms`` over its parameter range on the run's images and plots the
model's output against the parameter: the probability of ``target`` for the run's classifier
(or the user's, ``model.target``/``model.torchscript``), the Dice per class for a segmentation
model (``task=segmentation``: the run's ``segmentation`` stage or the user's model, against the
phantom's masks). Written into ``runs/<experiment>/sensitivity/<timestamp>/`` (or ``out=``) as
``index.html``, per-transform plot, strip and GIF, ``sensitivity.csv``, ``summary.json``, and to
W&B (offline by default).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cfexplain.runs import TrainedRun, open_dataset
from cfexplain.sensitivity.analysis import TASKS, SweepResult, result_rows, sweep
from cfexplain.sensitivity.transforms import TRANSFORMS, get_transform
from cfexplain.utils import distributed
from cfexplain.utils.cli import ConfigError, command_run, run_command
from cfexplain.utils.seeding import seed_everything
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

STAGE_OF_TASK = {"classification": "classifier", "segmentation": "segmentation"}


def _data_config(cfg: DictConfig, run: TrainedRun | None) -> DictConfig:
    """The data the images come from: the run's training config, else ``+dataset=`` sized here."""
    if run is not None:
        return run.config.data
    if cfg.get("data") is None or "name" not in cfg.data:
        raise ConfigError(
            "no images: set run=runs/<experiment>, or +dataset=NAME for a model given by model.target"
        )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    n = 64 if cfg.limit is None else int(cfg.limit)
    data.setdefault("resolution", int(cfg.resolution))
    data.setdefault(f"n_{cfg.split}", n)
    return OmegaConf.create(data)


def _external(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    from cfexplain.nn.classifier import load_external

    m = cfg.model
    kwargs = OmegaConf.to_container(m.kwargs, resolve=True) if m.get("kwargs") else {}
    try:
        return load_external(
            m.get("target"), kwargs, m.get("weights"), m.get("torchscript"), field="model"
        )
    except (ValueError, ImportError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


def _load_images(cfg: DictConfig, data_cfg: DictConfig):
    from cfexplain.data import collate

    ds = open_dataset(data_cfg, str(cfg.split))
    n = len(ds) if cfg.limit is None else min(int(cfg.limit), len(ds))
    if n == 0:
        raise ConfigError(f"split={cfg.split}: no images")
    x, labels, metas = collate([ds[i] for i in range(n)])
    return ds, x, metas, f"{n} images of {getattr(ds, 'source', cfg.split)}"


def _model_and_outputs(
    cfg: DictConfig, run: TrainedRun | None, ds, x: torch.Tensor, metas, device: torch.device
) -> tuple[torch.nn.Module, str, list[str], torch.Tensor | None, dict[str, Any]]:
    """``(model, description, output names, masks or None, header facts)``."""
    from cfexplain.data.masks import mask_names, stack_masks
    from cfexplain.nn.classifier import BinaryLogitAdapter, check_classifier

    task = str(cfg.task)
    stage = STAGE_OF_TASK[task]
    external = bool(cfg.model.get("target") or cfg.model.get("torchscript"))
    art = None
    if external:
        model, source = _external(cfg)
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
        target = int(cfg.target)
        if not 0 <= target < len(classes):
            raise ConfigError(f"target={target}: the classes are {classes}")
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


def _plan(cfg: DictConfig) -> list[tuple[str, list[float] | None]]:
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


def sensitivity(cfg: DictConfig) -> Path:
    """Run the sweeps that ``cfg`` describes; return the path of the page's ``index.html``."""
    from cfexplain.sensitivity.page import write_report

    task = str(cfg.task)
    if task not in TASKS:
        raise ConfigError(f"task={task}: expected one of {list(TASKS)}")
    plan = _plan(cfg)
    seed_everything(int(cfg.seed), False)
    device = distributed.setup(str(cfg.device)).device
    # Without run=, the images come from +dataset= and the model from model.target.
    trained = TrainedRun(str(cfg.run), device, require=None) if cfg.get("run") else None
    run_dir = trained.dir if trained is not None else None
    data_cfg = _data_config(cfg, trained)
    ds, x, metas, described = _load_images(cfg, data_cfg)
    model, source, outputs, masks, facts = _model_and_outputs(cfg, trained, ds, x, metas, device)
    if cfg.out:
        out = Path(str(cfg.out))
    elif trained is not None:
        out = trained.output_dir("sensitivity", stamped=True)
    else:
        raise ConfigError("set out=<folder> (there is no run= to write under)")
    out = out.expanduser().resolve()
    header: dict[str, Any] = {
        "run": str(run_dir) if run_dir else "",
        "model": source,
        "task": task,
        "images": described,
        **facts,
        "transforms": ", ".join(n for n, _ in plan),
    }
    run = command_run("sensitivity", out, cfg, run_dir.name if run_dir else "sensitivity")
    start = time.time()
    try:
        results: list[SweepResult] = []
        for name, values in tqdm(plan, desc="sensitivity", unit="transform"):
            results.append(
                sweep(
                    model,
                    x,
                    name,
                    values,
                    task=task,
                    target=int(cfg.target),
                    masks=masks,
                    outputs=outputs,
                    activation=str(cfg.activation),
                    threshold=float(cfg.threshold),
                    batch_size=int(cfg.batch_size),
                    examples=int(cfg.examples),
                )
            )
        seconds = time.time() - start
        ranges = {
            f"{r.transform}/{o}/range": s["range"] for r in results for o, s in r.summary().items()
        }
        summary = {
            "run": str(run_dir) if run_dir else None,
            "out": str(out),
            "model": source,
            "task": task,
            "outputs": outputs,
            "images": int(len(x)),
            "seconds": round(seconds, 2),
            "wandb_dir": str(run.wandb_dir) if run.wandb_dir else None,
        }
        index, files = write_report(out, results, header, summary, size=int(cfg.image_px))
        _log(run, results, files, out)
        run.summary({f"sensitivity/{k}": v for k, v in ranges.items()})
        run.log_artifact(
            out, name=f"{run_dir.name if run_dir else 'model'}-sensitivity", type="report"
        )
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    log.info(
        f"[sensitivity] {len(results)} transforms × {len(x)} images, {seconds:.1f} s → {index}"
    )
    return index


def _log(run: Run, results: list[SweepResult], files: dict, out: Path) -> None:
    """W&B: the curves as a table, the plot/strip/GIF per transform, the first image's sweep."""
    rows = [list(r.values()) for res in results for r in result_rows(res)]
    run.log_table(
        "sensitivity/curves", ["transform", "param", "output", "mean", "std", "images"], rows
    )
    media = [
        [res.transform, out / files[res.transform]["plot"], out / files[res.transform]["strip"]]
        for res in results
    ]
    run.log_table("sensitivity/plots", ["transform", "plot", "strip"], media)
    for res in results:
        first = res.examples[:, 0]
        caps = [f"{res.transform}={p:g}" for p in res.params]
        run.log_images(
            f"sensitivity/{res.transform}",
            first if first.shape[1] in (1, 3) else first[:, :1],
            caps,
        )


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    run_command("sensitivity", sensitivity, cfg, "page")


if __name__ == "__main__":
    main()
