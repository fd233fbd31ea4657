"""Encoder E: image → w in the generator's W space (Schutte et al. 2021 invert G with one).

A small residual CNN predicts w as a residual around the mapping network's mean ``w_avg``, in
units of the per-dimension spread ``w_std`` of W: a zero output is the average image, and every
output unit is as large as one typical step in W, which makes training well conditioned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SPACES = ("w", "wplus")


class _ResBlock(nn.Module):
    """``[N, I, r, r] -> [N, O, r/2, r/2]``: two 3x3 convs + a strided 1x1 skip, lrelu, GroupNorm."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(min(8, c_out), c_out),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class Encoder(nn.Module):
    """``x [N, img_channels, R, R] in [-1, 1] -> w [N, num_ws, w_dim]``.

    Args:
        img_resolution: input size R (power of two >= 8).
        img_channels: 1 (radiographs) or 3 (RGB).
        w_dim, num_ws: the generator's W size and number of synthesis inputs.
        space: ``w`` (one w broadcast to all layers) or ``wplus`` (one w per layer).
        width: channels after the stem; doubled at every halving up to ``channel_max``.
        channel_max: channel cap.
    """

    def __init__(
        self,
        img_resolution: int = 64,
        img_channels: int = 1,
        w_dim: int = 128,
        num_ws: int = 10,
        space: str = "w",
        width: int = 32,
        channel_max: int = 256,
    ) -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"encoder.space must be one of {SPACES}, got {space!r}")
        if img_resolution < 8 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 8, got {img_resolution}")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.w_dim, self.num_ws, self.space = w_dim, num_ws, space
        self.stem = nn.Sequential(nn.Conv2d(img_channels, width, 3, padding=1), nn.LeakyReLU(0.2))
        blocks, c = [], width
        for _ in range(int(math.log2(img_resolution)) - 2):  # down to 4x4
            c_out = min(c * 2, channel_max)
            blocks.append(_ResBlock(c, c_out))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        n_out = w_dim * (num_ws if space == "wplus" else 1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 16, 512), nn.LeakyReLU(0.2), nn.Linear(512, n_out)
        )
        nn.init.zeros_(self.head[-1].weight)  # starts at w_avg: the mean image, not noise
        nn.init.zeros_(self.head[-1].bias)
        # Statistics of W, set from the generator before training (and saved with the weights).
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.register_buffer("w_std", torch.ones(w_dim))

    @torch.no_grad()
    def set_w_stats(self, w_avg: torch.Tensor, w_std: torch.Tensor) -> None:
        """Centre and scale of W ``[w_dim]`` each (from ``G.mapping`` samples)."""
        assert w_avg.shape == w_std.shape == (self.w_dim,), "w_avg/w_std must be [w_dim]"
        self.w_avg.copy_(w_avg)
        self.w_std.copy_(w_std.clamp_min(1e-8))

    def normalise(self, w: torch.Tensor) -> torch.Tensor:
        """``(w - w_avg) / w_std``, any shape ending in ``w_dim``: W in units of its spread."""
        return (w - self.w_avg) / self.w_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1:] == (
            self.img_channels,
            self.img_resolution,
            self.img_resolution,
        ), (
            f"expected images [N, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], "
            f"got {tuple(x.shape)}"
        )
        delta = self.head(self.blocks(self.stem(x)))
        delta = delta.view(len(x), -1, self.w_dim).expand(-1, self.num_ws, -1)
        return self.w_avg + self.w_std * delta


def load_generator(stage_dir, device: str | torch.device = "cpu") -> nn.Module:
    """``G_ema`` of a finished ``generator`` stage: eval, frozen, on ``device``."""
    from cfexplain.utils.artifacts import Artifact, load_model

    G = load_model(Artifact.load(stage_dir).path("G_ema"), map_location=device)
    return G.requires_grad_(False)


def load_encoder(stage_dir, device: str | torch.device = "cpu") -> Encoder:
    """The encoder of a finished ``encoder`` stage: eval, frozen, on ``device``."""
    from cfexplain.utils.artifacts import Artifact, load_model

    E = load_model(Artifact.load(stage_dir).path("encoder"), map_location=device)
    return E.requires_grad_(False)
