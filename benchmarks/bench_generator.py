"""Generator speed: our StyleGAN2 against a straightforward reference of the same network.

    python benchmarks/bench_generator.py [--configs cpu_demo auto32] [--batch 16] [--repeats 3]
    python benchmarks/bench_generator.py --train [--baseline f2970dc] [--rounds 8] [overrides...]

For each configuration (``cpu_demo``: the generator block of the default preset at 64 px; ``auto32``:
the published ``auto`` configuration at 32 px, channel_base 16384, channel_max 512, 2 mapping
layers, 1 channel) it prints G inference img/s (noise const, no grad) and training-iteration
img/s (G phase: z -> G -> D -> loss -> backward; D phase: fakes and reals -> D -> loss ->
backward), with FLOPs per image (torch's FlopCounterMode) and the GFLOP/s achieved.

The reference is the same network with the straightforward maths of the published fallback path:
one kernel per sample and a grouped convolution (``fused_modconv="grouped"``), upsampling by zero
insertion then FIR filtering, downsampling by convolving at full resolution then subsampling.
Both run in this process on the same weights, so the ratio is what our implementation gains.

``--train``: s/kimg of whole training iterations of the generator stage at ``cpu_demo`` (its
own ``_iteration`` and ``_advance``: G phase, D phase with lazy R1, ADA at ``--p`` (0.2; the
shipped knee runs stay below 0.01, where the pipe draws nothing in most steps), EMA; a
fixed random batch of reals stands in for the data) with the networks and optimisers the stage
builds (in its configured phase order: ``generator.shared_fakes=true`` as an override runs one G
pass per iteration), against the same loop on the baseline commit's networks (its ``stylegan2.py`` and
``stylegan2_ops.py`` read from git, loaded as modules) with its contiguous layout and per-tensor
Adam, scoring reals and fakes in two discriminator passes; the baseline's training iteration
equals the published code's. Both get the same initial weights; blocks of 10 iterations
alternate between them, ``--rounds`` times, and the best and median s/kimg are reported, with
the GFLOP/s each achieves against this machine's conv2d peak (a 128-channel 3x3 convolution at
32 px, batch 16, forward and backward) measured in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

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


# ----------------------------------------------------------------------------- training steps


def _module_at(ref: str, path: str, name: str, rename: dict[str, str]) -> types.ModuleType:
    """``path`` as it was at commit ``ref``, loaded as module ``name`` (imports renamed)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    for old, new in rename.items():
        src = src.replace(old, new)
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    exec(compile(src, f"{ref}:{path}", "exec"), mod.__dict__)
    return mod


class _SeparatePasses(torch.nn.Module):
    """A discriminator without ``parts`` scoring each part in a pass of its own, as the published
    loop does (reals, then fakes)."""

    def __init__(self, D: torch.nn.Module) -> None:
        super().__init__()
        self.D = D

    def forward(self, img: torch.Tensor, parts: int = 1) -> torch.Tensor:
        return torch.cat([self.D(x) for x in img.chunk(parts)])


def _baseline_gan(ref: str, ours, cfg, d):
    """The stage's ``_GAN`` rebuilt on commit ``ref``'s networks with the same weights, in the
    contiguous layout, with per-tensor Adam (that commit's optimisers)."""
    import copy
    import dataclasses

    ops = _module_at(ref, "cfexplain/nn/stylegan2_ops.py", "_baseline_stylegan2_ops", {})
    net = _module_at(
        ref,
        "cfexplain/nn/stylegan2.py",
        "_baseline_stylegan2",
        {"cfexplain.nn.stylegan2_ops": ops.__name__},
    )
    G = net.Generator(**ours.g_kwargs).to(d.device)
    D = net.Discriminator(**ours.d_kwargs).to(d.device)
    G.load_state_dict(ours.G.state_dict())
    D.load_state_dict(ours.D.state_dict())
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    D = _SeparatePasses(D)

    def adam(module, opt):
        group = opt.param_groups[0]
        return torch.optim.Adam(module.parameters(), lr=group["lr"], betas=group["betas"], eps=1e-8)

    return dataclasses.replace(
        ours,
        G=G,
        D=D,
        G_ema=G_ema,
        augment=copy.deepcopy(ours.augment),
        G_opt=adam(G, ours.G_opt),
        D_opt=adam(D, ours.D_opt),
    )


def conv_peak(repeats: int = 5) -> float:
    """GFLOP/s of a 128-channel 3x3 convolution at 32 px, batch 16, forward and backward: what
    this machine's convolutions reach on a shape they like."""
    x = torch.randn(16, 128, 32, 32, requires_grad=True)
    w = torch.randn(128, 128, 3, 3, requires_grad=True)
    layouts = {}
    for name, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        xs, ws = x.detach().contiguous(memory_format=fmt), w.detach().contiguous(memory_format=fmt)
        xs.requires_grad_(True), ws.requires_grad_(True)

        def fn(xs=xs, ws=ws):
            F.conv2d(xs, ws, padding=1).sum().backward()

        layouts[name] = _flops(fn) / _time(fn, repeats) / 1e9
    return max(layouts.values())


def bench_train(
    ref: str, rounds: int, p: float = 0.2, block: int = 10, overrides: tuple[str, ...] = ()
) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from cfexplain.stages import generator as stage
    from cfexplain.utils import distributed

    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+dataset=knee", *overrides])
    d = distributed.setup("cpu")
    g = cfg.generator
    res, batch = int(cfg.data.resolution), int(g.batch_size)
    runs = {"ours": stage._build(cfg, d)}
    runs[ref] = _baseline_gan(ref, runs["ours"], cfg, d)
    torch.manual_seed(0)
    real = torch.rand(batch, int(cfg.data.channels), res, res) * 2 - 1
    z = torch.randn(4, runs["ours"].G.z_dim)
    with torch.no_grad():  # the same network: same images and logits from the same weights
        a, b = (runs[k].G(z, noise_mode="const") for k in ("ours", ref))
        agree = max(
            (a - b).abs().max().item(), (runs["ours"].D(a) - runs[ref].D(a)).abs().max().item()
        )
    steps = {}
    for name, t in runs.items():
        t.augment.p.fill_(p)
        s = stage._start()
        # The baseline runs the published loop: G phase, then D phase on a second pass of G.
        gn = g if name == "ours" else OmegaConf.merge(g, {"shared_fakes": False})
        phases = stage._phases(gn, t, s, d)

        def step(t=t, s=s, phases=phases, gn=gn) -> None:
            b = stage._Batch(real.clone(), torch.randn(batch, t.G.z_dim))
            stage._run_phases(gn, t, phases, b, s["step"], d)
            stage._advance(gn, t, s, b, d)

        steps[name] = step
    for fn in steps.values():  # warm-up; step 0 runs R1, which FlopCounterMode cannot follow
        for _ in range(3):
            fn()
    flops = {name: _flops(fn) for name, fn in steps.items()}  # an iteration without R1
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            seconds[name].append((time.perf_counter() - t0) / block)
    peak = conv_peak()
    print(
        f"generator training iteration, cpu_demo ({res} px, batch {batch}, ADA p = {p:g}, "
        f"{torch.get_num_threads()} threads), {rounds} x {block} iterations each, alternating"
    )
    print(f"conv2d peak of this machine: {peak:.1f} GFLOP/s; max |ours - {ref}| {agree:.1e}")
    print(
        f"{'impl':<10} {'s/kimg best':>11} {'median':>8} {'GFLOP/iter':>10} {'GFLOP/s':>8} {'of peak':>8}"
    )
    for name, v in seconds.items():
        per_kimg = [x * 1000 / batch for x in v]
        rate = flops[name] / min(v) / 1e9
        print(
            f"{name:<10} {min(per_kimg):>11.2f} {statistics.median(per_kimg):>8.2f} "
            f"{flops[name] / 1e9:>10.2f} {rate:>8.1f} {rate / peak:>7.0%}"
        )
    base, ours = seconds[ref], seconds["ours"]
    print(
        f"ratio {ref} / ours: {min(base) / min(ours):.2f}x best, "
        f"{statistics.median(base) / statistics.median(ours):.2f}x median (fewer s/kimg)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table = configs()
    ap.add_argument("--configs", nargs="+", default=list(table), choices=list(table))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", action="store_true", help="whole training iterations (s/kimg)")
    ap.add_argument("--baseline", default="f2970dc", help="commit whose networks --train runs")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--p", type=float, default=0.2, help="--train: ADA augmentation probability")
    ap.add_argument(
        "overrides", nargs="*", help="--train: config overrides (generator.batch_size=16)"
    )
    args = ap.parse_args()
    if args.train:
        bench_train(args.baseline, args.rounds, args.p, overrides=tuple(args.overrides))
        return
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
