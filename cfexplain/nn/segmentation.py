"""The built-in segmentation model: a small U-Net, one sigmoid channel per mask (multi-label).

Also the pure maths around it: the training loss (BCE + soft Dice) and Dice per class.
GroupNorm instead of BatchNorm: the output does not depend on the batch (a sensitivity sweep
scores images in batches of any size) and DDP needs no synchronised statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _Block(nn.Sequential):
    """Two 3x3 conv + GroupNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _norm(c_out),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """``x [N, C, H, W] -> logits [N, num_classes, H, W]`` (Ronneberger et al. 2015, small).

    Args:
        in_channels: image channels (1 radiograph, 3 histology).
        num_classes: output channels, one per mask (sigmoid each: masks may overlap).
        width: channels at full resolution; level ``i`` has ``min(width * 2**i, width_max)``.
        levels: 2x downsamplings; H and W must be divisible by ``2**levels``.
        width_max: channel cap of the deepest levels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        width: int = 16,
        levels: int = 3,
        width_max: int = 64,
    ) -> None:
        super().__init__()
        if num_classes < 1 or levels < 1:
            raise ValueError(
                f"UNet needs num_classes >= 1 and levels >= 1, got {num_classes}, {levels}"
            )
        self.in_channels, self.num_classes, self.levels = in_channels, num_classes, levels
        chans = [min(width * 2**i, width_max) for i in range(levels + 1)]
        self.down = nn.ModuleList(
            [_Block(in_channels, chans[0])]
            + [_Block(chans[i], chans[i + 1]) for i in range(levels)]
        )
        self.up = nn.ModuleList(
            [nn.Conv2d(chans[i + 1], chans[i], 1) for i in reversed(range(levels))]
        )
        self.fuse = nn.ModuleList([_Block(2 * chans[i], chans[i]) for i in reversed(range(levels))])
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        assert x.ndim == 4 and x.shape[1] == self.in_channels, (
            f"expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
        )
        k = 2**self.levels
        assert x.shape[-2] % k == 0 and x.shape[-1] % k == 0, (
            f"UNet with {self.levels} levels needs H and W divisible by {k}, got {tuple(x.shape[-2:])}"
        )
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            h = up(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False))
            h = fuse(torch.cat([h, skips.pop()], dim=1))
        return self.head(h)


# ----------------------------------------------------------------------------- maths


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Mean over classes of ``1 - soft Dice`` (pooled over the batch): logits, targets ``[N, K, H, W]``.

    Pooling over the batch keeps a class that is absent from most images from dominating.
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    inter = (p * t).sum(dim=(0, 2, 3))
    total = p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def segmentation_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0) -> Tensor:
    """Binary cross-entropy per pixel and class + ``dice_weight`` · soft Dice; ``[N, K, H, W]``."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce + dice_weight * soft_dice_loss(logits, target)


def dice_scores(pred: Tensor, truth: Tensor) -> Tensor:
    """Dice ``2|P∩T| / (|P| + |T|)`` per image and class ``[N, K]`` of bool masks ``[N, K, H, W]``.

    NaN where both masks are empty (nothing to find, nothing found: undefined, left out of means).
    """
    assert pred.shape == truth.shape and pred.ndim == 4, (
        f"pred {tuple(pred.shape)} and truth {tuple(truth.shape)} must both be [N, K, H, W]"
    )
    p, t = pred.bool(), truth.bool()
    inter = (p & t).sum(dim=(2, 3)).double()
    total = (p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, math.nan))


def predict_masks(logits: Tensor, activation: str = "sigmoid", threshold: float = 0.5) -> Tensor:
    """Bool masks ``[N, K, H, W]`` from logits: sigmoid > threshold (multi-label) or one-hot argmax (softmax)."""
    if activation == "sigmoid":
        return torch.sigmoid(logits.float()) > threshold
    if activation == "softmax":
        return F.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).bool()
    raise ValueError(f"activation must be sigmoid or softmax, got {activation!r}")


def load_segmentation(stage_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The U-Net of a finished ``segmentation`` stage, eval mode, ``[N,C,H,W] -> logits [N,K,H,W]``."""
    from cfexplain.utils.artifacts import Artifact, load_model

    art = Artifact.load(stage_dir)
    return load_model(art.path("weights"), map_location=device).eval()
