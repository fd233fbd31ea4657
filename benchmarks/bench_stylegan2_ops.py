"""CPU speed of the StyleGAN2 generator and discriminator (fp32), and of their hot maths.

    python benchmarks/bench_stylegan2_ops.py [--configs auto32 small64] [--batch 16] [--repeats 3]

Reports G inference img/s (noise const, no grad) with the unfused modulated convolution and
with the grouped one (the published code's inference path, as a baseline measured in the same
run), and one full G+D forward+backward img/s (z -> G -> D -> softplus(-logits) -> backward into
every parameter of both), and a plain GAN iteration (that G phase plus a D phase on fakes and reals).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cfexplain.nn.stylegan2 import Discriminator, Generator

CONFIGS = {
    # The published `auto` configuration at 32 px (channel_base 16384, channel_max 512, map 2).
    "auto32": dict(img_resolution=32, z_dim=512, w_dim=512, channel_base=16384, channel_max=512),
    "small64": dict(img_resolution=64, z_dim=128, w_dim=128, channel_base=4096, channel_max=128),
}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive caches
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(name: str, batch: int, repeats: int, img_channels: int = 1) -> dict:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    res = cfg["img_resolution"]
    G = Generator(**cfg, img_channels=img_channels, mapping_layers=2)
    D = Discriminator(res, img_channels, cfg["channel_base"], cfg["channel_max"])
    z = torch.randn(batch, G.z_dim)
    out = {
        "config": name,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "G_Mparams": sum(p.numel() for p in G.parameters()) / 1e6,
        "D_Mparams": sum(p.numel() for p in D.parameters()) / 1e6,
    }
    for mode in ("unfused", "grouped"):
        G_mode = Generator(**cfg, img_channels=img_channels, fused_modconv=mode)
        G_mode.load_state_dict(G.state_dict())

        def infer(G_mode=G_mode):
            with torch.no_grad():
                G_mode(z, noise_mode="const")

        out[f"G_infer_{mode}_img_s"] = batch / _time(infer, repeats)

    def step():
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        loss = F.softplus(-D(G(z))).mean()
        loss.backward()

    out["G+D_fwd_bwd_img_s"] = batch / _time(step, repeats)

    # A plain GAN iteration for comparison with whole training steps (no augmentation and no
    # lazy regularisation, which add to the published step): the G phase above, then the D phase
    # on detached fakes and on reals.
    real = torch.rand(batch, img_channels, res, res) * 2 - 1

    def d_phase():
        D.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = G(z)
        loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
        loss.backward()

    out["GAN_iteration_img_s"] = batch / (
        batch / out["G+D_fwd_bwd_img_s"] + _time(d_phase, repeats)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for name in args.configs:
        r = bench(name, args.batch, args.repeats)
        print(
            ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
