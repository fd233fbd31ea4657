"""Image tensors: Gaussian blur, and grids and strips as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cfexplain.utils.artifacts import atomic_write


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``x [N, C, H, W]``; ``sigma`` in pixels, one float or one per
    image ``[N]`` (0 leaves an image as it is). Reflect padding keeps the borders' grey level;
    the kernel reaches 3 sigma, capped below the image size, as reflection needs."""
    n, c, h, w = x.shape
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    assert len(s) in (1, n), f"sigma: one value or one per image ({n}), got {len(s)}"
    if not bool((s > 0).any()):
        return x
    r = max(1, min(math.ceil(3 * float(s.max())), h - 1, w - 1))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / s.clamp_min(1e-6)[:, None]) ** 2)
    k = torch.where(s[:, None] > 0, k, (t == 0).to(x.dtype))  # sigma 0: the identity kernel
    k = (k / k.sum(1, keepdim=True)).expand(n, -1).repeat_interleave(c, 0)  # [N * C, T]
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return F.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, h, w)


def upscale(arr: np.ndarray, size: int) -> Image.Image:
    """uint8 ``[H, W, 3]`` or ``[H, W]`` -> a PIL image whose longer side is at least ``size``
    (an integer factor, nearest neighbour: pixels stay pixels)."""
    img = Image.fromarray(arr)
    k = max(1, math.ceil(size / max(img.size)))
    return img.resize((img.width * k, img.height * k), Image.NEAREST) if k > 1 else img


def animated_gif(frames: list[np.ndarray], duration_ms: int) -> bytes:
    """A looping GIF of uint8 frames ``[H, W]`` or ``[H, W, 3]``, played forward then back."""
    import io

    import imageio.v3 as iio

    buf = io.BytesIO()
    seq = frames + frames[-2:0:-1]
    iio.imwrite(buf, np.stack(seq), extension=".gif", duration=duration_ms, loop=0)
    return buf.getvalue()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] → uint8 ``[N, H, W, C]``."""
    assert images.ndim == 4 and images.shape[1] in (1, 3), (
        f"expected [N, 1|3, H, W], got {tuple(images.shape)}"
    )
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` in [-1, 1] into one uint8 image ``[rows·H, nrow·W, C]``."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.zeros((rows * (h + pad) - pad, nrow * (w + pad) - pad, c), np.uint8)
    for i, img in enumerate(arr):
        r, k = divmod(i, nrow)
        out[r * (h + pad) : r * (h + pad) + h, k * (w + pad) : k * (w + pad) + w] = img
    return out


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write a grid of ``[N, C, H, W]`` images in [-1, 1] as a PNG (atomically); ``scale`` enlarges."""
    arr = grid(images, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
