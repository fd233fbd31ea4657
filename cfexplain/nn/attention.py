"""Trainable attention (Jetley et al. 2018, "Learn to Pay Attention"), parametrised compatibility.

Local features ``l_i`` of one stage (projected to the global feature's size) meet the global
feature ``g``: ``c_i = <u, l_i + g>``, ``a = softmax_i(c)`` over the spatial positions, and the
attended descriptor ``g_a = sum_i a_i l_i``. The classifier concatenates ``g_a`` of every level
and feeds that to its linear head, so the maps are what the decision is actually built from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def spatial_softmax(c: Tensor) -> Tensor:
    """Compatibility scores ``[N, 1, h, w]`` -> attention ``[N, 1, h, w]``, >= 0, summing to 1 per image."""
    assert c.ndim == 4 and c.shape[1] == 1, f"expected scores [N, 1, h, w], got {tuple(c.shape)}"
    return torch.softmax(c.flatten(1), dim=1).view_as(c)


def attend(local: Tensor, a: Tensor) -> Tensor:
    """``g_a = sum_i a_i l_i``: local features ``[N, C, h, w]``, attention ``[N, 1, h, w]`` -> ``[N, C]``."""
    assert local.shape[-2:] == a.shape[-2:] and a.shape[1] == 1, (
        tuple(local.shape),
        tuple(a.shape),
    )
    return (local * a).sum((2, 3))


class AttentionEstimator(nn.Module):
    """``(local [N, C_l, h, w], g [N, C_g]) -> (a [N, 1, h, w], g_a [N, C_g])``.

    Args:
        local_channels: channels of the stage whose output is attended.
        global_channels: size of the global feature ``g``; a 1x1 convolution (no bias) projects
            the local features to it when the sizes differ.
    """

    def __init__(self, local_channels: int, global_channels: int) -> None:
        super().__init__()
        self.project = (
            nn.Conv2d(local_channels, global_channels, 1, bias=False)
            if local_channels != global_channels
            else nn.Identity()
        )
        # The learnt vector u of c_i = <u, l_i + g>, as a 1x1 convolution to one channel.
        self.u = nn.Conv2d(global_channels, 1, 1, bias=False)

    def forward(self, local: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        l_proj = self.project(local)
        assert g.shape == l_proj.shape[:2], (tuple(g.shape), tuple(l_proj.shape))
        a = spatial_softmax(self.u(l_proj + g[:, :, None, None]))
        return a, attend(l_proj, a)


def upsampled_attention(maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Levels ``[N, 1, h_s, w_s]`` -> one map ``[N, 1, H, W]``: each level upsampled, rescaled to sum
    to 1 over the ``H x W`` pixels, then averaged, so the result sums to 1 per image.

    Rescaling first matters: a coarse level's cells are larger, so its raw values are larger and
    would otherwise dominate the mean.
    """
    if not maps:
        raise ValueError("upsampled_attention: no attention maps given")
    out = []
    for a in maps:
        assert a.ndim == 4 and a.shape[1] == 1, f"expected [N, 1, h, w], got {tuple(a.shape)}"
        up = F.interpolate(a, size=size, mode="bilinear", align_corners=False).clamp(min=0)
        out.append(up / up.sum((2, 3), keepdim=True).clamp(min=1e-12))
    return torch.stack(out).mean(0)
