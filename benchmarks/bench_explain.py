"""CPU speed of the explain step's attribution maps, and their overhead over captum/zennit.

    python benchmarks/bench_explain.py [--batch 8] [--repeats 3] [--resolution 64] [--threads 1]

Uses the ``cpu_demo`` classifier (``conf/classifier/resnet.yaml``: ResNet width 16, blocks
[1, 1, 1, 1], stem stride 2) with random weights at 64 px. Reports images explained per second
for the default method set of ``conf/explain.yaml`` (the maps that need only the classifier),
and for each baseline the time of our ``Method.attribute`` over the time of calling captum or
zennit directly on the same batch (goal <= 1.1). Ours and direct calls alternate and the
fastest of ``repeats`` is kept, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cfexplain.explain.attribution import get_method, lrp_composite
from cfexplain.nn.classifier import ResNetClassifier

TARGET = 1


def classifier(channels: int = 1) -> ResNetClassifier:
    spec = OmegaConf.load(resources.files("cfexplain.conf").joinpath("classifier/resnet.yaml"))
    model = OmegaConf.to_container(spec, resolve=True)["model"]  # resolves model.attention
    kwargs = {k: v for k, v in model.items() if k != "_target_"}
    torch.manual_seed(0)
    return ResNetClassifier(in_channels=channels, num_classes=2, **kwargs).eval()


def explain_defaults() -> tuple[list[str], dict]:
    cfg = OmegaConf.load(resources.files("cfexplain.conf").joinpath("explain.yaml"))
    params = OmegaConf.to_container(cfg.params)
    # counterfactual and normative need trained later stages: not part of this benchmark.
    methods = [m for m in cfg.methods if m not in ("counterfactual", "normative")]
    return methods, params


def _best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` calls: other work on a shared CPU only ever adds time."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _plain_relus(model: torch.nn.Module) -> torch.nn.Module:
    # What a direct captum/zennit user does too: out-of-place ReLUs so backward hooks work.
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    return model


def direct_calls(model: torch.nn.Module, params: dict) -> dict:
    """The same maps computed by calling captum / zennit directly."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
    from zennit.attribution import Gradient

    ig, occ = params["integrated_gradients"], params["occlusion"]

    def saliency(x):
        return Saliency(model).attribute(x.requires_grad_(True), target=TARGET, abs=False)

    def integrated_gradients(x):
        return IntegratedGradients(model).attribute(
            x,
            baselines=ig["baseline"],
            target=TARGET,
            n_steps=ig["n_steps"],
            internal_batch_size=ig["internal_batch_size"],
        )

    def gradcam(x):
        a = LayerGradCam(model, model.cam_layer).attribute(x, target=TARGET)
        return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), interpolate_mode="bilinear")

    def occlusion(x):
        c = x.shape[1]
        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=(c, occ["window"], occ["window"]),
            strides=(c, occ["stride"], occ["stride"]),
            baselines=occ["baseline"],
            target=TARGET,
            perturbations_per_eval=occ["perturbations_per_eval"],
        )

    def lrp(x):
        with Gradient(model, lrp_composite(params["lrp"]["composite"])) as attributor:
            _, rel = attributor(
                x.requires_grad_(True),
                lambda out: out * F.one_hot(torch.tensor(TARGET), out.shape[1]).to(out),
            )
        return rel

    return {
        "saliency": saliency,
        "integrated_gradients": integrated_gradients,
        "gradcam": gradcam,
        "occlusion": occlusion,
        "lrp": lrp,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        # On a CPU shared with other jobs, one thread gives far steadier timings.
        torch.set_num_threads(args.threads)
    model = _plain_relus(classifier())
    x = (
        torch.rand(
            args.batch,
            1,
            args.resolution,
            args.resolution,
            generator=torch.Generator().manual_seed(0),
        )
        * 2
        - 1
    )
    methods, params = explain_defaults()
    print(
        f"classifier: ResNet cpu_demo ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
        f"batch {args.batch} at {args.resolution} px, {torch.get_num_threads()} threads"
    )

    built = {m: get_method(m)(model, **(params.get(m) or {})) for m in methods}
    per_method = {}
    for name, method in built.items():
        method.attribute(x[:2], TARGET)  # warm-up
        per_method[name] = _best_time(
            lambda method=method: method.attribute(x, TARGET), args.repeats
        )
    total = sum(per_method.values())
    print(f"\ndefault method set ({', '.join(methods)}):")
    for name, t in per_method.items():
        print(f"  {name:<22} {args.batch / t:8.1f} img/s")
    print(f"  {'all of them':<22} {args.batch / total:8.2f} img/s (images explained per second)")

    print(f"\n{'baseline':<22} {'ours s':>8} {'direct s':>9} {'ratio':>6}  (goal <= 1.1)")
    for name, direct in direct_calls(model, params).items():
        ours = built.get(name) or get_method(name)(model, **(params.get(name) or {}))
        ours.attribute(x[:2], TARGET)
        direct(x[:2].clone())
        t_ours, t_direct = [], []
        for i in range(2 * args.repeats):
            # Alternate which goes first (ABBA): load on the machine and the first call after a
            # switch of kernels hit both alike.
            pair = [
                (t_ours, lambda ours=ours: ours.attribute(x, TARGET)),
                (t_direct, lambda direct=direct: direct(x.clone())),
            ]
            for times, fn in pair if i % 2 == 0 else pair[::-1]:
                times.append(_best_time(fn, 1))
        a, b = min(t_ours), min(t_direct)
        print(f"{name:<22} {a:8.3f} {b:9.3f} {a / b:6.2f}")


if __name__ == "__main__":
    main()
