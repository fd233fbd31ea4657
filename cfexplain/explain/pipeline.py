"""From a trained run to explained images: the methods of a config, the images, one batch's
rows (probabilities, counterfactual sequence, maps, metrics), the gallery and the reports.

``python -m cfexplain.explain`` and ``python -m cfexplain.evaluate`` are thin entry points over
this module.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cfexplain.explain.attribution import (
    Attributes,
    Counterfactual,
    Method,
    MethodUnavailable,
    Report,
    counterfactual_difference,
    get_method,
)
from cfexplain.explain.gallery import UNCHECKED, AttributeStrip, Concepts, GalleryWriter, Row
from cfexplain.nn.capsules import CapsuleClassifier, capsule_net
from cfexplain.runs import TrainedRun
from cfexplain.utils.cli import ConfigError, image_limit

log = logging.getLogger("cfexplain")

# What the reports' provenance lists, in this order.
REPORT_STAGES = ("classifier", "generator", "encoder", "direction", "normative")

# (images, names, true labels, ground-truth concepts: meta["concepts"] or None per image)
Batches = Iterator[tuple[torch.Tensor, list[str], list[str | None], list[dict | None]]]


# ----------------------------------------------------------------------------- methods


def method_params(cfg: DictConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{method: (config field, keyword arguments)}``: ``params.<method>``, and for the
    counterfactual the engine's ``counterfactual`` block with ``lambdas`` and ``refine_steps``;
    the attribute strips start from the same refined latents."""
    params: dict[str, Any] = OmegaConf.to_container(cfg.params, resolve=True) or {}  # type: ignore[assignment]
    out = {str(name): (f"params.{name!s}", kwargs or {}) for name, kwargs in params.items()}
    engine = OmegaConf.to_container(cfg.counterfactual, resolve=True) or {}
    engine |= {"lambdas": cfg.lambdas, "refine_steps": cfg.refine_steps}
    out[Counterfactual.name] = ("counterfactual", engine)
    field, kwargs = out.get(Attributes.name, (f"params.{Attributes.name}", {}))
    out[Attributes.name] = (field, kwargs | {"refine_steps": cfg.refine_steps})
    return out


def build_methods(cfg: DictConfig, run: TrainedRun, notes: list[str]) -> dict[str, Method]:
    """The attribution objects of ``cfg.methods``, each built from the run by its registry
    entry; a method the run cannot give leaves a note in ``notes`` instead."""
    names = [str(n) for n in cfg.methods]
    for name in names:
        try:
            get_method(name)  # unknown names fail before anything is loaded
        except ValueError as e:
            raise ConfigError(f"methods: {e}") from e
    params = method_params(cfg)
    methods: dict[str, Method] = {}
    for name in names:
        field, kwargs = params.get(name, (f"params.{name}", {}))
        try:
            methods[name] = get_method(name).from_run(run, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{field}: {e}") from e
        except MethodUnavailable as e:
            notes.append(str(e))
        except ConfigError:
            raise
        except ValueError as e:
            # e.g. grad-CAM on a user's model without `cam_layer`: the other maps still run.
            notes.append(f"No {name} map: {e}")
    return methods


def split_counterfactual(
    methods: dict[str, Method],
) -> tuple[Counterfactual | None, dict[str, Method]]:
    """The counterfactual (whose whole sequences are shown and scored, not only its map) and
    the other methods, in their order."""
    cf = methods.get(Counterfactual.name)
    rest = {k: m for k, m in methods.items() if k != Counterfactual.name}
    return (cf if isinstance(cf, Counterfactual) else None), rest


def method_notes(methods: dict[str, Method], classes: list[str]) -> list[str]:
    """What the page says about the methods beyond their maps (the dominant-class colours)."""
    if "dominant_class" not in methods:
        return []
    from cfexplain.explain.dominant import class_colours

    swatches = [
        f"{c} #{r:02x}{g:02x}{b:02x}" for c, (r, g, b) in zip(classes, class_colours(len(classes)))
    ]
    return [
        "dominant_class colours (brightness: the winning class's level): " + ", ".join(swatches)
    ]


# ----------------------------------------------------------------------------- images


def image_batches(
    cfg: DictConfig, run: TrainedRun, skipped: list[tuple[str, str]]
) -> tuple[Batches, str, int | None]:
    """``(iterator of (images [B, C, R, R], names, true labels, concepts), description,
    count)``: the user's ``images=`` (unreadable files go to ``skipped``), else the run's
    ``split``."""
    limit = image_limit(cfg.limit)
    if cfg.images:
        return _user_batches(cfg, run, skipped, limit)
    ds = run.dataset(str(cfg.split))
    n = len(ds) if limit is None else min(limit, len(ds))
    names = list(getattr(ds, "class_names", run.classes))
    size = int(cfg.batch_size)

    def split() -> Batches:
        for start in range(0, n, size):
            samples = [ds[i] for i in range(start, min(n, start + size))]
            x = torch.stack([s["image"] for s in samples])
            labels = [names[int(s["label"])] for s in samples]
            concepts = [s["meta"].get("concepts") for s in samples]
            yield x, [f"{cfg.split} #{start + i}" for i in range(len(samples))], labels, concepts

    return split(), f"{n} images of {getattr(ds, 'source', cfg.split)}", n


def _user_batches(
    cfg: DictConfig, run: TrainedRun, skipped: list[tuple[str, str]], limit: int | None
) -> tuple[Batches, str, int | None]:
    """The user's files, streamed: found, decoded and explained batch by batch (a folder of a
    million files is never listed first), so their count is not known in advance."""
    from cfexplain.explain.inputs import iter_images, iter_user_images

    data = run.config.data
    items = itertools.islice(iter_images(str(cfg.images), run.classes), limit)
    source = iter_user_images(
        items, resolution=int(data.resolution), channels=int(data.channels), skipped=skipped
    )
    size = int(cfg.batch_size)

    def user() -> Batches:
        chunk = []
        for item in source:
            log.info(f"[explain] {item.note}")
            chunk.append(item)
            if len(chunk) == size:
                yield _stack(chunk)
                chunk = []
        if chunk:
            yield _stack(chunk)

    return user(), f"files from images={cfg.images}", None


def _stack(items: list) -> tuple[torch.Tensor, list[str], list[str | None], list[dict | None]]:
    return (
        torch.stack([it.image for it in items]),
        [str(it.path.name) for it in items],
        [it.label for it in items],
        [None] * len(items),
    )


# ----------------------------------------------------------------------------- one batch


def counterfactual_metrics(cf: Any, engine: Any) -> dict[str, torch.Tensor]:
    """Per-image ``[N]`` metrics of counterfactual sequences: flipped, λ of the flip,
    monotonicity, reconstruction error, proximity of the flipping frame; for an ordinal walk
    also the expected grade's monotonicity and the grades at its ends."""
    from cfexplain.explain.metrics import monotonicity, ordinal_metrics, proximity

    flip = cf.flip_index().cpu()
    metrics = {
        "flipped": (flip >= 0).float(),
        "flip_lambda": torch.where(
            flip >= 0,
            cf.lambdas.cpu().gather(1, flip.clamp_min(0)[:, None])[:, 0],
            torch.full((len(flip),), math.nan),
        ),
        "monotonicity": monotonicity(cf).cpu(),
        "recon_error": cf.recon_error.float().cpu(),
    }
    for k, v in proximity(cf, engine.perceptual).items():
        metrics[f"proximity_{k}"] = v
    if cf.ordinal:
        metrics |= ordinal_metrics(cf)
    return metrics


def judge_batch(run: TrainedRun, x: torch.Tensor, mode: str) -> list[Any] | None:
    """The guard's :class:`~cfexplain.explain.guard.Verdict` per image of ``x``, or None when
    the guard is off or the run has none (the page then says the images went unchecked)."""
    if mode == "off" or run.guard is None:
        return None
    from cfexplain.explain.guard import judge

    return judge(run.guard_models(), x, run.guard)


def explain_batch(
    run: TrainedRun,
    methods: dict[str, Method],
    x: torch.Tensor,
    names: list[str],
    labels: list[str | None],
    target: int,
    guard: str = "warn",
    truths: list[dict | None] | None = None,
) -> list[Row]:
    """Probabilities, guard verdicts, counterfactuals, maps and per-image metrics of one batch
    ``x [B, C, H, W]``. With ``guard="skip"`` flagged images get no counterfactual. A capsule
    classifier's rows also get their attribute readings (:func:`capsule_concepts`), beside
    ``truths`` (the images' ground-truth concepts, where known)."""
    classes = run.classes
    with torch.no_grad():
        probs = torch.softmax(run.classifier(x).float(), dim=1).cpu()
    verdicts = judge_batch(run, x, guard)
    cf_method, maps_of = split_counterfactual(methods)
    attr_method = maps_of.pop("attributes", None)
    keep = [i for i in range(len(x)) if guard != "skip" or not (verdicts and verdicts[i].flagged)]
    at = {i: j for j, i in enumerate(keep)}  # image index -> position among the kept
    cf = flip = diff = effect = None
    metrics: dict[str, torch.Tensor] = {}
    if cf_method is not None and keep:
        cf = cf_method.sequences(x[keep], target)
        flip, diff = cf.flip_index().cpu(), counterfactual_difference(cf).cpu()
        metrics = counterfactual_metrics(cf, cf_method.engine)
        from cfexplain.explain.metrics import counterfactual_effects

        effect = counterfactual_effects(run.classifier, cf)
    strips = None
    if attr_method is not None and keep:
        # the counterfactual's latents, refined alike (method_params), are not projected twice
        w = cf.w if cf is not None else None
        strips = attr_method.strips(x[keep], target, w)  # type: ignore[attr-defined]
    maps = {name: m.attribute(x, target).float().cpu() for name, m in maps_of.items()}
    drawn = _drawn(maps_of, maps, x, classes)
    net = capsule_net(run.classifier)
    concepts = None
    if net is not None:
        frames = {i: cf.images[at[i]] for i in at} if cf is not None else {}
        concepts = capsule_concepts(net, x, truths or [None] * len(x), frames)
    writer = maps_of.get(Report.name)
    written = writer.write(x) if isinstance(writer, Report) else None  # cached: no second pass
    rows = []
    for i in range(len(x)):
        row = Row(
            name=names[i],
            image=x[i].cpu(),
            prob=float(probs[i, target]),
            pred=classes[int(probs[i].argmax())],
            true=labels[i],
            maps={name: (a[i], maps_of[name].signed) for name, a in maps.items()},
            drawn={name: pics[i] for name, pics in drawn.items()},
            guard=verdicts[i] if verdicts is not None else None,
            concepts=concepts[i] if concepts is not None else None,
            report=written[i] if written is not None else None,
        )
        if cf is not None and i in at:
            j = at[i]
            row.metrics = {k: float(v[j]) for k, v in metrics.items()}
            _add_sequence(row, cf, j, int(flip[j]), diff[j], classes)
            if effect is not None:
                row.effect, row.focused = effect.map[j], effect.focused[j]
                row.focused_score = float(effect.focused_scores[j])
                row.metrics["focus_sufficiency"] = float(effect.sufficiency[j])
        if strips is not None and i in at:
            row.attributes = attribute_rows(strips, at[i], classes)
        rows.append(row)
    return rows


def capsule_concepts(
    net: CapsuleClassifier,
    x: torch.Tensor,
    truths: list[dict | None],
    frames: dict[int, torch.Tensor],
) -> list[Concepts]:
    """Per image of ``x [B, C, H, W]``: the capsules' readings, the ground truth of their
    attributes (where ``truths[i]`` holds them all), each capsule's reconstruction and the
    readings of the counterfactual frames ``frames[i] [K, C, H, W]`` (where the image has them)."""
    with torch.no_grad():
        values = net.attribute_values(x).float().cpu()
        images = net.attribute_reconstructions(x).float().cpu()
        read = {i: net.attribute_values(f.to(x.device)).float().cpu() for i, f in frames.items()}
    out = []
    for i in range(len(x)):
        t = truths[i]
        known = t is not None and all(n in t for n in net.attributes)
        out.append(
            Concepts(
                names=list(net.attributes),
                values=values[i].tolist(),
                truth=[float(t[n]) for n in net.attributes] if known and t else None,
                images=images[i],
                frames=read[i].tolist() if i in read else None,
            )
        )
    return out


def attribute_rows(strips: Any, i: int, classes: list[str]) -> list[AttributeStrip]:
    """Image ``i``'s attribute walks (:class:`~cfexplain.explain.attributes.AttributeStrips`)
    as gallery strips."""
    steps = [float(v) for v in strips.steps]
    return [
        AttributeStrip(
            label=a.label(classes),
            frames=strips.frames[i, t].cpu(),
            steps=steps,
            probs=[float(p) for p in strips.probs[i, t]],
        )
        for t, a in enumerate(strips.attributes[i])
    ]


def _drawn(
    maps_of: dict[str, Method], maps: dict[str, torch.Tensor], x: torch.Tensor, classes: list[str]
) -> dict[str, list]:
    """Maps that draw themselves (the dominant-class map's colours), per image."""
    if "dominant_class" not in maps_of:
        return {}
    from cfexplain.explain.dominant import draw_dominant

    dominant = maps_of["dominant_class"].classes(x).cpu()  # cached: no second pass
    level = maps["dominant_class"]
    return {
        "dominant_class": [draw_dominant(dominant[i], level[i], classes)[0] for i in range(len(x))]
    }


def _add_sequence(
    row: Row, cf: Any, i: int, flip: int, difference: torch.Tensor, classes: list[str]
) -> None:
    """Image ``i``'s counterfactual sequence, flip index and difference map on its row (and
    for an ordinal walk every frame's expected and most probable grade)."""
    row.reconstruction = cf.reconstruction[i].cpu()
    row.frames = cf.images[i].cpu()
    row.lambdas = [float(v) for v in cf.lambdas[i]]
    row.frame_probs = [float(v) for v in cf.probs[i]]
    row.flip = flip
    if cf.recon_probs is not None:
        row.recon_prob = float(cf.recon_probs[i])
    row.difference = difference
    if cf.ordinal:
        from cfexplain.explain.counterfactual import expected_grade

        row.frame_grades = [float(g) for g in cf.grades()[i]]
        row.frame_argmax = [int(k) for k in cf.argmax_grades()[i]]
        row.grade_names = list(classes)
        row.recon_grade = float(expected_grade(cf.recon_class_probs[i]))


# ----------------------------------------------------------------------------- the gallery


def means(totals: dict[str, list[float]]) -> dict[str, float]:
    """Mean of every per-image metric over the images so far (NaN entries left out)."""
    out = {}
    for k, vals in totals.items():
        finite = [v for v in vals if not math.isnan(v)]
        # the mean of the 0/1 "flipped" column is the flip rate
        name = "flip_rate" if k == "flipped" else f"mean_{k}"
        out[name] = sum(finite) / len(finite) if finite else math.nan
    return out


def skip_notes(skipped: list[tuple[str, str]]) -> list[str]:
    return [f"Skipped {Path(p).name}: {r}" for p, r in skipped]


def gallery_header(run: TrainedRun, described: str, target: int, methods: dict) -> dict[str, Any]:
    """The facts at the top of a gallery (the metric means join them batch by batch)."""
    art = run.artifact("classifier")
    return {
        "run": str(run.dir),
        "classifier": art.info.get("model", ""),
        "classifier test AUC": art.metrics.get("test/auc", math.nan),
        "images": described,
        "target": run.classes[target],
        "methods": ", ".join(
            [Counterfactual.name] * (Counterfactual.name in methods)
            + [k for k in methods if k != Counterfactual.name]
        ),
    }


def guard_mode(cfg: DictConfig, run: TrainedRun) -> tuple[str, str | None]:
    """``cfg.guard`` checked, and what the page says when the images go unchecked (guard off,
    or a run without a guard stage)."""
    from cfexplain.explain.guard import MODES

    mode = str(cfg.guard)
    if mode not in MODES:
        raise ConfigError(f"guard={mode}: choose one of {', '.join(MODES)}")
    if mode == "off":
        return mode, "guard=off: no image was checked against the training data"
    if run.guard is None:
        return mode, (
            f"images NOT checked against the training data: {run.dir} has no guard stage "
            "(python -m cfexplain.train ... stages=[guard] calibrates it)"
        )
    return mode, None


def guard_notes(cfg: DictConfig, run: TrainedRun) -> list[str]:
    """The guard's run-level warning (a generator that misses evidence the classifier uses), for
    the page's notes; none with the guard off or absent."""
    if str(cfg.guard) == "off":
        return []
    from cfexplain.explain.guard import evidence_note

    note = evidence_note(run.guard)
    return [note] if note else []


class Tally:
    """Per-image metrics summed apart for in-distribution (or unchecked) and flagged images:
    flip rate and monotonicity describe only images the models can represent."""

    def __init__(self) -> None:
        self.kept: dict[str, list[float]] = {}
        self.flagged: dict[str, list[float]] = {}
        self.statuses: dict[str, int] = {}

    def add(self, row: Row) -> None:
        self.statuses[row.status] = self.statuses.get(row.status, 0) + 1
        into = self.flagged if row.guard is not None and row.guard.flagged else self.kept
        for k, v in row.metrics.items():
            into.setdefault(k, []).append(float(v))

    @property
    def n_flagged(self) -> int:
        from cfexplain.explain.guard import IN_DISTRIBUTION

        return sum(n for s, n in self.statuses.items() if s not in (IN_DISTRIBUTION, UNCHECKED))

    def header(self, unchecked: str | None = None) -> dict[str, Any]:
        """The gallery header's numbers: the means over the images kept, the guard's counts (or
        why the images went ``unchecked``) and the flagged images' means apart."""
        total = sum(self.statuses.values())
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        line = f"{self.n_flagged} of {total} images flagged ({counts})"
        out: dict[str, Any] = {"guard": f"{unchecked}" if unchecked else line}
        out |= means(self.kept)
        out |= {f"flagged: {k}": v for k, v in means(self.flagged).items()}
        return out


def write_gallery(
    cfg: DictConfig,
    run: TrainedRun,
    methods: dict[str, Method],
    out: Path,
    notes: list[str],
    facts: dict[str, Any],
) -> tuple[GalleryWriter, dict[str, Any]]:
    """Explain every image of ``cfg`` batch by batch into a gallery in ``out``; return the
    writer (closed) and the summary (ending in ``facts``)."""
    target = int(cfg.target)
    mode, unchecked = guard_mode(cfg, run)
    skipped: list[tuple[str, str]] = []
    batches, described, count = image_batches(cfg, run, skipped)
    header = gallery_header(run, described, target, methods)
    evaluation = run.output_dir("evaluation") / "index.html"
    links = (
        {"evaluation of this run": os.path.relpath(evaluation, out)} if evaluation.is_file() else {}
    )
    writer = GalleryWriter(out, run.classes[target], size=int(cfg.image_px), links=links)
    reports = {int(i) for i in cfg.reports}
    tally = Tally()
    start = time.time()
    bar = tqdm(total=count, desc="explain", unit="img")
    for x, names, labels, truths in batches:
        x = x.to(run.device)
        rows = explain_batch(run, methods, x, names, labels, target, mode, truths)
        wanted = [i for i in range(len(rows)) if writer.count + i in reports]
        if wanted:
            write_reports(cfg, run, methods, rows, x, wanted, out)
        for r in rows:
            tally.add(r)
        header.update(tally.header(unchecked))
        writer.add_batch(rows, header, notes + skip_notes(skipped))
        bar.update(len(rows))
    bar.close()
    if writer.count == 0:
        why = "".join(f"; {p}: {r}" for p, r in skipped[:10])
        more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise ConfigError(
            f"no image could be explained ({described}; {len(skipped)} skipped{why}{more})"
        )
    seconds = time.time() - start
    summary = {
        "run": str(run.dir),
        "out": str(out),
        "classifier": run.artifact("classifier").info.get("model", ""),
        "classes": run.classes,
        "target": run.classes[target],
        "methods": [k for k in methods if k != Counterfactual.name],
        "counterfactual": Counterfactual.name in methods,
        "notes": notes,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "metrics": means(tally.kept),
        "guard": {
            "mode": mode,
            "unchecked": unchecked,
            "statuses": tally.statuses,
            "flagged": tally.n_flagged,
            "flagged_metrics": means(tally.flagged),
        },
        "seconds": round(seconds, 2),
        "images_per_second": writer.count / max(seconds, 1e-9),
        **facts,
    }
    writer.close(header, summary, notes + skip_notes(skipped))
    return writer, summary


# ----------------------------------------------------------------------------- reports


def write_reports(
    cfg: DictConfig,
    run: TrainedRun,
    methods: dict[str, Method],
    rows: list[Row],
    x: torch.Tensor,
    wanted: list[int],
    out: Path,
) -> None:
    """Per-image reports (``reports=[i, ...]``) for a non-technical reader: one HTML (and PDF)
    per image under ``out/reports/``, with guided grad-CAM for the predicted class."""
    from cfexplain.explain.report import write_report

    model, classes = run.classifier, run.classes
    guided = get_method("guided_gradcam")(model)
    provenance: dict[str, Any] = {"run": str(run.dir), **run.provenance(REPORT_STAGES)}
    provenance["explain config"] = f"target={cfg.target} lambdas={cfg.lambdas} seed={cfg.seed}"
    for i in wanted:
        row = rows[i]
        pred = classes.index(row.pred)
        with torch.no_grad():
            p_pred = float(torch.softmax(model(x[i : i + 1]).float(), 1)[0, pred])
        normative = methods.get("normative")
        path = write_report(
            report_path(out / "reports", row.name),
            name=row.name,
            image=row.image,
            prediction=pred,
            probability=p_pred,
            class_names=classes,
            guided_gradcam=guided.attribute(x[i : i + 1], pred)[0].cpu(),
            counterfactual_frames=row.frames,
            frame_probs=row.frame_probs,
            frame_grades=row.frame_grades,
            frame_argmax=row.frame_argmax,
            frame_target=int(cfg.target) if row.frames is not None or row.attributes else None,
            normative_residual=normative.attribute(x[i : i + 1], 0)[0].cpu() if normative else None,
            provenance=provenance,
            reference_prob=row.recon_prob,
            target_prob=row.prob,
            guard=row.guard,
            concepts=row.concepts,
            written_report=row.report,
            attributes=row.attributes,
        )
        log.info(f"[explain] report: {path}")


# File names stay far below the 255 bytes a file system allows, suffix and counter included.
MAX_STEM = 100


def writer_safe(name: str) -> str:
    """A file name for a display name (``test #3`` -> ``test_3``; user file names keep their
    stem), ASCII and at most ``MAX_STEM`` characters."""
    stem = Path(name).stem if "." in name else name
    safe = re.sub(r"[^A-Za-z0-9-]+", "_", stem).strip("_")[:MAX_STEM].strip("_")
    return safe or "image"


def report_path(folder: Path, name: str) -> Path:
    """``folder/<safe name>.html``, numbered (``_2``, ``_3``...) when an image of the same
    name (``scan.png`` in two folders) already has its report there."""
    stem = writer_safe(name)
    path, n = folder / f"{stem}.html", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.html"
    return path
