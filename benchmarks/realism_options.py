"""Realism of counterfactual frames on the fixed yardstick, for the engine's opt-in options.

    python benchmarks/realism_options.py runs/knee [--limit 200] [--target 1] \
        [--variants default reproject bound2 coarse] [--oracle]

For a trained run (generator, encoder and direction stages) and each variant of the
counterfactual engine, on the first ``limit`` test images with ``lambdas=auto``: the flip rate,
COUT, the LPIPS of the judged frame to the reconstruction, and the Fréchet distance on
``FixedFeatures`` (the shift-tolerant LPIPS AlexNet trunk) of the judged frames and of the
reconstructions, each against the real test images of the class the classifier gives them
(``cfexplain.evaluate.pipeline.fixed_realism``: what ``python -m cfexplain.evaluate`` reports).
For a run with an ordinal direction the walk is ordinal and its grade monotonicity is printed
too; ``--oracle`` adds the oracles' factor trajectories (the cached oracle beside the run).
Not part of ``python -m benchmarks``: it needs a trained run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from omegaconf import OmegaConf

from cfexplain.evaluate.pipeline import (
    collect_counterfactual,
    fixed_realism,
    ground_truth,
    ordinal_summary,
)
from cfexplain.explain.attribution import get_method
from cfexplain.runs import TrainedRun

# name -> CounterfactualEngine keyword arguments (on top of the run's own)
VARIANTS: dict[str, dict] = {
    "default": {},
    "reproject": {"reproject": True},
    "bound2": {"lambda_bound": 2.0},
    "bound3": {"lambda_bound": 3.0},
    "coarse": {"layers": [0, 6]},
    "coarse_reproject": {"layers": [0, 6], "reproject": True},
    "bound2_reproject": {"lambda_bound": 2.0, "reproject": True},
    # runs with more than two classes: the walk along the target's own direction, not ordinal
    "target": {"walk": "target"},
    "target_reproject": {"walk": "target", "reproject": True},
    "target_bound2": {"walk": "target", "lambda_bound": 2.0},
    "target_coarse": {"walk": "target", "layers": [0, 6]},
    "ordinal_inner": {"grade_ends": [0.5, 3.5]},
    # the ordinal walk along the highest grade's direction minus the lowest's (not the Ridge fit)
    "ordinal_contrast": {"ordinal": "contrast"},
}


def measure(run: TrainedRun, data: dict, target: int, kwargs: dict, oracle) -> dict:
    """One variant's numbers on the images of ``data`` (see the module docstring)."""
    if kwargs.get("ordinal") == "contrast":
        per_class = run.directions["directions"]
        kwargs = {**kwargs, "ordinal": per_class[-1] - per_class[0]}
    method = get_method("counterfactual").from_run(run, lambdas="auto", **kwargs)
    cfg = OmegaConf.create({"mnac_threshold": 0.5, "cout_steps": 50})
    parts: dict[str, list] = {}
    lpips = []
    start = time.time()
    for x in data["x"].split(16):
        cf = method.sequences(x.to(run.device), target)
        collect_counterfactual(parts, cf, run.classifier, oracle, cfg)
        idx, _ = cf.flip_frame()
        frame = cf.images[torch.arange(len(idx)), idx]
        with torch.no_grad():
            lpips.append(method.engine._distance(frame, cf.reconstruction).cpu())
    cf_all = {k: (v[0] if k == "factor_names" else torch.cat(v)) for k, v in parts.items()}
    out = {
        "flip_rate": float(cf_all["flip"].float().mean()),
        "cout": float(cf_all["cout"].mean()),
        "lpips_to_recon": float(torch.cat(lpips).mean()),
        "seconds": round(time.time() - start, 1),
    }
    out |= fixed_realism(cf_all, data, run.device, min_count=10)
    if "grades" in cf_all:
        out["ordinal"] = ordinal_summary(cf_all)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--target", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["default", "reproject", "bound2", "coarse"])
    ap.add_argument("--oracle", action="store_true", help="factor trajectories of ordinal walks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    run = TrainedRun(args.run, "cpu")
    ds = run.dataset("test")
    data = ground_truth(ds, min(args.limit, len(ds)), args.target)
    oracle = None
    if args.oracle:
        from cfexplain.evaluate.oracles import fit_or_load

        res = int(run.config.data.resolution)
        oracle, _ = fit_or_load(
            run.beside("oracles") / f"knee_{res}px",
            resolution=res,
            device=run.device,
            seed=0,
            n_train=5000,
            n_test=1000,
            steps=1000,
            batch_size=64,
        )
    results = {}
    for name in args.variants:
        results[name] = measure(run, data, args.target, VARIANTS[name], oracle)
        r = results[name]
        print(
            f"{name:18s} flip {r['flip_rate']:.3f}  COUT {r['cout']:+.3f}  "
            f"LPIPS {r['lpips_to_recon']:.3f}  fixed FD frames "
            f"{r['realism_fixed_fd_flip_frames']:.3f} / recon "
            f"{r['realism_fixed_fd_reconstructions']:.3f} = {r['realism_fixed_fd_ratio']:.2f}x"
            f"  (real halves {r['realism_fixed_fd_real_halves']:.3f}; {r['seconds']} s)",
            flush=True,
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
