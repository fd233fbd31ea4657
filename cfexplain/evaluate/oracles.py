"""Factor oracles: small CNNs that read the knee phantom's factors back from an image.

A counterfactual is judged by what it changed. The phantom knows every factor of the images it
renders, so a regressor trained on freshly rendered phantoms can read the factors of any image
(a real one, a reconstruction G(E(x)) or a counterfactual frame) in the factor's own units.

Factors (names of ``KneePhantom`` factors, plus the derived ``jsw_min``):

- ``CAUSAL``: what the KL grade depends on (:func:`cfexplain.data.phantoms.knee.kl_grade`):
  the narrower joint space ``jsw_min = min(jsw_medial, jsw_lateral)``, ``osteophyte``,
  ``sclerosis`` and ``deformity``. ``jsw_min`` stands for both compartments, so joint-space
  narrowing counts once in the causal/nuisance ratio;
- ``NUISANCE``: acquisition factors drawn independently of disease, and the burned-in marker.

Continuous factors are regressed on standardised targets and de-standardised at the output
(mean and std are buffers, so they travel with the weights); ``BINARY`` factors come out as
probabilities.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cfexplain.utils.images import gaussian_blur

CAUSAL = ("jsw_min", "osteophyte", "sclerosis", "deformity")
NUISANCE = ("rotation", "exposure", "laterality", "marker")
BINARY = ("laterality", "marker")
DEFAULT_FACTORS = CAUSAL + NUISANCE
DERIVED = {"jsw_min": ("jsw_medial", "jsw_lateral")}

# The oracle's phantoms use the seed ``ORACLE_SEED_OFFSET + seed``: a run's data (``data.seed``,
# small integers in practice) draws its train/val/test images from other seed sequences, so the
# oracle never sees, nor is tested on, the images it will be asked about.
ORACLE_SEED_OFFSET = 7_000_003
WEIGHTS_FILE = "oracle.safetensors"
INFO_FILE = "oracle.json"
# Bumped when training changes in a way the train kwargs do not show: old caches retrain.
ORACLE_VERSION = 1


def factor_value(factors: Mapping[str, float], name: str) -> float:
    """One factor of a phantom sample's ``meta["factors"]``, derived ones included."""
    if name == "jsw_min":
        return min(float(factors["jsw_medial"]), float(factors["jsw_lateral"]))
    if name not in factors:
        raise KeyError(
            f"unknown oracle factor {name!r}; expected one of {sorted([*factors, *DERIVED])}"
        )
    return float(factors[name])


class FactorOracle(nn.Module):
    """``x [N, C, H, W] in [-1, 1] -> factors [N, F]`` in the factors' own units.

    Args:
        channels: image channels.
        resolution: image side H = W (a power of two >= 16); the head reads a 4x4 map, so where
            things are (rotation, laterality, marker corner) is not pooled away.
        factors: names, in output order (see the module docstring); ``BINARY`` ones are
            probabilities.
        width: channels of the stem; each stride-2 stage doubles them, up to ``8 * width``.
        hidden: units of the hidden layer of the head.
    """

    # Buffers: which factors are binary [F] bool, and the continuous targets' mean and std [F].
    binary: Tensor
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 64,
        factors: Sequence[str] = DEFAULT_FACTORS,
        width: int = 8,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if resolution < 16 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {resolution}")
        if not factors or len(set(factors)) != len(factors):
            raise ValueError(f"factors must be distinct names, got {list(factors)}")
        self.channels, self.resolution = int(channels), int(resolution)
        self.factors = list(factors)
        layers: list[nn.Module] = [_conv(channels, width, stride=1)]
        c = width
        for i in range(int(math.log2(resolution)) - 2):
            c_out = width * 2 ** min(i + 1, 3)
            layers += [_conv(c, c_out, stride=2), _conv(c_out, c_out, stride=1)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, len(factors)),
        )
        binary = torch.tensor([f in BINARY for f in self.factors])
        self.register_buffer("binary", binary, persistent=False)
        # Standardisation of the continuous targets (binary factors: 0 and 1, untouched).
        self.register_buffer("mean", torch.zeros(len(factors)))
        self.register_buffer("std", torch.ones(len(factors)))

    @property
    def change_scale(self) -> Tensor:
        """``[F]`` unit of a factor change: the factor's std for continuous factors, 1 for binary
        ones (a change of probability)."""
        return torch.where(self.binary, torch.ones_like(self.std), self.std)

    def raw(self, x: Tensor) -> Tensor:
        """``[N, F]`` standardised regressions and binary logits (what training fits)."""
        assert x.ndim == 4 and x.shape[1:] == (self.channels, self.resolution, self.resolution), (
            f"expected images [N, {self.channels}, {self.resolution}, {self.resolution}], got {tuple(x.shape)}"
        )
        return self.head(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        z = self.raw(x)
        return torch.where(self.binary, torch.sigmoid(z), z * self.std + self.mean)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------- data


def phantom_factors(
    n: int,
    resolution: int,
    seed: int,
    split: str,
    factors: Sequence[str],
    shortcut_rate: float = 0.0,
    decorrelate: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(images [n, 1, R, R], targets [n, F])`` of knee phantoms with seed ``seed`` (as given:
    the caller adds :data:`ORACLE_SEED_OFFSET`).

    ``decorrelate``: every disease factor group (both joint-space widths together, osteophyte,
    sclerosis, deformity) is taken from another sample, drawn by its own permutation, and the
    image re-rendered with it (:meth:`KneePhantom.render`). The phantom drives all disease
    factors by one severity; without this, an oracle could read the osteophyte from the joint
    space and report changes that a counterfactual did not make.
    """
    from cfexplain.data.phantoms.knee import DISEASE_GROUPS, SPLITS, KneePhantom

    ds = KneePhantom(
        n, resolution, seed=seed, split=split, shortcut_rate=shortcut_rate, cache=False
    )
    groups = DISEASE_GROUPS
    rng = np.random.default_rng([seed, 97, SPLITS[split]])
    donors = [rng.permutation(n) for _ in groups] if decorrelate else []
    images, targets = [], []
    for i in tqdm(range(n), desc=f"oracle: render {split}", unit="img", disable=not progress):
        if decorrelate:
            overrides = {}
            for group, perm in zip(groups, donors):
                donor, _ = ds.params(int(perm[i]))
                overrides.update({k: donor[k] for k in group})
            s = ds.render(i, overrides)
        else:
            s = ds[i]
        images.append(s["image"])
        targets.append([factor_value(s["meta"]["factors"], f) for f in factors])
    return torch.stack(images), torch.tensor(targets, dtype=torch.float32)


def _lr(step: int, steps: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 1% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))))


def oracle_loss(oracle: FactorOracle, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error on standardised continuous targets plus binary cross-entropy, each
    averaged over its factors: ``x [N, C, H, W]``, ``y [N, F]`` in factor units."""
    z = oracle.raw(x)
    b = oracle.binary
    loss = z.new_zeros(())
    if (~b).any():
        loss = loss + F.mse_loss(z[:, ~b], ((y - oracle.mean) / oracle.std)[:, ~b])
    if b.any():
        loss = loss + F.binary_cross_entropy_with_logits(z[:, b], y[:, b])
    return loss


@torch.no_grad()
def _predict(oracle: FactorOracle, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([oracle(b) for b in x.split(batch)])


def oracle_metrics(oracle: FactorOracle, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """Per factor on held-out images ``x [N, C, H, W]`` with truth ``y [N, F]``: R² and MAE
    (factor units) for continuous factors, accuracy at 0.5 for binary ones, and ``factor_std``
    (the truth's std: the unit of standardised changes of continuous factors)."""
    was = oracle.training
    oracle.eval()
    pred = _predict(oracle, x.to(oracle.mean.device)).cpu()
    oracle.train(was)
    out = {}
    for j, name in enumerate(oracle.factors):
        t, p = y[:, j].double(), pred[:, j].double()
        m: dict[str, float] = {"factor_std": float(t.std())}
        if name in BINARY:
            m["accuracy"] = float(((p > 0.5) == (t > 0.5)).double().mean())
        else:
            sst = (t - t.mean()).square().sum()
            m["r2"] = float(1.0 - (p - t).square().sum() / sst.clamp_min(1e-300))
            m["mae"] = float((p - t).abs().mean())
        out[name] = m
    return out


# ----------------------------------------------------------------------------- training


def train_oracle(
    *,
    resolution: int = 64,
    n_train: int = 5000,
    n_test: int = 1000,
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    shortcut_rate: float = 0.0,
    factors: Sequence[str] = DEFAULT_FACTORS,
    width: int = 8,
    hidden: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augment_blur: float = 1.0,
    decorrelate: bool = True,
    progress: bool = True,
) -> tuple[FactorOracle, dict[str, Any]]:
    """Train a :class:`FactorOracle` on freshly rendered knee phantoms.

    Train images are split ``train``, held-out ones split ``test``, both of seed
    ``ORACLE_SEED_OFFSET + seed``. ``shortcut_rate`` 0 keeps the marker independent of disease,
    so the oracle cannot read one through the other. ``augment_blur``: half of each batch is
    blurred with a Gaussian of sigma ~ U(0, augment_blur) pixels, because generated images are
    softer than rendered ones (0 turns it off). ``decorrelate``: disease factors of the
    training images are mixed across samples (see :func:`phantom_factors`).

    Returns ``(oracle in eval mode, metrics)``: ``metrics["factors"][name]`` as
    :func:`oracle_metrics` on the held-out images, and the same on them blurred by 0.75 px
    (``metrics["factors_blurred"]``), a check of robustness to soft images.
    """
    from cfexplain.utils.distributed import resolve_device

    device = resolve_device(str(device))
    factors = list(factors)
    t0 = time.perf_counter()
    data_seed = ORACLE_SEED_OFFSET + int(seed)
    x_tr, y_tr = phantom_factors(
        n_train, resolution, data_seed, "train", factors, shortcut_rate, decorrelate, progress
    )
    # Held out on the phantom's own (correlated) distribution: the images it will be asked about.
    x_te, y_te = phantom_factors(
        n_test, resolution, data_seed, "test", factors, shortcut_rate, False, progress
    )
    t_data = time.perf_counter() - t0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        oracle = FactorOracle(1, resolution, factors, width=width, hidden=hidden)
    cont = ~oracle.binary
    oracle.mean.copy_(torch.where(cont, y_tr.mean(0), torch.zeros(len(factors))))
    oracle.std.copy_(torch.where(cont, y_tr.std(0).clamp_min(1e-8), torch.ones(len(factors))))
    final_loss = _fit_oracle(
        oracle,
        x_tr,
        y_tr,
        device=device,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        weight_decay=weight_decay,
        augment_blur=augment_blur,
        progress=progress,
    )
    blurred = gaussian_blur(x_te, torch.full((n_test,), 0.75))
    return oracle, {
        "factors": oracle_metrics(oracle, x_te, y_te),
        "factors_blurred": oracle_metrics(oracle, blurred, y_te),
        "n_train": n_train,
        "n_test": n_test,
        "steps": steps,
        "final_loss": final_loss,
        "data_seconds": t_data,
        "train_seconds": time.perf_counter() - t0 - t_data,
        "device": str(device),
    }


def _fit_oracle(
    oracle: FactorOracle,
    x_tr: Tensor,
    y_tr: Tensor,
    *,
    device: torch.device,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float,
    weight_decay: float,
    augment_blur: float,
    progress: bool,
) -> float:
    """AdamW on batches of ``x_tr [N, 1, R, R]`` and truth ``y_tr [N, F]``, half of each batch
    blurred; leaves the oracle on ``device`` in eval mode and returns the last loss (nan when
    ``steps`` is 0)."""
    from cfexplain.utils.seeding import Stream, generator

    oracle.to(device).train()
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=weight_decay)
    loss = None
    bar = tqdm(range(steps), desc="oracle: train", unit="step", disable=not progress)
    for step in bar:
        g = generator(seed, Stream.ORACLE_STEP, step)
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=g).to(device)
        x, y = x_tr[idx], y_tr[idx]
        if augment_blur > 0:
            sigma = torch.rand(batch_size, generator=g) * augment_blur
            sigma = torch.where(torch.rand(batch_size, generator=g) < 0.5, sigma, 0.0)
            x = gaussian_blur(x, sigma.to(device))
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = oracle_loss(oracle, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    oracle.eval()
    return float(loss.item()) if loss is not None else math.nan


def _normalised_kwargs(train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Train kwargs with defaults filled in, so passing a default or omitting it agree."""
    sig = inspect.signature(train_oracle)
    unknown = set(train_kwargs) - set(sig.parameters)
    if unknown:
        raise TypeError(
            f"fit_or_load: unknown train_oracle arguments {sorted(unknown)}; expected {list(sig.parameters)}"
        )
    bound = sig.bind(**train_kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out["factors"] = list(out["factors"])
    return out


def fit_or_load(folder: str | Path, **train_kwargs: Any) -> tuple[FactorOracle, dict[str, Any]]:
    """The oracle cached in ``folder`` when it was trained with the same kwargs, else a new one
    (trained by :func:`train_oracle` and cached there).

    ``folder`` holds ``oracle.safetensors`` (weights and constructor kwargs) and ``oracle.json``
    (metrics, the kwargs and their fingerprint). ``device`` and ``progress`` are left out of the
    fingerprint: where an oracle was trained does not change what it is. Returns
    ``(oracle, info)`` with ``info["reused"]`` saying which happened.
    """
    from cfexplain.utils.artifacts import fingerprint, load_model, save_model, write_json
    from cfexplain.utils.distributed import resolve_device

    folder = Path(folder)
    kwargs = _normalised_kwargs(train_kwargs)
    device = resolve_device(str(kwargs["device"]))
    identity = {k: v for k, v in kwargs.items() if k not in ("device", "progress")}
    fp = fingerprint({"version": ORACLE_VERSION, **identity})
    weights, info_file = folder / WEIGHTS_FILE, folder / INFO_FILE
    if weights.is_file() and info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
        except json.JSONDecodeError:
            info = {}  # a damaged cache is retrained, not trusted
        if info.get("fingerprint") == fp:
            oracle = load_model(weights, map_location=device)
            assert isinstance(oracle, FactorOracle), f"{weights} holds a {type(oracle).__name__}"
            return oracle, {**info, "reused": True}
    oracle, metrics = train_oracle(**kwargs)
    ctor = {
        "channels": oracle.channels,
        "resolution": oracle.resolution,
        "factors": oracle.factors,
        "width": kwargs["width"],
        "hidden": kwargs["hidden"],
    }
    # Weights first, then the JSON naming their fingerprint: a crash in between leaves a JSON
    # that does not match, so the next call retrains.
    info_file.unlink(missing_ok=True)
    save_model(weights, oracle, f"{FactorOracle.__module__}.FactorOracle", ctor)
    info = {
        "fingerprint": fp,
        "train_kwargs": {**identity, "device": str(device)},
        "factors": oracle.factors,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(info_file, info)
    return oracle, {**info, "reused": False}
