"""What the evaluation computes, on a phantom split with ground truth: per-image scores of
every map (localisation, deletion and insertion, marker exposure), the counterfactuals' factor
changes, the cascading randomisation check, and the method × metric table.

``python -m cfexplain.evaluate`` is the thin entry point over this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from cfexplain.evaluate import heatmaps as hm
from cfexplain.evaluate.shortcut import any_place_exposure, heatmap_exposure
from cfexplain.explain.attribution import (
    Counterfactual,
    Method,
    counterfactual_difference,
    get_method,
    whole_number,
)
from cfexplain.nn.capsules import capsule_net
from cfexplain.runs import TrainedRun
from cfexplain.utils.cli import ConfigError

LOCALISATION = ("pointing_game", "relevance_mass", "relevance_rank", "iou_at_area")
# Maps that do not read the classifier: the randomisation check shows exactly that.
CLASSIFIER_FREE = ("normative", "report")
# Maps whose sign is not "evidence for the target": scored by magnitude.
MAGNITUDE = ("counterfactual", "normative")


def relevance(name: str, maps: Tensor, signed: bool) -> Tensor:
    """The non-negative relevance a map assigns to each pixel: the positive part (evidence for
    the target) of signed attributions, the magnitude of a counterfactual difference or residual."""
    if name in MAGNITUDE:
        return maps.abs()
    return maps.clamp_min(0) if signed else maps


# ----------------------------------------------------------------------------- data


def ground_truth(ds, n: int, target: int) -> dict[str, Any]:
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
        "concepts": [m.get("concepts") for m in metas],
        "metas": metas,
        "knee": "osteophyte" in metas[0]["masks"],
    }


# ----------------------------------------------------------------------------- randomisation


def counterfactual_under(engine: Any, cfg: DictConfig, target: int) -> Callable:
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
            probs = torch.cat([torch.softmax(model(b), 1) for b in images.split(engine.max_batch)])
        p = probs[:, target]
        y = (p > p.median()).cpu().numpy().astype(int)
        fit = fit_linear_direction(w0, y, Cs=[1.0], cv=2, max_iter=300, holdout=0.2, seed=0)
        alpha = torch.as_tensor(fit["direction"], dtype=torch.float32)
        if probs.shape[1] > 2:
            alpha = alpha.expand(probs.shape[1], -1).clone()  # the walk reads row `target`
        elif target == 0:
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


def randomisation_checks(
    cfg, model, methods, counterfactual, params, x, target
) -> dict[str, hm.RandomisationResult]:
    """The cascading randomisation check of every method on the images ``x``."""
    results = {}
    names = (["counterfactual"] if counterfactual is not None else []) + list(methods)
    for name in tqdm(names, desc="randomisation", unit="method"):
        signed = methods[name].signed if name in methods else True
        if name == "counterfactual":
            build = counterfactual_under(counterfactual.engine, cfg, target)

            def attribute(m, build=build, lambdas=counterfactual.lambdas):
                cf = build(m)(x, target=target, lambdas=lambdas)
                return relevance("counterfactual", counterfactual_difference(cf), True)

        elif name in CLASSIFIER_FREE:
            # The residual and the report's attention do not read the classifier at all.
            def attribute(m, method=methods[name], name=name):
                return relevance(name, method.attribute(x, target), False)

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


def per_image(cfg, model, methods, counterfactual, oracle, data, target, device) -> dict[str, Any]:
    """Per-image scores of every method, and the counterfactuals' factor changes."""
    x_all, labels = data["x"], data["labels"]
    n, size = len(x_all), int(cfg.batch_size)
    scores: dict[str, dict[str, list[Tensor]]] = {}
    cf_parts: dict[str, list] = {}
    bar = tqdm(total=n, desc="evaluate", unit="img")
    for start in range(0, n, size):
        sl = slice(start, min(n, start + size))
        x = x_all[sl].to(device)
        maps = {}
        if counterfactual is not None:
            cf = counterfactual.sequences(x, target)
            maps["counterfactual"] = relevance(
                "counterfactual", counterfactual_difference(cf), True
            )
            collect_counterfactual(cf_parts, cf, model, oracle, cfg, data["marker"][sl])
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


def collect_counterfactual(
    parts: dict[str, list], cf: Any, model, oracle, cfg, marker_masks: Tensor
) -> None:
    """One batch's counterfactual results into ``parts`` (lists concatenated at the end): the
    oracles' factor changes, the marker's part in f's move where the walk changed it
    (``marker_masks [N, H, W]``), where f reacts to the change up to the strongest frame, the
    share of the move the change reduced to that reproduces and whether it still moves the
    marker, the judged frames and reconstructions with the classes f gives them, COUT, and for
    an ordinal walk every frame's grade and factor readings."""
    from cfexplain.evaluate.factors import counterfactual_factors, read_factors
    from cfexplain.explain.metrics import counterfactual_cout, counterfactual_effects

    n = len(cf.reconstruction)
    if oracle is not None:
        part = counterfactual_factors(oracle, cf, threshold=float(cfg.mnac_threshold))
        for k in ("changes", "flipped", "mnac", "marker_changed", "before", "after"):
            if k in part:
                parts.setdefault(k, []).append(part[k].cpu())
        parts.setdefault("factor_names", [part["factors"]])
        if "marker_frame" in part and not cf.ordinal:
            parts.setdefault("marker_effect", []).append(
                changed_marker_effect(model, cf, part["marker_frame"], marker_masks)
            )
    effects = counterfactual_effects(model, cf)
    parts.setdefault("effect", []).append(effects.map)
    parts.setdefault("sufficiency", []).append(effects.sufficiency)
    if oracle is not None and "marker" in part["factors"]:
        # the reconstruction's reading is part["before"]: only the focused images are read
        j = part["factors"].index("marker")
        focused = read_factors(oracle, effects.focused)[:, j] > 0.5
        parts.setdefault("focused_marker_changed", []).append(
            focused != (part["before"][:, j] > 0.5)
        )
    idx, flipped = cf.flip_frame()
    frames = cf.images[torch.arange(n), idx]
    with torch.no_grad():
        for key, images in (("frames", frames), ("recon", cf.reconstruction)):
            parts.setdefault(key, []).append(images.cpu())
            parts.setdefault(f"{key}_pred", []).append(model(images).argmax(1).cpu())
    parts.setdefault("flip", []).append(flipped.cpu())
    parts.setdefault("cout", []).append(counterfactual_cout(model, cf, int(cfg.cout_steps)))
    parts.setdefault("w", []).append(cf.w.detach().cpu())  # the attribute summary starts there
    if cf.ordinal:
        parts.setdefault("lambdas", []).append(cf.lambdas.cpu())
        parts.setdefault("grades", []).append(cf.grades().float().cpu())
        parts.setdefault("argmax", []).append(cf.argmax_grades().cpu())
        parts.setdefault("walk_frames", []).append(cf.images.cpu())
        if oracle is not None:
            parts.setdefault("walk_factors", []).append(read_factors(oracle, cf.images))


def changed_marker_effect(model, cf: Any, frame: Tensor, marker_masks: Tensor) -> Tensor:
    """``[N]`` :func:`~cfexplain.evaluate.shortcut.marker_effect` between each reconstruction and
    the first frame whose marker differs from it (``frame [N]``, -1: none); NaN where the walk
    left the marker as it was or the image has none."""
    from cfexplain.evaluate.shortcut import marker_effect

    out = torch.full((len(frame),), math.nan)
    rows = ((frame >= 0) & marker_masks.flatten(1).any(1)).nonzero().flatten()
    if len(rows):
        after = cf.images[rows.to(cf.images.device), frame[rows].to(cf.images.device)]
        before = cf.reconstruction[rows.to(cf.images.device)]
        out[rows] = marker_effect(model, before, after, marker_masks[rows], cf.target).cpu()
    return out


def nanmean(v: Tensor) -> float:
    v = v[~v.isnan()]
    return float(v.mean()) if len(v) else math.nan


def summarise(cfg, per, sanity, names, data, target) -> dict[str, Any]:
    """The method × metric table."""
    table: dict[str, dict[str, Any]] = {}
    keep = per["localised"]
    has_marker = data["marker"].flatten(1).any(1)
    for name in names:
        s = per["maps"][name]
        row = {k: nanmean(s[k][keep]) for k in LOCALISATION}
        row["deletion_auc"] = nanmean(s["deletion"])
        row["insertion_auc"] = nanmean(s["insertion"])
        row["randomisation_cascade"] = sanity[name].cascade
        row["randomisation_final"] = sanity[name].final
        row["sanity"] = "pass" if sanity[name].passed else "FAIL"
        row["marker_exposure"] = nanmean(s["marker_exposure"][has_marker])
        table[name] = row
    if "counterfactual" in table and "marker_changed" in per["cf"]:
        # A counterfactual exposes the marker when the marker appears or vanishes along it.
        changed = per["cf"]["marker_changed"].float()
        table["counterfactual"]["marker_exposure"] = nanmean(changed[has_marker])
    return {"table": table, "sanity": {k: v.to_dict() for k, v in sanity.items()}}


def counterfactual_summary(cfg, per, model, data, device) -> dict[str, Any]:
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
    out["cout"] = float(cf["cout"].mean())
    out["cout_flipped"] = float(cf["cout"][flipped].mean()) if flipped.any() else math.nan
    if cfg.realism.fixed_features:
        out |= fixed_realism(cf, data, device, int(cfg.realism.min_count))
    if "grades" in cf:
        out["ordinal"] = ordinal_summary(cf)
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
        if "marker_effect" in cf:
            out |= decisive_exposure(cf["marker_effect"], data, float(cfg.marker_decisive))
    has_marker = data["marker"].flatten(1).any(1)
    if "effect" in cf and has_marker.any():
        # Without the masks: does the "what f reacts to" tile put its weight on the marker?
        shown = heatmap_exposure(cf["effect"].abs(), data["marker"])
        out["marker_exposure_effect"] = nanmean(shown[has_marker])
        # G may draw the marker in another corner than the input's: any marker place counts.
        from cfexplain.data.phantoms.knee import marker_places

        places = marker_places(data["marker"].shape[-1])
        shown = any_place_exposure(cf["effect"].abs(), places, has_marker)
        out["marker_exposure_effect_corners"] = nanmean(shown[has_marker])
    if "focused_marker_changed" in cf and has_marker.any():
        # The counterfactual reduced to what f reacts to: does it still change the marker?
        out["marker_exposure_focused"] = nanmean(cf["focused_marker_changed"][has_marker].float())
    if "sufficiency" in cf:
        out["focus_sufficiency_median"] = float(cf["sufficiency"].nanmedian())
    return out


def decisive_exposure(effect: Tensor, data: dict[str, Any], threshold: float) -> dict[str, float]:
    """Over the images with a marker: the share whose counterfactual changed the marker *and*
    whose classifier moved by at least ``threshold`` for that change (its Shapley value,
    :func:`~cfexplain.evaluate.shortcut.marker_effect`), and the median |value| where it changed.
    A walk that changes the marker of a classifier that ignores it exposes nothing."""
    e = effect[data["marker"].flatten(1).any(1)]
    return {
        "marker_exposure_decisive": float((e.abs() >= threshold).float().mean())
        if len(e)
        else math.nan,
        "marker_effect_median": float(e[~e.isnan()].abs().median())
        if (~e.isnan()).any()
        else math.nan,
    }


@torch.no_grad()
def concept_summary(
    net: nn.Module,
    data: dict[str, Any],
    target: int,
    device: torch.device,
    batch: int,
    baseline: nn.Module | None = None,
) -> dict[str, Any]:
    """A capsule classifier on the evaluated images: per attribute the MAE of its readings
    against the ground-truth concepts and the AUC of the readings for "present" (truth >= 0.5:
    definite), and the diagnosis AUC of ``target``, beside ``baseline``'s on the same images."""
    from sklearn.metrics import roc_auc_score

    from cfexplain.data.concepts import PRESENT, attribute_metrics, concept_targets

    x, labels = data["x"], (data["labels"] == target).numpy()
    names = list(net.attributes)

    def prob(model: nn.Module) -> Any:
        parts = [torch.softmax(model(b.to(device)).float(), 1)[:, target] for b in x.split(batch)]
        return torch.cat(parts).cpu().numpy()

    def auc(p: Any) -> float:
        return float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else math.nan

    readings = torch.cat([net.attribute_values(b.to(device)).float().cpu() for b in x.split(batch)])
    out: dict[str, Any] = {
        "attributes": names,
        "binarised": f"present when the ground truth is >= {PRESENT} (definite: the phantom's "
        "clinical threshold); AUC of the reading for present, MAE of the reading against the truth",
        "diagnosis_auc": auc(prob(net)),
    }
    if baseline is not None:
        out["baseline_diagnosis_auc"] = auc(prob(baseline))
    if all(c is not None and set(names) <= set(c) for c in data["concepts"]):
        truth = concept_targets([{"concepts": c} for c in data["concepts"]], names)
        m = attribute_metrics(readings.numpy(), truth, names)
        out["per_attribute"] = {
            n: {
                "mae": m[f"{n}/mae"],
                "auc": m[f"{n}/auc"],
                "present": float((truth[:, j] >= PRESENT).mean()),
            }
            for j, n in enumerate(names)
        }
        out["mean_mae"], out["mean_auc"] = m["mae"], m["auc"]
    return out


def reporter_summary(cfg: DictConfig, run: TrainedRun, method: Any, data: dict) -> dict[str, Any]:
    """The written reports against the phantom: BLEU-4, the findings read back against the
    factors, and word pointing in each finding's mask, strict and within
    ``pointing_tolerance`` px (the report's decoding and word span are ``params.report``'s)."""
    from cfexplain.explain.reporter import evaluate_reports

    samples = [{"image": x, "meta": m} for x, m in zip(data["x"], data["metas"])]
    out: dict[str, Any] = evaluate_reports(
        run.reporter,
        samples,
        int(cfg.batch_size),
        decode=method.decode,
        beam_size=method.beam_size,
        tolerance=int(cfg.pointing_tolerance),
        span=method.span,
    )
    out["decode"], out["span"] = method.decode, method.span
    return out


def fixed_realism(cf: dict[str, Any], data: dict[str, Any], device, min_count: int) -> dict:
    """Realism on a yardstick that does not move with the run's classifier: Fréchet distance on
    :class:`~cfexplain.nn.perceptual.FixedFeatures` (the shift-tolerant LPIPS AlexNet trunk),
    each judged frame against the real images of the class f gives it, each reconstruction
    against those of its own class, and two halves of the real images by their true class."""
    from cfexplain.nn.perceptual import FixedFeatures
    from cfexplain.utils.quality import class_conditional_fd

    net = FixedFeatures().to(device)

    def feats(x: Tensor) -> Tensor:
        return torch.cat([net(b.to(device)).double().cpu() for b in x.split(64)])

    real, labels = feats(data["x"]), data["labels"]
    out: dict[str, Any] = {}
    for key, name in (("frames", "flip_frames"), ("recon", "reconstructions")):
        r = class_conditional_fd(real, labels, feats(cf[key]), cf[f"{key}_pred"], min_count)
        out[f"realism_fixed_fd_{name}"] = r["fd"]
        out[f"realism_fixed_fd_{name}_skipped"] = r["skipped_fakes"]
    if "walk_frames" in cf:  # ordinal walks: every frame, against its most probable grade
        walk = feats(cf["walk_frames"].flatten(0, 1))
        r = class_conditional_fd(real, labels, walk, cf["argmax"].flatten(), min_count)
        out["realism_fixed_fd_walk_frames"] = r["fd"]
    half = len(real) // 2
    r = class_conditional_fd(real[:half], labels[:half], real[half:], labels[half:], min_count)
    out["realism_fixed_fd_real_halves"] = r["fd"]
    rec = out["realism_fixed_fd_reconstructions"]
    out["realism_fixed_fd_ratio"] = out["realism_fixed_fd_flip_frames"] / rec if rec else math.nan
    return out


def ordinal_summary(cf: dict[str, Any]) -> dict[str, Any]:
    """The ordinal walk over the evaluated images: share whose expected grade never falls, its
    mean Spearman with λ, the argmax grades at the ends, and (with the oracles) each disease
    factor's mean reading per frame and the share of walks along which it moves the way a rising
    grade needs (joint space narrowing, the others growing: Spearman with λ of the right sign)."""
    from cfexplain.evaluate.oracles import CAUSAL
    from cfexplain.explain.metrics import grade_rises, spearman

    lam, g, top = cf["lambdas"], cf["grades"], cf["argmax"]
    out: dict[str, Any] = {
        "images": len(g),
        "grade_rises_share": float(grade_rises(g).float().mean()),
        "grade_monotonicity_mean": float(spearman(lam, g).mean()),
        "mean_grade_per_frame": [round(float(v), 4) for v in g.mean(0)],
        "argmax_first_histogram": torch.bincount(top[:, 0], minlength=int(top.max()) + 1).tolist(),
        "argmax_last_histogram": torch.bincount(top[:, -1], minlength=int(top.max()) + 1).tolist(),
    }
    if "walk_factors" in cf:
        names, readings = list(cf["factor_names"]), cf["walk_factors"]  # [N, K, F]
        for f in CAUSAL:
            if f not in names:
                continue
            v = readings[..., names.index(f)]
            sign = -1.0 if f == "jsw_min" else 1.0
            rho = spearman(lam, v)
            out[f"{f}_per_frame"] = [round(float(m), 5) for m in v.mean(0)]
            out[f"{f}_moves_with_grade_share"] = float((sign * rho > 0).float().mean())
            out[f"{f}_spearman_mean"] = float(rho.mean())
    return out


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    table = summary["table"]
    metrics = list(next(iter(table.values()), {}))  # no map methods: no columns
    return ["method", *metrics], [[name, *row.values()] for name, row in table.items()]


def flat(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"evaluation/{m}/{k}": v for m, row in table.items() for k, v in row.items()}


def evaluate_run(
    cfg: DictConfig,
    run: TrainedRun,
    counterfactual: Counterfactual | None,
    methods: dict[str, Method],
    data: dict[str, Any],
    notes: list[str],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, hm.RandomisationResult]]:
    """``(summary, per-image scores, randomisation checks)`` of every method on ``data``
    (:func:`ground_truth`); the summary holds the table and, with a counterfactual, its
    factor-by-factor changes read by the phantom's oracles (knee only: ``notes`` says so)."""
    model, device, target = run.classifier, run.device, int(cfg.target)
    # The attributes are judged by the factors they change (below), not as a map; without an
    # encoder (the method is then unavailable) they are judged on G's samples.
    methods.pop("attributes", None)
    attr = "attributes" in [str(m) for m in cfg.methods] and run.has("attributes")
    oracle = oracle_info = None
    if (counterfactual is not None or attr) and data["knee"]:
        from cfexplain.evaluate.oracles import fit_or_load

        res = int(run.config.data.resolution)
        # The oracles know the phantom, not the run: one cache beside the runs serves all.
        oracle, oracle_info = fit_or_load(
            run.beside("oracles") / f"knee_{res}px",
            resolution=res,
            device=device,
            seed=int(cfg.seed),
            **OmegaConf.to_container(cfg.oracle, resolve=True),
        )
    elif counterfactual is not None or attr:
        notes.append("No factor oracles: they read the knee phantom's factors.")
    per = per_image(cfg, model, methods, counterfactual, oracle, data, target, device)
    params = OmegaConf.to_container(cfg.params, resolve=True) or {}
    x = data["x"][: int(cfg.randomisation.images)].to(device)
    checks = randomisation_checks(cfg, model, methods, counterfactual, params, x, target)
    names = (["counterfactual"] if counterfactual is not None else []) + list(methods)
    summary = summarise(cfg, per, checks, names, data, target)
    if counterfactual is not None:
        summary["counterfactual"] = counterfactual_summary(cfg, per, model, data, device)
    net = capsule_net(model)
    if net is not None:
        baseline = None
        if cfg.get("baseline"):
            baseline = TrainedRun(str(cfg.baseline), device).classifier
        batch = int(cfg.batch_size)
        summary["concepts"] = concept_summary(net, data, target, device, batch, baseline)
        if baseline is not None:
            summary["concepts"]["baseline"] = str(cfg.baseline)
    if "report" in methods:
        summary["reporter"] = reporter_summary(cfg, run, methods["report"], data)
    if oracle_info is not None:
        summary["oracle"] = {k: oracle_info[k] for k in ("factors", "metrics") if k in oracle_info}
        from cfexplain.evaluate.factors import true_counterfactual_ratios

        calibration = true_counterfactual_ratios(oracle, seed=int(cfg.seed))
        # What the ratio and MNAC read on true one-factor edits: the scale for the goal.
        summary["oracle_calibration"] = {
            edit: {k: r[k] for k in ("kind", "ratio", "mnac_mean")}
            for edit, r in calibration.items()
        }
        if attr:
            w = per["cf"].get("w")  # the counterfactual's latents: no second refinement
            summary["attributes"] = attribute_summary(cfg, run, oracle, data, calibration, w)
    return summary, per, checks


def summary_styles(
    cfg: DictConfig, run: TrainedRun, x: Tensor, w: Tensor | None
) -> tuple[Tensor, str]:
    """``(styles, what they are)`` the attribute summary is judged on: the images ``x`` encoded
    through E and refined as the counterfactual's latents (``w`` where it already has them);
    without an encoder, as many G samples."""
    from cfexplain.explain.attributes import run_styles, to_styles
    from cfexplain.explain.counterfactual import project

    G, size = run.generator, int(cfg.batch_size)
    if not run.has("encoder"):
        # Other samples than a `source=samples` AttFind with the same seed chose them on.
        s = run_styles(run, "samples", "", len(x), int(cfg.seed) + 1, size)
        return s, "G samples (the run has no encoder)"
    refine = whole_number("refine_steps", cfg.refine_steps, 0)
    if w is None:
        perceptual = run.perceptual if refine > 0 else None
        w = project(G, run.encoder, x.to(run.device), refine, perceptual, size)
    with torch.no_grad():
        s = to_styles(G, w.to(run.device))
    return s, "test images encoded through E" + (f", refined {refine} steps" if refine else "")


def attribute_summary(
    cfg: DictConfig,
    run: TrainedRun,
    oracle: nn.Module,
    data: dict[str, Any],
    calibration: dict,
    w: Tensor | None = None,
) -> dict[str, Any]:
    """The attribute × factor table of the target's attributes on the evaluated images (encoded
    through E, or ``w``, their latents the counterfactual already refined; without an encoder,
    as many G samples, whose marker the oracle reads), and the true one-factor edits as its
    calibration rows; on encoded images with markers, which of every class's attributes removes
    the marker in each corner (``marker_by_corner``)."""
    from cfexplain.evaluate.factors import (
        attribute_factors,
        calibration_rows,
        factor_coordinates,
        marker_by_corner,
        marker_corners,
        read_factors,
    )
    from cfexplain.explain.attributes import render

    target, found, G = int(cfg.target), run.attributes, run.generator
    size, n = int(cfg.batch_size), len(data["x"])
    encoded = run.has("encoder")
    s, images = summary_styles(cfg, run, data["x"], w)
    with torch.no_grad():
        # Every factor of G(s), read once for the table, the scan and the marker counts.
        before = read_factors(oracle, torch.cat([render(G, b) for b in s.split(size)]))
    factors = list(oracle.factors)
    drawn = before[:, factors.index("marker")] > 0.5 if "marker" in factors else None
    has_marker = data["marker"].flatten(1).any(1) if encoded else drawn
    chosen = found.of_class(target)
    steps = [found.step(a) for a in chosen]
    # The marker's corner in each test image (the phantom's masks say it; G's samples do not).
    corner = marker_corners(data["marker"]) if encoded and drawn is not None else None
    rows = attribute_factors(oracle, G, s, chosen, steps, has_marker, size, before, corner)
    out = {
        "shift": found.shift,
        "images": n,
        "source": images,
        "images_with_marker": int(has_marker.sum()),
        "factors": factors,
        "rows": rows,
        "calibration": calibration_rows(calibration),
    }
    if encoded and drawn is not None and has_marker.any():
        # How many marked images G(s) shows a marker on: an attribute can only remove what
        # the reconstruction draws (the rest of its toggles are additions).
        out["marker_reconstructed"] = float(drawn[has_marker.cpu()].float().mean())
        # Every class's attributes: the one that removes a corner's marker may raise another class.
        others = [a for a in found.attributes if a.cls != target]
        rows_others = attribute_factors(
            oracle, G, s, others, [found.step(a) for a in others], has_marker, size, before, corner
        )
        out["marker_by_corner"] = marker_by_corner([*rows, *rows_others], corner)
    scan = min(int(cfg.attribute_scan), n)
    if scan > 0:
        step = (found.shift * found.std.float()).to(s.device)
        best = factor_coordinates(
            oracle, G, s[:scan], step, found.layout, has_marker[:scan], size,
            float(cfg.mnac_threshold), before[:scan],
        )  # fmt: skip
        # [class, rank] of the attribute AttFind chose on that coordinate (the target's first).
        picked = {a.coordinate: [a.cls, a.rank] for a in [*found.attributes, *reversed(chosen)]}
        for r in best:
            r["attfind"] = picked.get(r["coordinate"])
        out |= {"scan_images": scan, "best_coordinates": best}
    return out
