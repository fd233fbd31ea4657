"""``python -m cfexplain.evaluate run=runs/<experiment>``: which explanations tell the truth.

On the phantom's test split, where every image comes with its pathology and marker masks and
its factors:

- every attribution method of ``methods`` (and the counterfactual difference map and the
  normative residual) against the pathology masks of the positive images: pointing game,
  relevance mass and rank accuracy, IoU at the mask's area; faithfulness by deletion and
  insertion AUC; the cascading model-parameter randomisation check;
- the counterfactuals factor by factor, read back by oracle CNNs: causal / nuisance change
  ratio, MNAC, flip rate, realism (classifier-feature FD of the flipping frames);
- the shortcut marker: the classifier's accuracy with the marker removed or lying, and per
  method the share of images with a marker whose explanation exposes it.

Writes ``runs/<experiment>/evaluation/`` (``out=``): ``table.csv`` and ``table.md`` (method ×
metric), ``per_image.csv``, ``summary.json``, ``index.html`` (linked from the galleries) and a
W&B table. The folder is built beside the old one and swapped in at the end: a failed
evaluation leaves the previous one as it was.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from cfexplain.evaluate import heatmaps as hm
from cfexplain.evaluate.shortcut import heatmap_exposure, marker_reliance
from cfexplain.explain.__main__ import build_methods, open_run
from cfexplain.explain.attribution import counterfactual_difference, get_method
from cfexplain.utils.cli import ConfigError, command_run, run_command

log = logging.getLogger("cfexplain")

LOCALISATION = ("pointing_game", "relevance_mass", "relevance_rank", "iou_at_area")
# Maps whose sign is not "evidence for the target": scored by magnitude.
MAGNITUDE = ("counterfactual", "normative")


def relevance(name: str, maps: Tensor, signed: bool) -> Tensor:
    """The non-negative relevance a map assigns to each pixel: the positive part (evidence for
    the target) of signed attributions, the magnitude of a counterfactual difference or residual."""
    if name in MAGNITUDE:
        return maps.abs()
    return maps.clamp_min(0) if signed else maps


# ----------------------------------------------------------------------------- data


def _samples(ds, n: int, target: int) -> dict[str, Any]:
    """Images, labels, masks and factors of the first ``n`` samples of a phantom split."""
    from cfexplain.data.masks import pathology_mask

    samples = [ds[i] for i in range(n)]
    metas = [s["meta"] for s in samples]
    if not all(m.get("masks") for m in metas):
        raise ConfigError(
            "evaluation needs ground-truth masks: train the run on a built-in phantom "
            "(+dataset=knee or +dataset=histology), not on files"
        )
    x = torch.stack([s["image"] for s in samples])
    res = x.shape[-1]
    empty = torch.zeros(res, res, dtype=torch.bool)
    marker = [m["masks"].get("marker", empty).bool() for m in metas]
    return {
        "x": x,
        "labels": torch.tensor([int(s["label"]) for s in samples]),
        "pathology": torch.stack([pathology_mask(m) for m in metas]),
        "marker": torch.stack(marker),
        "factors": [m.get("factors", {}) for m in metas],
        "knee": "osteophyte" in metas[0]["masks"],
    }


# ----------------------------------------------------------------------------- randomisation


def _counterfactual_under(engine: Any, cfg: DictConfig, target: int) -> Callable:
    """``model -> engine`` for the randomisation check: the counterfactual's maps depend on the
    classifier through α, so α is refit for each randomised classifier (labels: its probability
    above the median on a fixed set of G samples, the direction along which it rises)."""
    from cfexplain.explain.counterfactual import CounterfactualEngine
    from cfexplain.explain.directions import fit_linear_direction

    n = int(cfg.randomisation.direction_samples)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    G = engine.G
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=gen).to(engine.device)
        w = torch.cat([G.mapping(b) for b in z.split(engine.max_batch)])
        images = torch.cat([G.synthesis(b, noise_mode="const") for b in w.split(engine.max_batch)])
    w0 = w[:, 0].cpu().numpy()

    def build(model: nn.Module) -> CounterfactualEngine:
        with torch.no_grad():
            p = torch.cat(
                [torch.softmax(model(b), 1)[:, target] for b in images.split(engine.max_batch)]
            )
        y = (p > p.median()).cpu().numpy().astype(int)
        fit = fit_linear_direction(w0, y, Cs=[1.0], cv=2, max_iter=300, holdout=0.2, seed=0)
        alpha = torch.as_tensor(fit["direction"], dtype=torch.float32)
        if target == 0:
            alpha = -alpha  # a binary engine walks towards class 1 along +α
        return CounterfactualEngine(
            G,
            engine.E,
            model,
            alpha,
            lambda_range=engine.lambda_range,
            num_frames=engine.num_frames,
            target_probs=engine.target_probs,
            bisect_steps=engine.bisect_steps,
            max_batch=engine.max_batch,
            perceptual=engine.perceptual,
            device=engine.device,
        )

    return build


def _sanity(cfg, model, methods, engine, params, x, target) -> dict[str, hm.RandomisationResult]:
    """The cascading randomisation check of every method on the images ``x``."""
    lambdas = cfg.lambdas if isinstance(cfg.lambdas, str) else list(cfg.lambdas)
    results = {}
    names = (["counterfactual"] if engine is not None else []) + list(methods)
    for name in tqdm(names, desc="randomisation", unit="method"):
        signed = methods[name].signed if name in methods else True
        if name == "counterfactual":
            build = _counterfactual_under(engine, cfg, target)

            def attribute(m, build=build):
                cf = build(m)(x, target=target, lambdas=lambdas)
                return relevance("counterfactual", counterfactual_difference(cf), True)

        elif name == "normative":
            # The residual does not read the classifier at all: the check shows exactly that.
            def attribute(m, method=methods[name]):
                return relevance("normative", method.attribute(x, target), False)

        else:

            def attribute(m, name=name, signed=signed):
                method = get_method(name)(m, **(params.get(name) or {}))
                return relevance(name, method.attribute(x, target), signed)

        layers = cfg.randomisation.layers
        results[name] = hm.randomisation_check(
            model,
            attribute,
            threshold=float(cfg.randomisation.threshold),
            seed=int(cfg.seed),
            layers=list(layers) if layers else None,
        )
    return results


# ----------------------------------------------------------------------------- the command


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate the run that ``cfg`` names; return the path of the evaluation's ``index.html``."""
    from cfexplain.data import build_dataset

    if cfg.images:
        raise ConfigError(
            "images=: the evaluation needs ground truth, so it uses the run's own phantom split"
        )
    t = open_run(cfg)
    run_dir, device, clf_art, train_cfg = t.dir, t.device, t.artifact, t.config
    classes, target, model = t.classes, t.target, t.model
    ds = build_dataset(train_cfg.data, str(cfg.split))
    if hasattr(ds, "cache"):
        ds.cache = False
    n = len(ds) if cfg.limit is None else min(int(cfg.limit), len(ds))
    data = _samples(ds, n, target)

    notes: list[str] = []
    methods, engine = build_methods(cfg, run_dir, model, notes)
    params = OmegaConf.to_container(cfg.params, resolve=True) or {}
    names = (["counterfactual"] if engine is not None else []) + list(methods)
    if "normative" in methods:
        notes.append(
            "normative: the residual never reads the classifier, so the randomisation check "
            "fails it by construction; its localisation scores are those of an anomaly map."
        )
    out = Path(cfg.out) if cfg.out else run_dir / "evaluation"
    out = out.expanduser().resolve()
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = command_run("evaluate", work, cfg, run_dir.name)
    start = time.time()
    try:
        oracle = oracle_info = None
        if engine is not None and data["knee"]:
            from cfexplain.evaluate.oracles import fit_or_load

            # The oracles know the phantom, not the run: one cache beside the runs serves all.
            oracle, oracle_info = fit_or_load(
                run_dir.parent / "oracles" / f"knee_{int(train_cfg.data.resolution)}px",
                resolution=int(train_cfg.data.resolution),
                device=device,
                seed=int(cfg.seed),
                **OmegaConf.to_container(cfg.oracle, resolve=True),
            )
        elif engine is not None:
            notes.append("No factor oracles: they read the knee phantom's factors.")
        per = _per_image(cfg, model, methods, engine, oracle, data, target, device)
        sanity = _sanity(
            cfg, model, methods, engine, params,
            data["x"][: int(cfg.randomisation.images)].to(device), target,
        )  # fmt: skip
        summary = _summarise(cfg, per, sanity, names, data, target)
        if engine is not None:
            summary["counterfactual"] = _counterfactual_summary(cfg, per, model, data, device)
        if oracle_info is not None:
            summary["oracle"] = {
                k: oracle_info[k] for k in ("factors", "metrics") if k in oracle_info
            }
            from cfexplain.evaluate.factors import true_counterfactual_ratios

            # What the ratio and MNAC read on true one-factor edits: the scale for the goal.
            summary["oracle_calibration"] = {
                edit: {k: r[k] for k in ("kind", "ratio", "mnac_mean")}
                for edit, r in true_counterfactual_ratios(oracle, seed=int(cfg.seed)).items()
            }
        if data["knee"]:
            summary["marker_reliance"] = marker_reliance(model, ds, list(range(n)))
        summary |= {
            "run": str(run_dir),
            "classifier": clf_art.info.get("model", ""),
            "classifier_test_auc": clf_art.metrics.get("test/auc", math.nan),
            "shortcut_rate": float(train_cfg.data.get("shortcut_rate", 0.0) or 0.0),
            "images": n,
            "positives_with_mask": int(per["localised"].sum()),
            "target": classes[target],
            "notes": notes,
            "seconds": round(time.time() - start, 1),
            "wandb_dir": str(run.wandb_dir) if run.wandb_dir else None,
        }
        from cfexplain.evaluate.report import write_report

        write_report(work, summary, per, sanity, gallery=_latest_gallery(run_dir, out))
        columns, rows = _table(summary)
        run.log_table("evaluation/table", columns, rows)
        run.summary(_flat(summary["table"]))
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    _swap(work, out)
    log.info(f"[evaluate] {n} images, {len(names)} methods, {time.time() - start:.0f} s → {out}")
    _print_table(summary)
    return out / "index.html"


def _per_image(cfg, model, methods, engine, oracle, data, target, device) -> dict[str, Any]:
    """Per-image scores of every method, and the counterfactuals' factor changes."""
    from cfexplain.evaluate.factors import counterfactual_factors

    x_all, labels = data["x"], data["labels"]
    n, size = len(x_all), int(cfg.batch_size)
    lambdas = cfg.lambdas if isinstance(cfg.lambdas, str) else list(cfg.lambdas)
    scores: dict[str, dict[str, list[Tensor]]] = {}
    cf_parts: dict[str, list] = {}
    bar = tqdm(total=n, desc="evaluate", unit="img")
    for start in range(0, n, size):
        sl = slice(start, min(n, start + size))
        x = x_all[sl].to(device)
        maps = {}
        if engine is not None:
            cf = engine(x, target=target, lambdas=lambdas, refine_steps=int(cfg.refine_steps))
            maps["counterfactual"] = relevance(
                "counterfactual", counterfactual_difference(cf), True
            )
            if oracle is not None:
                part = counterfactual_factors(oracle, cf, threshold=float(cfg.mnac_threshold))
                for k in ("changes", "flipped", "mnac", "marker_changed", "before", "after"):
                    if k in part:
                        cf_parts.setdefault(k, []).append(part[k].cpu())
                cf_parts.setdefault("factor_names", [part["factors"]])
            idx, flipped = cf.flip_frame()
            cf_parts.setdefault("frames", []).append(cf.images[torch.arange(len(x)), idx].cpu())
            cf_parts.setdefault("recon", []).append(cf.reconstruction.cpu())
            cf_parts.setdefault("flip", []).append(flipped.cpu())
        for name, m in methods.items():
            maps[name] = relevance(name, m.attribute(x, target).float(), m.signed)
        for name, a in maps.items():
            a = a.float().cpu()
            s = hm.localisation(a, data["pathology"][sl], tolerance=int(cfg.pointing_tolerance))
            s |= hm.deletion_insertion(
                model, x, a.to(device), target,
                steps=int(cfg.deletion.steps), baseline=float(cfg.deletion.baseline),
                batch_size=int(cfg.deletion.batch_size), seed=int(cfg.seed),
            )  # fmt: skip
            s["marker_exposure"] = heatmap_exposure(a, data["marker"][sl])
            for k, v in s.items():
                scores.setdefault(name, {}).setdefault(k, []).append(v.float().cpu())
        bar.update(sl.stop - sl.start)
    bar.close()
    per = {name: {k: torch.cat(v) for k, v in d.items()} for name, d in scores.items()}
    cf = {k: (v[0] if k == "factor_names" else torch.cat(v)) for k, v in cf_parts.items()}
    # Localisation is asked of the images that show the target's pathology.
    localised = (labels == target) & data["pathology"].flatten(1).any(1)
    return {"maps": per, "cf": cf, "localised": localised}


def _nanmean(v: Tensor) -> float:
    v = v[~v.isnan()]
    return float(v.mean()) if len(v) else math.nan


def _summarise(cfg, per, sanity, names, data, target) -> dict[str, Any]:
    """The method × metric table."""
    table: dict[str, dict[str, Any]] = {}
    keep = per["localised"]
    has_marker = data["marker"].flatten(1).any(1)
    for name in names:
        s = per["maps"][name]
        row = {k: _nanmean(s[k][keep]) for k in LOCALISATION}
        row["deletion_auc"] = _nanmean(s["deletion"])
        row["insertion_auc"] = _nanmean(s["insertion"])
        row["randomisation_cascade"] = sanity[name].cascade
        row["randomisation_final"] = sanity[name].final
        row["sanity"] = "pass" if sanity[name].passed else "FAIL"
        row["marker_exposure"] = _nanmean(s["marker_exposure"][has_marker])
        table[name] = row
    if "counterfactual" in table and "marker_changed" in per["cf"]:
        # A counterfactual exposes the marker when the marker appears or vanishes along it.
        changed = per["cf"]["marker_changed"].float()
        table["counterfactual"]["marker_exposure"] = _nanmean(changed[has_marker])
    return {"table": table, "sanity": {k: v.to_dict() for k, v in sanity.items()}}


def _counterfactual_summary(cfg, per, model, data, device) -> dict[str, Any]:
    from cfexplain.evaluate.factors import causal_nuisance_ratio, mnac, realism_fd
    from cfexplain.utils.quality import FeatureStats

    cf = per["cf"]
    flipped = cf["flip"]
    out: dict[str, Any] = {"flip_rate": float(flipped.float().mean())}
    features = FeatureStats(model, device)
    real = data["x"]
    out["realism_fd_flip_frames"] = realism_fd(features, cf["frames"], real)
    out["realism_fd_reconstructions"] = realism_fd(features, cf["recon"], real)
    half = len(real) // 2
    out["realism_fd_real_halves"] = realism_fd(features, real[:half], real[half:])
    if "changes" in cf:
        names, changes = list(cf["factor_names"]), cf["changes"]
        t = float(cfg.mnac_threshold)
        out["factors"] = names
        out["causal_nuisance_ratio"] = causal_nuisance_ratio(changes, names)
        out["causal_nuisance_ratio_flipped"] = causal_nuisance_ratio(changes[flipped], names)
        out["mnac"] = float(mnac(changes, t).float().mean())
        out["mean_change"] = {f: float(changes[:, i].mean()) for i, f in enumerate(names)}
        if "marker_changed" in cf:
            out["marker_changed_share"] = float(cf["marker_changed"].float().mean())
    return out


def _table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    table = summary["table"]
    metrics = list(next(iter(table.values())))
    return ["method", *metrics], [[name, *row.values()] for name, row in table.items()]


def _flat(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"evaluation/{m}/{k}": v for m, row in table.items() for k, v in row.items()}


def _latest_gallery(run_dir: Path, out: Path) -> str | None:
    """Relative link from the evaluation page to the newest gallery of the run, if any."""
    pages = sorted(run_dir.glob("explain/*/index.html"), key=lambda p: p.stat().st_mtime)
    return os.path.relpath(pages[-1], out) if pages else None


def _swap(work: Path, out: Path) -> None:
    """Replace ``out`` by ``work``: the old folder goes only once the new one is in place."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _print_table(summary: dict[str, Any]) -> None:
    columns, rows = _table(summary)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in r])
    print(buf.getvalue(), end="")
    cf = summary.get("counterfactual")
    if cf:
        keys = ("flip_rate", "causal_nuisance_ratio", "mnac", "realism_fd_flip_frames")
        print("counterfactual: " + "  ".join(f"{k} {cf[k]:.3f}" for k in keys if k in cf))


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command("evaluate", evaluate, cfg, "evaluation")


if __name__ == "__main__":
    main()
