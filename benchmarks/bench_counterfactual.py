"""Counterfactual sequence cost per image: batched frames against one image at a time.

    python benchmarks/bench_counterfactual.py [--images 16] [--frames 9] [--repeats 3]

Random-weight networks of the sizes the shipped ``cpu_demo`` config gives (generator, encoder,
classifier at ``data.resolution``), so no trained run is needed. For a 9-frame symmetric λ grid
it times E(x), the reconstruction and every frame through G and f, and prints ms per image for
``max_batch`` = all frames of the batch in one pass, a smaller ``max_batch``, and the per-image
baseline (one engine call per image), plus the auto-λ mode for reference: with the nearest-
crossing scan (``scan_steps=16``, the default) and with whole-range bisection (``scan_steps=0``).
Goal (issue 4): <= 50 ms per image batched on CPU.
"""

from __future__ import annotations

import argparse

import torch
from bench_stylegan2_ops import _time  # best of `repeats` after a warm-up
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cfexplain.explain.counterfactual import CounterfactualEngine


def networks() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, int]:
    """G, E, f with random weights at the cpu_demo sizes, and the resolution."""
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+dataset=knee", "preset=cpu_demo"])
    res, ch = int(cfg.data.resolution), int(cfg.data.channels)
    torch.manual_seed(0)
    G = instantiate(cfg.generator.G, img_resolution=res, img_channels=ch).eval()
    enc = OmegaConf.to_container(cfg.encoder.model, resolve=True)
    E = instantiate(enc, img_resolution=res, img_channels=ch, w_dim=G.w_dim, num_ws=G.num_ws).eval()
    torch.nn.init.normal_(E.head[-1].weight, std=0.01)
    f = instantiate(cfg.classifier.model, in_channels=ch, num_classes=2).eval()
    return G.requires_grad_(False), E.requires_grad_(False), f.requires_grad_(False), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    G, E, f, res = networks()
    x = (
        torch.rand(
            args.images, G.img_channels, res, res, generator=torch.Generator().manual_seed(1)
        )
        * 2
        - 1
    )
    direction = torch.randn(G.w_dim)
    n, k = args.images, args.frames

    def engine(max_batch: int, scan_steps: int = 16) -> CounterfactualEngine:
        return CounterfactualEngine(
            G,
            E,
            f,
            direction,
            lambda_range=3.0,
            num_frames=k,
            max_batch=max_batch,
            scan_steps=scan_steps,
            device="cpu",
        )

    all_frames = engine(n * k)
    rows = [
        (
            f"batched, max_batch={n * k} (all frames in one pass)",
            _time(lambda: all_frames(x, lambdas="symmetric"), args.repeats),
        ),
        ("batched, max_batch=32", _time(lambda: engine(32)(x, lambdas="symmetric"), args.repeats)),
        (
            "per image (baseline), max_batch=k",
            _time(
                lambda: [engine(k)(x[i : i + 1], lambdas="symmetric") for i in range(n)],
                args.repeats,
            ),
        ),
        (
            "auto λ (5 targets, scan 16 + 9 steps), batched",
            _time(lambda: all_frames(x, lambdas="auto"), 1),
        ),
        (
            "auto λ (5 targets, 14 bisection steps), batched",
            _time(lambda: engine(n * k, scan_steps=0)(x, lambdas="auto"), 1),
        ),
    ]
    print(
        f"counterfactual sequences: {n} images × {k} frames at {res} px, G {G.img_resolution} px w_dim {G.w_dim} "
        f"num_ws {G.num_ws}, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':<52} {'ms / image':>11} {'ms / frame':>11}")
    for name, seconds in rows:
        frames = k  # the reconstruction is the λ = 0 frame of the grid
        print(f"{name:<52} {1000 * seconds / n:>11.1f} {1000 * seconds / (n * frames):>11.2f}")
    batched, single = rows[0][1], rows[2][1]
    print(
        f"batched / per image: {single / batched:.2f}x faster; goal <= 50 ms per image batched: "
        f"{'met' if 1000 * batched / n <= 50 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
