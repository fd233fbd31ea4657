"""Controlled transformations for sensitivity analysis (misas, Ankenbrand et al. 2021).

Each transformation is a pure function ``apply(x [N, C, H, W] in [-1, 1], p) -> [N, C, H, W]``
in [-1, 1] with a default parameter range and an identity value (``apply(x, identity)`` is
``x``). Random ones (noise, bias field) draw from a fixed seed, so a sweep is reproducible and
every parameter value sees the same noise pattern. Geometric ones also move masks
(:meth:`Transform.apply_mask`), so a segmentation is scored against the transformed truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cfexplain.utils.images import gaussian_blur

SEED = 0  # noise and bias-field draws: the same for every call, so a sweep is deterministic


def _check(x: Tensor) -> None:
    assert x.ndim == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}"


def _to01(x: Tensor) -> Tensor:
    return (x + 1) / 2


def _from01(u: Tensor) -> Tensor:
    return u.clamp(0, 1) * 2 - 1


# ----------------------------------------------------------------------------- geometry


def _affine(x: Tensor, a: Tensor, mode: str, fill: float) -> Tensor:
    """Sample ``x [N, C, H, W]`` at ``a [2, 2] @ output`` (normalised coordinates, centre fixed);
    pixels from outside the image take ``fill``."""
    theta = torch.cat([a, torch.zeros(2, 1, dtype=a.dtype)], dim=1)
    theta = theta.to(x.device, torch.float32).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with zeros: shift so that the padding lands on `fill`.
    out = F.grid_sample(
        x.float() - fill, grid, mode=mode, padding_mode="zeros", align_corners=False
    )
    return (out + fill).to(x.dtype)


def _rotation_matrix(degrees: float) -> Tensor:
    # Counter-clockwise as displayed (y points down): the output at o reads the input at R·o.
    t = math.radians(degrees)
    return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


def rotation(x: Tensor, p: float) -> Tensor:
    """Rotate by ``p`` degrees (counter-clockwise) about the centre; corners filled black."""
    _check(x)
    if p == 0:
        return x.clone()
    return _affine(x, _rotation_matrix(p), "bilinear", -1.0).clamp(-1, 1)


def zoom(x: Tensor, p: float) -> Tensor:
    """Scale by ``p`` about the centre (> 1 enlarges, < 1 shrinks with a black border)."""
    _check(x)
    if p == 1:
        return x.clone()
    return _affine(x, torch.eye(2) / p, "bilinear", -1.0).clamp(-1, 1)


def _crop_box(h: int, w: int, share: float) -> tuple[int, int, int, int]:
    if not 0 < share <= 1:
        raise ValueError(f"crop: the share kept must be in (0, 1], got {share}")
    ch, cw = max(1, round(h * share)), max(1, round(w * share))
    top, left = (h - ch) // 2, (w - cw) // 2
    return top, left, ch, cw


def crop(x: Tensor, p: float) -> Tensor:
    """Keep the central share ``p`` of each side, then resize back to ``[H, W]`` (bilinear)."""
    _check(x)
    top, left, ch, cw = _crop_box(x.shape[-2], x.shape[-1], p)
    if (ch, cw) == tuple(x.shape[-2:]):
        return x.clone()
    window = x[..., top : top + ch, left : left + cw].float()
    out = F.interpolate(window, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out.clamp(-1, 1).to(x.dtype)


def _mask_rotation(m: Tensor, p: float) -> Tensor:
    return _affine(m, _rotation_matrix(p), "nearest", 0.0) if p != 0 else m.clone()


def _mask_zoom(m: Tensor, p: float) -> Tensor:
    return _affine(m, torch.eye(2) / p, "nearest", 0.0) if p != 1 else m.clone()


def _mask_crop(m: Tensor, p: float) -> Tensor:
    top, left, ch, cw = _crop_box(m.shape[-2], m.shape[-1], p)
    if (ch, cw) == tuple(m.shape[-2:]):
        return m.clone()
    window = m[..., top : top + ch, left : left + cw].float()
    return F.interpolate(window, size=m.shape[-2:], mode="nearest-exact").to(m.dtype)


# ----------------------------------------------------------------------------- intensity


def brightness(x: Tensor, p: float) -> Tensor:
    """Add ``p`` (in [-1, 1] units) to every pixel."""
    _check(x)
    return (x + p).clamp(-1, 1)


def contrast(x: Tensor, p: float) -> Tensor:
    """Scale the deviation from each image's mean by ``p``."""
    _check(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + p * (x - mean)).clamp(-1, 1)


def gamma(x: Tensor, p: float) -> Tensor:
    """Gamma curve ``u ** p`` on intensities ``u`` in [0, 1] (> 1 darkens the mid-tones)."""
    _check(x)
    if p <= 0:
        raise ValueError(f"gamma: the exponent must be > 0, got {p}")
    return _from01(_to01(x).clamp(0, 1) ** p)


def _fixed_noise(shape: Sequence[int], key: int) -> Tensor:
    g = torch.Generator().manual_seed(SEED * 1000 + key)
    return torch.randn(tuple(shape), generator=g)


def noise(x: Tensor, p: float) -> Tensor:
    """Add Gaussian noise of std ``p`` in [0, 1] grey levels (a fixed, seeded pattern).

    One pattern ``[C, H, W]`` for every image: an image's result does not depend on the batch
    it is transformed in.
    """
    _check(x)
    if p == 0:
        return x.clone()
    n = _fixed_noise(x.shape[1:], 1)[None].to(x.device, x.dtype)
    return (x + 2 * p * n).clamp(-1, 1)


def blur(x: Tensor, p: float) -> Tensor:
    """Gaussian blur of sigma ``p`` pixels (:func:`cfexplain.utils.images.gaussian_blur`)."""
    _check(x)
    if p < 0:
        raise ValueError(f"blur: sigma must be >= 0, got {p}")
    if p == 0:
        return x.clone()
    return gaussian_blur(x.float(), p).clamp(-1, 1).to(x.dtype)


def bias_field_map(h: int, w: int) -> Tensor:
    """A smooth field ``[H, W]`` with max |value| 1: a seeded quadratic polynomial of (x, y).

    Low-order polynomials are the usual model of an MRI coil's intensity inhomogeneity.
    """
    g = torch.Generator().manual_seed(SEED * 1000 + 2)
    c = torch.randn(6, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    f = c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2 + c[4] * yy**2 + 0.5 * c[5]
    f = f - f.mean()
    return f / f.abs().amax().clamp_min(1e-6)


def bias_field(x: Tensor, p: float) -> Tensor:
    """Multiply intensities in [0, 1] by ``exp(p · field)``: a smooth bias field of strength ``p``."""
    _check(x)
    if p == 0:
        return x.clone()
    field = bias_field_map(x.shape[-2], x.shape[-1]).to(x.device)
    return _from01(_to01(x.float()) * torch.exp(p * field)).to(x.dtype)


SPIKE_FREQUENCY = (0.19, 0.13)  # (rows, columns) in cycles per pixel: a fixed k-space location


def spike(x: Tensor, p: float) -> Tensor:
    """k-space spike (MRI 'herringbone'): add one coefficient to the 2-D FFT and invert.

    The spike sits at :data:`SPIKE_FREQUENCY`; its size makes stripes of amplitude ``p`` in
    [0, 1] grey levels (the real part of the inverse FFT).
    """
    _check(x)
    if p == 0:
        return x.clone()
    h, w = x.shape[-2:]
    ky, kx = round(SPIKE_FREQUENCY[0] * h), round(SPIKE_FREQUENCY[1] * w)
    k = torch.fft.fft2(_to01(x.float()))
    k[..., ky % h, kx % w] += p * h * w
    return _from01(torch.fft.ifft2(k).real).to(x.dtype)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Transform:
    """One controlled transformation.

    Attributes:
        name: registry key.
        fn: ``(x [N, C, H, W] in [-1, 1], p) -> [N, C, H, W]`` in [-1, 1].
        params: default parameter values of a sweep (the identity among them).
        identity: the value at which ``fn`` returns its input.
        unit: what ``p`` measures (axis label).
        mask_fn: how masks ``[N, K, H, W]`` move; None for intensity changes (masks stay).
    """

    name: str
    fn: Callable[[Tensor, float], Tensor]
    params: tuple[float, ...]
    identity: float
    unit: str
    mask_fn: Callable[[Tensor, float], Tensor] | None = None

    @property
    def geometric(self) -> bool:
        return self.mask_fn is not None

    def apply(self, x: Tensor, p: float) -> Tensor:
        """``x [N, C, H, W]`` in [-1, 1] transformed with parameter ``p``."""
        return self.fn(x, float(p))

    def apply_mask(self, masks: Tensor, p: float) -> Tensor:
        """Masks ``[N, K, H, W]`` (bool or float) moved like the image (nearest), same dtype."""
        assert masks.ndim == 4, f"expected masks [N, K, H, W], got {tuple(masks.shape)}"
        if self.mask_fn is None:
            return masks.clone()
        out = self.mask_fn(masks.float(), float(p))
        return out > 0.5 if masks.dtype == torch.bool else out.to(masks.dtype)


def _lin(a: float, b: float, n: int) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in torch.linspace(a, b, n))


TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("rotation", rotation, _lin(-90, 90, 9), 0.0, "degrees", _mask_rotation),
        Transform("zoom", zoom, _lin(0.6, 1.4, 9), 1.0, "scale", _mask_zoom),
        Transform("crop", crop, _lin(1.0, 0.5, 6), 1.0, "share of the side kept", _mask_crop),
        Transform("brightness", brightness, _lin(-0.6, 0.6, 9), 0.0, "added (of 2)"),
        Transform("contrast", contrast, _lin(0.25, 1.75, 7), 1.0, "factor"),
        Transform("gamma", gamma, (0.4, 0.55, 0.7, 0.85, 1.0, 1.3, 1.6, 2.0, 2.5), 1.0, "exponent"),
        Transform("noise", noise, _lin(0.0, 0.2, 9), 0.0, "std (grey levels)"),
        Transform("blur", blur, _lin(0.0, 3.0, 7), 0.0, "sigma (px)"),
        Transform("bias_field", bias_field, _lin(0.0, 1.0, 6), 0.0, "strength"),
        Transform("spike", spike, _lin(0.0, 0.3, 7), 0.0, "stripe amplitude"),
    )
}


def get_transform(name: str) -> Transform:
    """The registered transformation ``name``; the error lists the known ones."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(TRANSFORMS)}")
    return TRANSFORMS[name]
