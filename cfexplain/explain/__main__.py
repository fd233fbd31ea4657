"""``python -m cfexplain.explain run=runs/<experiment>``: galleries of a trained run.

For every image (the run's test split, or ``images=`` the user's own files): the counterfactual
sequence with f's probability under each frame (when the run has generator, encoder and
direction stages), the attribution maps of ``methods``, the normative residual (when the run has
a normative stage), per-image metrics; written batch by batch into
``runs/<experiment>/explain/<timestamp>/`` (or ``out=``) as ``index.html``, PNG strips, GIFs,
``metrics.csv``, ``summary.json``, and as a W&B table (offline by default).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cfexplain.explain.attribution import Method, counterfactual_difference, get_method
from cfexplain.explain.gallery import GalleryWriter, Row
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import ARTIFACT_FILE, Artifact
from cfexplain.utils.cli import ConfigError, command_run, run_command, trained_run
from cfexplain.utils.seeding import seed_everything

log = logging.getLogger("cfexplain")

COUNTERFACTUAL_STAGES = ("generator", "encoder", "direction")


def _has(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / ARTIFACT_FILE).is_file()


def _batches(
    cfg: DictConfig,
    data_cfg: Any,
    classes: list[str],
    resolution: int,
    channels: int,
    skipped: list,
) -> tuple[Iterator[tuple[torch.Tensor, list[str], list[str | None]]], str, int]:
    """``(iterator of (images [B, C, R, R], names, true labels), description, count)``."""
    limit = None if cfg.limit is None else int(cfg.limit)
    size = int(cfg.batch_size)
    if cfg.images:
        from cfexplain.explain.inputs import iter_user_images, list_images

        items = list_images(str(cfg.images), classes)[:limit]
        source = iter_user_images(items, resolution=resolution, channels=channels, skipped=skipped)

        def user() -> Iterator:
            chunk = []
            for item in source:
                log.info(f"[explain] {item.note}")
                chunk.append(item)
                if len(chunk) == size:
                    yield _stack(chunk)
                    chunk = []
            if chunk:
                yield _stack(chunk)

        return user(), f"{len(items)} files from images={cfg.images}", len(items)

    from cfexplain.data import build_dataset

    ds = build_dataset(data_cfg, str(cfg.split))
    if hasattr(ds, "cache"):
        # The phantoms cache every rendered sample (masks included); each is read once here, so
        # caching would make memory grow with the number of images instead of batch_size.
        ds.cache = False
    n = len(ds) if limit is None else min(limit, len(ds))
    names = list(getattr(ds, "class_names", classes))

    def split() -> Iterator:
        for start in range(0, n, size):
            samples = [ds[i] for i in range(start, min(n, start + size))]
            x = torch.stack([s["image"] for s in samples])
            labels = [names[int(s["label"])] for s in samples]
            yield x, [f"{cfg.split} #{start + i}" for i in range(len(samples))], labels

    return split(), f"{n} images of {getattr(ds, 'source', cfg.split)}", n


def _stack(items: list) -> tuple[torch.Tensor, list[str], list[str | None]]:
    return (
        torch.stack([it.image for it in items]),
        [str(it.path.name) for it in items],
        [it.label for it in items],
    )


def build_methods(
    cfg: DictConfig, run_dir: Path, model: torch.nn.Module, notes: list[str]
) -> tuple[dict[str, Method], Any]:
    """The attribution objects of ``cfg.methods`` and the counterfactual engine (or None)."""
    params = OmegaConf.to_container(cfg.params, resolve=True) or {}
    names = list(cfg.methods)
    for name in names:
        try:
            get_method(name)  # unknown names fail before anything is loaded
        except ValueError as e:
            raise ConfigError(f"methods: {e}") from e
    engine = None
    if "counterfactual" in names:
        missing = [s for s in COUNTERFACTUAL_STAGES if not _has(run_dir, s)]
        if missing:
            notes.append(
                "No counterfactual column: it needs the generator, encoder and direction stages "
                f"of the run; {run_dir} lacks {', '.join(missing)} (python -m cfexplain.train trains them)."
            )
        else:
            from cfexplain.explain.counterfactual import CounterfactualEngine

            cf_params = OmegaConf.to_container(cfg.counterfactual, resolve=True) or {}
            engine = CounterfactualEngine.from_run(run_dir, device=_device(model), **cf_params)
    methods: dict[str, Method] = {}
    for name in names:
        if name == "counterfactual":
            continue
        if name == "normative":
            if not _has(run_dir, "normative"):
                notes.append(f"No normative map: {run_dir} has no normative stage.")
                continue
            methods[name] = get_method(name)(
                model, stage_dir=run_dir / "normative", **params.get(name, {})
            )
            continue
        try:
            methods[name] = get_method(name)(model, **(params.get(name) or {}))
        except TypeError as e:
            raise ConfigError(f"params.{name}: {e}") from e
        except ValueError as e:
            # e.g. grad-CAM on a user's model without `cam_layer`: the other maps still run.
            notes.append(f"No {name} map: {e}")
    return methods, engine


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Trained:
    """The trained run a command reads: its classifier, the config it trained with, the target."""

    dir: Path
    device: torch.device
    artifact: Artifact  # the classifier stage's
    config: DictConfig  # the classifier stage's training config
    classes: list[str]
    target: int
    model: torch.nn.Module


def open_run(cfg: DictConfig) -> Trained:
    """Seed, pick the device, load ``run=``'s classifier and check ``target=`` against it."""
    from cfexplain.nn.classifier import load_classifier

    run_dir = trained_run(cfg)
    seed_everything(int(cfg.seed), False)
    device = distributed.setup(str(cfg.device)).device
    art = Artifact.load(run_dir / "classifier")
    classes = [str(c) for c in art.info.get("classes") or []]
    target = int(cfg.target)
    if not classes or not 0 <= target < len(classes):
        raise ConfigError(f"target={target}: the classifier's classes are {classes}")
    return Trained(
        dir=run_dir,
        device=device,
        artifact=art,
        config=OmegaConf.load(run_dir / "classifier" / "config.yaml"),
        classes=classes,
        target=target,
        model=load_classifier(run_dir / "classifier", device),
    )


def explain(cfg: DictConfig) -> Path:
    """Render the gallery that ``cfg`` describes; return the path of its ``index.html``."""
    t = open_run(cfg)
    run_dir, device, clf_art, train_cfg = t.dir, t.device, t.artifact, t.config
    classes, target, model = t.classes, t.target, t.model
    resolution, channels = int(train_cfg.data.resolution), int(train_cfg.data.channels)

    notes: list[str] = []
    methods, engine = build_methods(cfg, run_dir, model, notes)
    if "dominant_class" in methods:
        from cfexplain.explain.dominant import class_colours

        swatches = [
            f"{c} #{r:02x}{g:02x}{b:02x}"
            for c, (r, g, b) in zip(classes, class_colours(len(classes)))
        ]
        notes.append(
            "dominant_class colours (brightness: the winning class's level): " + ", ".join(swatches)
        )
    for n in notes:
        log.info(f"[explain] {n}")

    out = Path(cfg.out) if cfg.out else run_dir / "explain" / time.strftime("%Y%m%d-%H%M%S")
    out = out.expanduser().resolve()
    skipped: list[tuple[str, str]] = []
    batches, described, count = _batches(
        cfg, train_cfg.data, classes, resolution, channels, skipped
    )
    run = command_run("explain", out, cfg, run_dir.name)
    target_name = classes[target]
    header: dict[str, Any] = {
        "run": str(run_dir),
        "classifier": clf_art.info.get("model", ""),
        "classifier test AUC": clf_art.metrics.get("test/auc", math.nan),
        "images": described,
        "target": target_name,
        "methods": ", ".join(["counterfactual"] * (engine is not None) + list(methods)),
    }
    evaluation = run_dir / "evaluation" / "index.html"
    links = (
        {"evaluation of this run": os.path.relpath(evaluation, out)} if evaluation.is_file() else {}
    )
    writer = GalleryWriter(out, target_name, size=int(cfg.image_px), links=links)
    reports = {int(i) for i in (cfg.get("reports") or [])}
    totals: dict[str, list[float]] = {}
    start = time.time()
    try:
        bar = tqdm(total=count, desc="explain", unit="img")
        for x, names, labels in batches:
            rows = _explain_batch(cfg, model, methods, engine, x.to(device), names, labels, classes)
            wanted = [i for i in range(len(rows)) if writer.count + i in reports]
            if wanted:
                _write_reports(
                    cfg, run_dir, model, methods, rows, x.to(device), wanted, out, classes
                )
            for r in rows:
                for k, v in r.metrics.items():
                    totals.setdefault(k, []).append(float(v))
            header.update(_means(totals))
            writer.add_batch(rows, header, notes + _skip_notes(skipped))
            bar.update(len(rows))
        bar.close()
        if writer.count == 0:
            raise ConfigError(f"no image could be explained ({described}; {len(skipped)} skipped)")
        seconds = time.time() - start
        summary = {
            "run": str(run_dir),
            "out": str(out),
            "classifier": clf_art.info.get("model", ""),
            "classes": classes,
            "target": target_name,
            "methods": list(methods),
            "counterfactual": engine is not None,
            "notes": notes,
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
            "metrics": _means(totals),
            "seconds": round(seconds, 2),
            "images_per_second": writer.count / max(seconds, 1e-9),
            "wandb_dir": str(run.wandb_dir) if run.wandb_dir else None,
        }
        index = writer.close(header, summary, notes + _skip_notes(skipped))
        run.log_table("explain/gallery", *writer.table())
        run.summary({f"explain/{k}": v for k, v in _means(totals).items()})
        run.log_artifact(out, name=f"{run_dir.name}-explain", type="gallery")
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    log.info(f"[explain] {writer.count} images, {len(skipped)} skipped, {seconds:.1f} s → {index}")
    return index


def _means(totals: dict[str, list[float]]) -> dict[str, float]:
    """Mean of every per-image metric over the images so far (NaN entries left out)."""
    out = {}
    for k, vals in totals.items():
        finite = [v for v in vals if not math.isnan(v)]
        # the mean of the 0/1 "flipped" column is the flip rate
        name = "flip_rate" if k == "flipped" else f"mean_{k}"
        out[name] = sum(finite) / len(finite) if finite else math.nan
    return out


def _skip_notes(skipped: list[tuple[str, str]]) -> list[str]:
    return [f"Skipped {Path(p).name}: {r}" for p, r in skipped]


def _explain_batch(
    cfg: DictConfig,
    model: torch.nn.Module,
    methods: dict[str, Method],
    engine: Any,
    x: torch.Tensor,
    names: list[str],
    labels: list[str | None],
    classes: list[str],
) -> list[Row]:
    """Probabilities, counterfactuals, maps and per-image metrics of one batch ``x [B, C, H, W]``."""
    target = int(cfg.target)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1).cpu()
    metrics: dict[str, torch.Tensor] = {}
    cf = diff = flip = None
    if engine is not None:
        from cfexplain.explain.metrics import monotonicity, proximity

        lambdas = cfg.lambdas if isinstance(cfg.lambdas, str) else list(cfg.lambdas)
        cf = engine(x, target=target, lambdas=lambdas, refine_steps=int(cfg.refine_steps))
        flip = cf.flip_index().cpu()
        diff = counterfactual_difference(cf).cpu()
        metrics["flipped"] = (flip >= 0).float()
        metrics["flip_lambda"] = torch.where(
            flip >= 0,
            cf.lambdas.cpu().gather(1, flip.clamp_min(0)[:, None])[:, 0],
            torch.full((len(x),), math.nan),
        )
        metrics["monotonicity"] = monotonicity(cf).cpu()
        metrics["recon_error"] = cf.recon_error.float().cpu()
        for k, v in proximity(cf, engine.perceptual).items():
            metrics[f"proximity_{k}"] = v
    maps = {name: m.attribute(x, target).float().cpu() for name, m in methods.items()}
    drawn: dict[str, list] = {}
    if "dominant_class" in methods:
        from cfexplain.explain.dominant import draw_dominant

        dominant = methods["dominant_class"].classes(x).cpu()  # cached: no second pass
        level = maps["dominant_class"]
        drawn["dominant_class"] = [
            draw_dominant(dominant[i], level[i], classes)[0] for i in range(len(x))
        ]
    rows = []
    for i in range(len(x)):
        row = Row(
            name=names[i],
            image=x[i].cpu(),
            prob=float(probs[i, target]),
            pred=classes[int(probs[i].argmax())],
            true=labels[i],
            maps={name: (a[i], methods[name].signed) for name, a in maps.items()},
            metrics={k: float(v[i]) for k, v in metrics.items()},
            drawn={name: pics[i] for name, pics in drawn.items()},
        )
        if cf is not None:
            row.reconstruction = cf.reconstruction[i].cpu()
            row.frames = cf.images[i].cpu()
            row.lambdas = [float(v) for v in cf.lambdas[i]]
            row.frame_probs = [float(v) for v in cf.probs[i]]
            row.flip = int(flip[i])
            if cf.recon_probs is not None:
                row.recon_prob = float(cf.recon_probs[i])
            row.difference = diff[i]
        rows.append(row)
    return rows


def _write_reports(
    cfg: DictConfig,
    run_dir: Path,
    model: torch.nn.Module,
    methods: dict[str, Method],
    rows: list[Row],
    x: torch.Tensor,
    wanted: list[int],
    out: Path,
    classes: list[str],
) -> None:
    """Per-image reports (``reports=[i, ...]``) for a non-technical reader: one HTML (and PDF)
    per image under ``out/reports/``, with guided grad-CAM for the predicted class."""
    from cfexplain.explain.report import write_report

    guided = get_method("guided_gradcam")(model)
    provenance: dict[str, Any] = {"run": str(run_dir)}
    for stage in ("classifier", *COUNTERFACTUAL_STAGES, "normative"):
        if _has(run_dir, stage):
            art = Artifact.load(run_dir / stage)
            provenance[f"{stage} stage"] = f"fingerprint {art.fingerprint}, written {art.created}"
    provenance["explain config"] = f"target={cfg.target} lambdas={cfg.lambdas} seed={cfg.seed}"
    for i in wanted:
        row = rows[i]
        pred = classes.index(row.pred)
        with torch.no_grad():
            p_pred = float(torch.softmax(model(x[i : i + 1]).float(), 1)[0, pred])
        normative = methods.get("normative")
        path = write_report(
            out / "reports" / f"{writer_safe(row.name)}.html",
            name=row.name,
            image=row.image,
            prediction=pred,
            probability=p_pred,
            class_names=classes,
            guided_gradcam=guided.attribute(x[i : i + 1], pred)[0].cpu(),
            counterfactual_frames=row.frames,
            frame_probs=row.frame_probs,
            frame_target=int(cfg.target) if row.frames is not None else None,
            normative_residual=normative.attribute(x[i : i + 1], 0)[0].cpu() if normative else None,
            provenance=provenance,
        )
        log.info(f"[explain] report: {path}")


def writer_safe(name: str) -> str:
    """A file name for a display name (``test #3`` -> ``test_3``; user file names keep their stem)."""
    stem = Path(name).stem if "." in name else name
    safe = re.sub(r"[^A-Za-z0-9-]+", "_", stem).strip("_")
    return safe or "image"


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run_command("explain", explain, cfg, "gallery")


if __name__ == "__main__":
    main()
