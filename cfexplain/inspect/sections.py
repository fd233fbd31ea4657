"""The sections of the inspect page: first-layer filters, feature maps and dead maps,
embeddings, class maximisation and the unit report, each ``section(ctx, summary) -> Section``
over one :class:`Context` (the run, its classifier, the images, where to write).

``python -m cfexplain.inspect`` is the thin entry point over this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cfexplain.inspect.page import Section, e, figure, table
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import write_bytes
from cfexplain.utils.cli import ConfigError, image_count
from cfexplain.utils.images import save_grid
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

WHAT = ("filters", "feature_maps", "embeddings", "class_max", "units")
UNITS_FILE = "units.csv"


class Context:
    """What every section reads: the run, the model, the images and where to write."""

    def __init__(self, cfg: DictConfig, trained: TrainedRun, out: Path, run: Run) -> None:
        self.cfg, self.trained, self.out, self.run = cfg, trained, out, run
        self.run_dir, self.device = trained.dir, trained.device
        self.art, self.classes = trained.artifact("classifier"), trained.classes
        self.target = int(cfg.target)
        self.model = trained.classifier
        self.ds = trained.dataset(str(cfg.split))
        n = image_count(cfg.limit, len(self.ds))
        if n < 1:
            raise ConfigError(f"limit={cfg.limit}: the {cfg.split} split has {len(self.ds)} images")
        samples = [self.ds[i] for i in range(n)]
        self.x = torch.stack([s["image"] for s in samples])  # [n, C, R, R]
        self.labels = np.array([int(s["label"]) for s in samples])
        self.batch = int(cfg.batch_size)
        with torch.no_grad():
            logits = torch.cat(
                [self.model(b.to(self.device)).float().cpu() for b in self.x.split(self.batch)]
            )
        self.preds = logits.argmax(1).numpy()
        self.px = int(cfg.image_px)

    def png(
        self, name: str, images: torch.Tensor, nrow: int | None = None, px: int | None = None
    ) -> str:
        """Save ``images [N, C, H, W]`` in [-1, 1] as one grid PNG; return its relative path."""
        side = images.shape[-1]
        scale = max(1, round((px or self.px) / side))
        save_grid(images.float().cpu().clamp(-1, 1), self.out / name, nrow=nrow, scale=scale)
        return name

    def raw_png(self, name: str, data: bytes) -> str:
        write_bytes(self.out / name, data)
        return name

    def label(self, i: int) -> str:
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)


# ----------------------------------------------------------------------------- sections


def _filters(ctx: Context, summary: dict) -> Section:
    from cfexplain.inspect.structure import filter_images, first_conv

    name, conv = first_conv(ctx.model)
    images = filter_images(conv)
    src = ctx.png("filters.png", images, px=24)
    ctx.run.log_images("inspect/filters", images)
    k = "×".join(str(s) for s in conv.kernel_size)
    caption = f"{conv.out_channels} filters of {name} ({k}, {conv.in_channels} input channel(s))"
    summary["filters"] = {"layer": name, "count": conv.out_channels}
    body = "<p>Each filter scaled by its largest |weight|: mid-gray is zero.</p>" + figure(
        src, caption, width=min(640, 40 * int(np.ceil(np.sqrt(len(images)))))
    )
    return Section("filters", "First-layer filters", body)


def _feature_maps(ctx: Context, summary: dict) -> Section:
    from cfexplain.inspect.structure import dead_maps, default_layers, feature_maps, map_images

    cfg = ctx.cfg
    layers = [str(s) for s in cfg.layers] if cfg.layers else default_layers(ctx.model)
    try:
        peaks: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple] = {}
        for b in ctx.x.split(ctx.batch):
            for name, m in feature_maps(ctx.model, b.to(ctx.device), layers).items():
                p = m.abs().amax(dim=(0, 2, 3))
                peaks[name] = torch.maximum(peaks[name], p) if name in peaks else p
                shapes[name] = tuple(m.shape[1:])
        idx = [int(i) for i in cfg.images]
        bad = [i for i in idx if not 0 <= i < len(ctx.ds)]
        if bad:
            raise ConfigError(
                f"images={idx}: {bad} outside the {cfg.split} split (0..{len(ctx.ds) - 1})"
            )
        chosen = torch.stack([ctx.ds[i]["image"] for i in idx]) if idx else ctx.x[:0]
        maps = feature_maps(ctx.model, chosen.to(ctx.device), layers) if idx else {}
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err
    rows, table_rows, dead_summary = [], [], {}
    for name in layers:
        # the same verdict as dead_maps() on the whole set, from the per-batch peaks
        dead = dead_maps(peaks[name][None, :, None, None], float(cfg.dead_eps))
        c, h, w = shapes[name]
        rows.append([name, f"{c}×{h}×{w}", dead.count, f"{100 * dead.share:.1f}%", len(ctx.x)])
        table_rows.append([name, c, dead.count, dead.share])
        dead_summary[name] = dead.share
    summary["dead_share"] = dead_summary
    ctx.run.log_table("inspect/dead_maps", ["layer", "channels", "dead", "share"], table_rows)
    ctx.run.summary({f"inspect/dead_share/{k}": v for k, v in dead_summary.items()})
    body = [
        "<p>A map is dead when it is zero (|value| ≤ dead_eps) for every image of the batch: "
        "the unit passes nothing on, a sign of a training problem.</p>",
        table(["layer", "maps C×h×w", "dead maps", "share", "images"], rows),
    ]
    max_maps = int(cfg.max_maps)
    for j, i in enumerate(idx):
        figs = [figure(ctx.png(f"maps/{i}_input.png", chosen[j : j + 1]), f"{cfg.split} #{i}")]
        for k, name in enumerate(layers):
            m = maps[name][j]
            src = ctx.png(f"maps/{i}_layer{k}.png", map_images(m, max_maps), px=24)
            shown = min(max_maps, len(m))
            figs.append(figure(src, f"{name}: {shown} of {len(m)} maps"))
        body.append(
            f"<h3>{e(cfg.split)} #{i} · label {e(ctx.label(int(ctx.ds[i]['label'])))}</h3>"
            + "".join(figs)
        )
    return Section("feature_maps", "Feature maps and dead maps", "".join(body))


def _embeddings(ctx: Context, summary: dict) -> Section:
    from cfexplain.inspect import embeddings as emb

    cfg = ctx.cfg.embeddings
    notes = []
    sets: dict[str, torch.Tensor] = {
        "classifier features": emb.classifier_features(ctx.model, ctx.x)
    }
    if ctx.trained.has("encoder"):
        sets["encoder latents E(x)"] = emb.encoder_latents(ctx.trained.encoder, ctx.x, ctx.batch)
    else:
        notes.append(f"No W-latent embedding: {ctx.run_dir} has no encoder stage.")
    if bool(cfg.pixels):
        sets["raw pixels (baseline)"] = ctx.x.flatten(1).double()
    projections = [str(p) for p in cfg.projections]
    unknown = [p for p in projections if p not in emb.PROJECTIONS]
    if unknown:
        raise ConfigError(
            f"embeddings.projections: {unknown} unknown; choose from {emb.PROJECTIONS}"
        )
    if "umap" in projections and not emb.umap_available():
        projections.remove("umap")
        notes.append("No UMAP: the umap-learn package is not installed (pip install umap-learn).")
    if len(ctx.x) < 3:
        raise ConfigError(f"limit={ctx.cfg.limit}: embeddings need at least 3 images")
    k = int(cfg.k)
    rows, figs, metrics = [], [], {}
    for s_i, (set_name, feats) in enumerate(sets.items()):
        for proj in projections:
            try:
                pts = emb.project(feats, proj, seed=int(ctx.cfg.seed))
            except ValueError as err:
                notes.append(f"No {proj} of the {set_name}: {err}")
                continue
            acc = emb.knn_accuracy(pts, ctx.labels, k)
            sil = emb.silhouette(pts, ctx.labels)
            rows.append([set_name, proj, acc, sil])
            metrics[f"{set_name}/{proj}"] = {"knn_accuracy": acc, "silhouette": sil}
            for by, values in (("label", ctx.labels), ("prediction", ctx.preds)):
                title = f"{set_name} · {proj} · by {by}"
                data = emb.scatter_png(pts, values, ctx.classes, title)
                src = ctx.raw_png(f"embeddings/{s_i}_{proj}_{by}.png", data)
                figs.append(figure(src, title))
    summary["embeddings"] = metrics
    ctx.run.log_table(
        "inspect/embeddings", ["features", "projection", "knn_accuracy", "silhouette"], rows
    )
    body = [
        f"<p>{len(ctx.x)} images of the {e(ctx.cfg.split)} split. Separation of the true labels in "
        f"2-d: leave-one-out {k}-NN accuracy and silhouette (higher is better).</p>",
        table(["features", "projection", f"{k}-NN accuracy", "silhouette"], rows),
        "<div>" + "".join(figs) + "</div>",
    ]
    # outliers in the full feature space of the first set (and of E(x) when there is one)
    for s_i, (set_name, feats) in enumerate(sets.items()):
        if set_name.startswith("raw pixels"):
            continue
        scores = emb.knn_scores(feats, k)
        top = np.argsort(-scores)[: int(cfg.outliers)]
        orows = []
        for r, i in enumerate(top.tolist()):
            src = ctx.png(f"embeddings/outlier_{s_i}_{r}.png", ctx.x[i : i + 1], px=64)
            orows.append(
                [
                    r + 1,
                    f"{ctx.cfg.split} #{i}",
                    ctx.label(int(ctx.labels[i])),
                    ctx.label(int(ctx.preds[i])),
                    float(scores[i]),
                    f'<img src="{e(src)}" alt="{e(ctx.cfg.split)} #{i}">',
                ]
            )
        body.append(
            f"<h3>Outliers of the {e(set_name)}: largest mean distance to {k} neighbours</h3>"
        )
        body.append(
            table(["rank", "image", "label", "prediction", "k-NN distance", ""], orows, raw=[5])
        )
    return Section("embeddings", "Embeddings", "".join(body), notes)


def _class_max(ctx: Context, summary: dict) -> Section:
    from cfexplain.inspect.class_max import maximise_input, maximise_latent, w_average

    cfg = ctx.cfg.class_max
    n = int(cfg.starts)
    C, R = ctx.x.shape[1], ctx.x.shape[-1]
    notes = []
    res = maximise_input(
        ctx.model,
        ctx.target,
        (n, C, R, R),
        steps=int(cfg.steps),
        lr=float(cfg.lr),
        l2=float(cfg.l2),
        seed=int(ctx.cfg.seed),
        jitter=int(cfg.jitter),
        blur_every=int(cfg.blur_every),
        blur_sigma=float(cfg.blur_sigma),
    )
    results = {"input space": res}
    if ctx.trained.has("generator"):
        G = ctx.trained.generator
        start = str(cfg.latent_start)
        if start == "encoder" and ctx.trained.has("encoder"):
            with torch.no_grad():
                w0 = ctx.trained.encoder(ctx.x[:n].to(ctx.device))
        elif start in ("w_avg", "encoder"):
            if start == "encoder":
                notes.append(
                    "class_max.latent_start=encoder but the run has no encoder: from w_avg."
                )
            w0 = w_average(G, n)
        else:
            raise ConfigError(f"class_max.latent_start={start!r}: expected w_avg or encoder")
        results[f"through G (ascent in W from {start})"] = maximise_latent(
            G,
            ctx.model,
            ctx.target,
            w0.to(ctx.device),
            steps=int(cfg.steps),
            lr=float(cfg.latent_lr),
            l2=float(cfg.latent_l2),
        )
    else:
        notes.append(f"No generator-constrained variant: {ctx.run_dir} has no generator stage.")
    figs, rows = [], []
    for j, (name, r) in enumerate(results.items()):
        src = ctx.png(f"class_max/{j}.png", r.images, nrow=n)
        figs.append(figure(src, f"{name}: {n} starts"))
        ctx.run.log_images(f"inspect/class_max/{j}", r.images, captions=[name] * n)
        rows.append(
            [name, float(r.logits[0].mean()), float(r.logits[-1].mean()), int(len(r.logits) - 1)]
        )
    figs.append(
        figure(
            ctx.raw_png("class_max/logits.png", _trajectory_png(results, ctx.label(ctx.target))),
            "target logit per step (mean over starts)",
        )
    )
    summary["class_max"] = {r[0]: {"start_logit": r[1], "final_logit": r[2]} for r in rows}
    body = (
        f"<p>Images that maximise the logit of <b>{e(ctx.label(ctx.target))}</b> "
        "(Simonyan et al. 2014): gradient ascent on the input with an L2 penalty, clamped to "
        f"[-1, 1], with jitter ({int(cfg.jitter)} px) and a blur every "
        f"{int(cfg.blur_every)} steps as image priors (Yosinski et al. "
        "2015; 0: off); beside it, the ascent in W rendered by G, which keeps the image one the "
        "generator can draw.</p>"
        + table(["variant", "start logit", "final logit", "steps"], rows)
        + "<div>"
        + "".join(figs)
        + "</div>"
    )
    return Section("class_max", "Class maximisation", body, notes)


def _trajectory_png(results: dict, target: str) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 2.4), dpi=100)
    ax = fig.add_subplot()
    for name, r in results.items():
        ax.plot(r.logits.mean(1).numpy(), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"logit of {target}")
    ax.legend(fontsize=6)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _units(ctx: Context, summary: dict) -> Section:
    from cfexplain.inspect import units as U

    cfg = ctx.cfg.units
    notes = []
    try:
        layer = U.unit_layer(ctx.model)
        acts = U.activations(ctx.model, ctx.x, layer, ctx.batch)
        weight = U.head_weight(ctx.model, acts.shape[1])
    except ValueError as err:
        # e.g. an attention head (classifier.attention=true) is not GAP + linear: the other
        # sections still apply, so this one says why it is empty instead of failing the page
        return Section("units", "Unit report", "", [f"No unit report: {err}"])
    positive = torch.as_tensor(ctx.preds == ctx.target)
    if not bool(positive.any()):
        notes.append(
            f"No image is predicted {ctx.label(ctx.target)}: activations averaged over all images."
        )
    contrib = U.unit_contributions(acts, weight, ctx.target, positive)
    top = U.rank(contrib, int(cfg.top))
    csv_path = ctx.trained.output_dir("inspect") / UNITS_FILE
    csv_rows = U.update_units_csv(csv_path, {u: float(contrib[u]) for u in top})
    names = U.unit_names(csv_rows)
    size = int(cfg.patch_px) if cfg.patch_px else None
    rows, table_rows = [], []
    for r, u in enumerate(top):
        patches = U.top_patches(acts, ctx.x, u, int(cfg.patches), size)
        src = ctx.png(
            f"units/unit{u}.png", torch.stack([p.image for p in patches]), nrow=len(patches), px=48
        )
        name, desc = names.get(u, ("", ""))
        where = ", ".join(f"#{p.index}" for p in patches)
        rows.append(
            [
                r + 1,
                u,
                float(contrib[u]),
                name or "(unnamed)",
                desc,
                f'<img src="{e(src)}" alt="unit {u}"><br><small>{e(ctx.cfg.split)} {e(where)}</small>',
            ]
        )
        table_rows.append([u, float(contrib[u]), name, desc, ctx.out / src])
    ctx.run.log_table(
        "inspect/units", ["unit", "contribution", "name", "description", "patches"], table_rows
    )
    summary["units"] = {"layer": layer, "top": top, "csv": str(csv_path)}
    share = int(positive.sum())
    body = (
        f"<p>Units (channels) of <code>{e(layer)}</code> ranked by their contribution to "
        f"<b>{e(ctx.label(ctx.target))}</b>: head weight × mean activation over the {share} "
        f"images predicted {e(ctx.label(ctx.target))}. Name them in <code>{e(csv_path)}</code> "
        "(columns name, description); reruns keep the names and append new units.</p>"
        + table(
            ["rank", "unit", "contribution", "name", "description", "top-activating patches"],
            rows,
            raw=[5],
        )
    )
    return Section("units", "Unit report", body, notes)


SECTIONS = {
    "filters": _filters,
    "feature_maps": _feature_maps,
    "embeddings": _embeddings,
    "class_max": _class_max,
    "units": _units,
}
