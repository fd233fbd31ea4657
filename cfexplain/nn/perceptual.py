"""Perceptual distance (LPIPS, Zhang et al. 2018) that never downloads anything.

``auto`` takes classic LPIPS-AlexNet (``lpips`` package) when the torchvision AlexNet ImageNet
weights are already on disk (torch hub cache or ``CFEXPLAIN_ALEXNET_WEIGHTS``); otherwise the
shift-tolerant LPIPS (``stlpips_pytorch``), whose wheel carries its whole trained network.
``random`` keeps the trained linear heads on an untrained backbone: for tests only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("auto", "lpips_alex", "stlpips_alex", "random")
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_ENV = "CFEXPLAIN_ALEXNET_WEIGHTS"
# AlexNet's strides need this many pixels; smaller images are upsampled before the distance.
MIN_SIZE = 32


def alexnet_weights_path() -> Path | None:
    """The ImageNet AlexNet weights file if it is on disk (env var first, then the hub cache)."""
    env = os.environ.get(ALEXNET_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{ALEXNET_ENV}={env}: no such file")
        return Path(env)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return cached if cached.is_file() else None


class Perceptual(nn.Module):
    """``forward(x, y) -> [N]`` LPIPS distance of images ``[N, 1|3, H, W]`` in [-1, 1].

    Frozen (eval, no parameter gradients) but differentiable with respect to its inputs.
    ``kind`` is the network actually used, ``note`` says where its weights came from.
    """

    def __init__(self, net: nn.Module, kind: str, note: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.kind, self.note = kind, note
        self.eval()

    def train(self, mode: bool = True) -> Perceptual:
        return super().train(False)  # dropout in the LPIPS heads must stay off

    @staticmethod
    def _prepare(x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] in (1, 3), (
            f"expected images [N, 1|3, H, W], got {tuple(x.shape)}"
        )
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if min(x.shape[-2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[N]`` distances between ``x`` and ``y`` (same shape ``[N, C, H, W]``)."""
        assert x.shape == y.shape, f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        return self.net(self._prepare(x), self._prepare(y)).flatten()

    def spatial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` per-pixel distance map (its spatial mean is ``forward``)."""
        assert x.shape == y.shape, f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        self.net.spatial = True
        try:
            d = self.net(self._prepare(x), self._prepare(y))
        finally:
            self.net.spatial = False
        if d.shape[-2:] != x.shape[-2:]:
            d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return d


def build_perceptual(kind: str = "auto", device: str | torch.device | None = None) -> Perceptual:
    """The perceptual distance of ``kind`` (see the module docstring), on ``device``."""
    if kind not in KINDS:
        raise ValueError(f"perceptual kind must be one of {KINDS}, got {kind!r}")
    alex = alexnet_weights_path() if kind in ("auto", "lpips_alex") else None
    if kind == "lpips_alex" and alex is None:
        raise FileNotFoundError(
            f"perceptual=lpips_alex needs the ImageNet AlexNet weights at "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / ALEXNET_FILE} or in ${ALEXNET_ENV}; "
            "nothing is downloaded: copy the file there, or use perceptual=stlpips_alex"
        )
    if alex is not None:
        module = Perceptual(
            _classic_lpips(alex), "lpips_alex", f"LPIPS-AlexNet v0.1, backbone {alex}"
        )
    elif kind == "random":
        module = Perceptual(
            _random_lpips(), "random", "LPIPS heads on an UNTRAINED AlexNet (tests only)"
        )
        warnings.warn("perceptual=random: distances come from an untrained network", stacklevel=2)
    else:
        net, path = _shift_tolerant_lpips()
        note = f"shift-tolerant LPIPS-AlexNet (stlpips_pytorch), weights {path}"
        if kind == "auto":
            note += (
                f"; classic LPIPS not used: no {ALEXNET_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
                f" and ${ALEXNET_ENV} unset"
            )
            warnings.warn(f"perceptual=auto fell back: {note}", stacklevel=2)
        module = Perceptual(net, "stlpips_alex", note)
    return module.to(device) if device is not None else module


def _quiet():
    """The LPIPS constructors print; keep them off stdout."""
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115


def _classic_lpips(weights: Path) -> nn.Module:
    import lpips

    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand=True: torchvision builds AlexNet without fetching; we load the local file.
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    own = net.net.state_dict()
    # lpips slices torchvision's ``features`` keeping its indices: slice<k>.<i>.* = features.<i>.*
    mapped = {k: state[f"features.{k.split('.', 1)[1]}"] for k in own}
    net.net.load_state_dict(mapped)
    return net


def _random_lpips() -> nn.Module:
    import lpips

    with _quiet(), warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # the same "random" network every time: tests stay reproducible
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)


def _shift_tolerant_lpips() -> tuple[nn.Module, Path]:
    from stlpips_pytorch import stlpips

    path = Path(stlpips.__file__).parent / "weights" / "vST0.0" / "alex_shift_tolerant.pth"
    if not path.is_file():
        raise FileNotFoundError(f"stlpips_pytorch is installed without its weights file {path}")
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = stlpips.LPIPS(net="alex", variant="shift_tolerant", pretrained=False, verbose=False)
    # Strict load: the file holds backbone and heads; a silent partial load would be random.
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("lins.")]  # aliases of lin0..lin4
    if missing or unexpected:
        raise RuntimeError(f"{path}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return net, path


class FixedFeatures(nn.Module):
    """A feature network that is the same in every installation: the backbone of the
    shift-tolerant LPIPS AlexNet, whose trained weights ship inside the ``stlpips_pytorch``
    wheel. ``forward(x [N, 1|3, H, W] in [-1, 1]) -> [N, 1152]``: the spatial mean of each of
    its five stages (64 + 192 + 384 + 256 + 256 channels), images resized to ``size`` first.

    It is a yardstick for generated images that does not move with the run's classifier.
    """

    def __init__(self, size: int = 128) -> None:
        super().__init__()
        net, self.weights = _shift_tolerant_lpips()
        self.scaling, self.trunk = net.scaling_layer, net.net
        self.size = int(size)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FixedFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] in (1, 3), (
            f"expected images [N, 1|3, H, W], got {tuple(x.shape)}"
        )
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        stages = self.trunk(self.scaling(x))
        return torch.cat([s.mean(dim=(2, 3)) for s in stages], dim=1)
