"""Generator speed: our StyleGAN2 against a straightforward reference of the same network.

    python benchmarks/bench_generator.py [--configs cpu_demo auto32] [--batch 16] [--repeats 3]

For each configuration (``cpu_demo``: the generator block of the default preset at 64 px; ``auto32``:
the published ``auto`` configuration at 32 px, channel_base 16384, channel_max 512, 2 mapping
layers, 1 channel) it prints G inference img/s (noise const, no grad) and training-iteration
img/s (G phase: z -> G -> D -> loss -> backward; D phase: fakes and reals -> D -> loss ->
backward), with FLOPs per image (torch's FlopCounterMode) and the GFLOP/s achieved.

The reference is the same network with the straightforward maths of the published fallback path:
one kernel per sample and a grouped convolution (``fused_modconv="grouped"``), upsampling by zero
insertion then FIR filtering, downsampling by convolving at full resolution then subsampling.
Both run in this process on the same weights, so the ratio is what our implementation gains.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from bench_stylegan2_ops import _time  # best of `repeats` after a warm-up
from torch.utils.flop_counter import FlopCounterMode

from cfexplain.nn import stylegan2, stylegan2_ops
from cfexplain.nn.stylegan2 import Discriminator, Generator
from cfexplain.nn.stylegan2_ops import upfirdn2d

AUTO32 = dict(z_dim=512, w_dim=512, mapping_layers=2, channel_base=16384, channel_max=512)


def configs() -> dict[str, tuple[dict, dict, int]]:
    """``name -> (G kwargs, D kwargs, resolution)``; cpu_demo read from the shipped config."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+dataset=knee"])
    g = OmegaConf.to_container(cfg.generator, resolve=True)
    strip = lambda d: {k: v for k, v in d.items() if k != "_target_"}  # noqa: E731
    res = int(cfg.data.resolution)
    return {
        "cpu_demo": (strip(g["G"]), strip(g["D"]), res),
        "auto32": (AUTO32, dict(channel_base=16384, channel_max=512), 32),
    }


# ----------------------------------------------------------------------------- reference maths


def _ref_conv2d_resample(x, weight, f=None, up=1, down=1, padding=0, groups=1, bias=None):
    if up > 1:  # zero insertion + FIR at the high resolution, then a true convolution there
        q = f.shape[0]
        p0, p1 = padding + (q + 1) // 2, padding + (q - 2) // 2
        x = upfirdn2d(x, f, up=2, padding=(p0, p1, p0, p1), gain=4)
        return F.conv2d(x, weight.flip([2, 3]), bias, groups=groups)
    if down > 1:  # FIR, convolve at full resolution, keep every second sample
        q = f.shape[0]
        p0, p1 = padding + (q - 1) // 2, padding + (q - 2) // 2
        y = F.conv2d(upfirdn2d(x, f, padding=(p0, p1, p0, p1)), weight, bias, groups=groups)
        return y[:, :, ::2, ::2]
    return F.conv2d(x, weight, bias, padding=padding, groups=groups)


def _ref_upsample2d(x, f):
    q = f.shape[0]
    return upfirdn2d(x, f, up=2, padding=((q + 1) // 2, (q - 2) // 2) * 2, gain=4)


def _ref_downsample2d(x, f):
    q = f.shape[0]
    return upfirdn2d(x, f, padding=((q - 1) // 2, (q - 2) // 2) * 2)[:, :, ::2, ::2]


@contextlib.contextmanager
def reference_maths() -> Iterator[None]:
    """Swap the fast resampling paths for the straightforward ones in both modules."""
    swaps = {
        "conv2d_resample": _ref_conv2d_resample,
        "upsample2d": _ref_upsample2d,
        "downsample2d": _ref_downsample2d,
    }
    saved = [
        (m, k, getattr(m, k)) for m in (stylegan2, stylegan2_ops) for k in swaps if hasattr(m, k)
    ]
    try:
        for m, k, _ in saved:
            setattr(m, k, swaps[k])
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


# ----------------------------------------------------------------------------- measurements


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench(
    g_kwargs: dict, d_kwargs: dict, res: int, batch: int, repeats: int, reference: bool
) -> dict:
    torch.manual_seed(0)
    mode = "grouped" if reference else "unfused"
    G = Generator(**g_kwargs, img_resolution=res, img_channels=1, fused_modconv=mode)
    D = Discriminator(img_resolution=res, img_channels=1, **d_kwargs)
    z = torch.randn(batch, G.z_dim)
    real = torch.rand(batch, 1, res, res) * 2 - 1

    def infer():
        with torch.no_grad():
            G(z, noise_mode="const")

    def iteration():
        G.zero_grad(set_to_none=True)
        F.softplus(-D(G(z))).mean().backward()
        D.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = G(z)
        (F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()).backward()

    ctx = reference_maths() if reference else contextlib.nullcontext()
    with ctx:
        out = {}
        for name, fn in (("infer", infer), ("iter", iteration)):
            flops = _flops(fn) / batch
            img_s = batch / _time(fn, repeats)
            out[name] = dict(img_s=img_s, gflop_img=flops / 1e9, gflop_s=flops * img_s / 1e9)
        out["Mparams"] = (
            sum(p.numel() for p in G.parameters()) / 1e6,
            sum(p.numel() for p in D.parameters()) / 1e6,
        )
    return out


def check_reference_agrees(g_kwargs: dict, d_kwargs: dict, res: int) -> float:
    """Max |ours - reference| over G and D outputs: both are the same network."""
    torch.manual_seed(0)
    G = Generator(**g_kwargs, img_resolution=res, img_channels=1)
    G_ref = Generator(**g_kwargs, img_resolution=res, img_channels=1, fused_modconv="grouped")
    G_ref.load_state_dict(G.state_dict())
    D = Discriminator(img_resolution=res, img_channels=1, **d_kwargs)
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        a_img = G(z, noise_mode="const")
        a = D(a_img)
        with reference_maths():
            b_img = G_ref(z, noise_mode="const")
            b = D(b_img)
    return max((a_img - b_img).abs().max().item(), (a - b).abs().max().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table = configs()
    ap.add_argument("--configs", nargs="+", default=list(table), choices=list(table))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"device cpu, {torch.get_num_threads()} threads, fp32, batch {args.batch}")
    header = (
        f"{'config':<9} {'impl':<10} {'G/D Mparams':>12} {'infer img/s':>11} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'iter img/s':>10} {'GFLOP/img':>9} {'GFLOP/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in args.configs:
        g_kwargs, d_kwargs, res = table[name]
        err = check_reference_agrees(g_kwargs, d_kwargs, res)
        rows = {}
        for impl, ref in (("reference", True), ("ours", False)):
            r = rows[impl] = bench(g_kwargs, d_kwargs, res, args.batch, args.repeats, ref)
            i, t = r["infer"], r["iter"]
            print(
                f"{name:<9} {impl:<10} {r['Mparams'][0]:>5.2f}/{r['Mparams'][1]:<6.2f} {i['img_s']:>11.1f} "
                f"{i['gflop_img']:>9.2f} {i['gflop_s']:>8.1f} {t['img_s']:>10.2f} {t['gflop_img']:>9.2f} {t['gflop_s']:>8.1f}",
                flush=True,
            )
        speed_i = rows["ours"]["infer"]["img_s"] / rows["reference"]["infer"]["img_s"]
        speed_t = rows["ours"]["iter"]["img_s"] / rows["reference"]["iter"]["img_s"]
        print(
            f"{name:<9} {'ratio':<10} {'':>12} {speed_i:>10.2f}x {'':>9} {'':>8} {speed_t:>9.2f}x   (max |ours - reference| {err:.1e})"
        )


if __name__ == "__main__":
    main()
