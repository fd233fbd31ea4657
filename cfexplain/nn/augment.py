"""Adaptive discriminator augmentation (ADA), the ``bgc`` pipeline of Karras et al. 2020.

Written from the paper ("Training Generative Adversarial Networks with Limited Data"):

- **blit**: x-flip, 90-degree rotations, integer translation; exact integer index operations.
- **geom**: isotropic scale, rotation, anisotropic scale, rotation, fractional translation;
  composed into one 3x3 matrix per sample and applied with one resampling (reflect pad,
  2x upsample, bilinear ``grid_sample``, 2x downsample).
- **color**: brightness, contrast, luma flip, hue rotation, saturation; composed into one
  affine colour matrix per sample (hue and saturation only for RGB).

Each transform is drawn independently per sample with probability ``p * strength``. Every step
is differentiable w.r.t. the images, also twice (R1 through the augmentation needs that).
Unlike the published implementation, samples that draw no geometric (colour) transform are not
touched at all, and at ``p == 0`` the input comes back as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AugmentPipe", "ada_adjust"]


def ada_adjust(
    p: float,
    rt: float,
    *,
    target: float = 0.6,
    batch: int,
    interval: int = 4,
    ada_kimg: float = 500,
) -> float:
    """One step of the ADA controller: the new augmentation probability.

    Args:
        p: current probability.
        rt: overfitting heuristic ``E[sign(D(real))]`` over the last ``interval`` iterations.
        target: the ``rt`` the controller aims for (0.6 in the paper).
        batch: images per iteration (all processes together).
        interval: iterations between adjustments.
        ada_kimg: thousands of images over which ``p`` can move from 0 to 1.

    Returns ``p + sign(rt - target) * batch * interval / (ada_kimg * 1000)`` clamped to [0, 1].
    """
    if batch <= 0 or interval <= 0 or ada_kimg <= 0:
        raise ValueError(
            f"ada_adjust needs batch, interval and ada_kimg > 0, got {batch}, {interval}, {ada_kimg}"
        )
    step = batch * interval / (ada_kimg * 1000)
    sign = (rt > target) - (rt < target)  # 0 exactly on target: p stays
    return min(max(p + sign * step, 0.0), 1.0)


def _lanczos_halfband(a: int = 3) -> Tensor:
    """Lanczos-``a`` low-pass for 2x resampling: ``[4a]`` taps at half-integer offsets, sum 1.

    Its pass band is flat to half the original Nyquist (an up/down round trip keeps a
    sinusoid there at 1.02 of its amplitude, [1,3,3,1] at 0.62), so augmented images are not
    visibly blurrier than the ones that drew no geometric transform.
    """
    d = torch.arange(4 * a, dtype=torch.float64) - (4 * a - 1) / 2
    h = torch.sinc(d / 2) * torch.sinc(d / (2 * a))
    return h / h.sum()


def _up_matrix(n: int, pad: int, f: Tensor) -> Tensor:
    """``[2(n + 2 pad), n]``: mirror padding by ``pad`` then 2x FIR upsampling, as one matrix.

    Output pixel ``m`` lies at the half-integer offset ``m + 0.5 - (2i + 1)`` from padded input
    pixel ``i``, i.e. tap ``m - 2i + L/2 - 1`` of ``f [L]``; taps have gain 2 because zero
    insertion halves the mean. A matrix product is several times faster on CPU than the
    equivalent 1-channel (transposed) convolutions, works unchanged on GPU, and is linear, so
    the double backward of R1 is free. Rows near the ends see zeros beyond the padding.
    """
    taps = f.numel()
    rows = torch.arange(2 * (n + 2 * pad), device=f.device).view(-1, 1)
    cols = torch.arange(n + 2 * pad, device=f.device).view(1, -1)
    k = rows - 2 * cols + taps // 2 - 1
    up = torch.where((k >= 0) & (k < taps), 2 * f[k.clamp(0, taps - 1)], 0)
    fold = _fold(torch.arange(-pad, n + pad, device=f.device), n)  # mirror padding
    return up.new_zeros(up.shape[0], n).index_add_(1, fold, up)


def _down_matrix(n: int, f: Tensor) -> Tensor:
    """``[n, 2n + L - 2]``: 2x FIR downsampling of ``2n`` pixels plus ``L/2 - 1`` per side.

    Output pixel ``j`` reads input pixels ``2j .. 2j + L - 1`` (half-integer offsets, as above),
    so the caller renders that margin instead of padding.
    """
    taps = f.numel()
    rows = torch.arange(n, device=f.device).view(-1, 1)
    cols = torch.arange(2 * n + taps - 2, device=f.device).view(1, -1)
    k = cols - 2 * rows
    return torch.where((k >= 0) & (k < taps), f[k.clamp(0, taps - 1)], 0)


def _resample(images: Tensor, inv: Tensor, f: Tensor) -> Tensor:
    """Warp ``images [N, C, H, W]`` by ``inv [N, 3, 3]``; returns ``[N, C, H, W]``.

    ``inv`` maps output to source coordinates, both in pixels relative to the image centre
    (so rotations stay rotations on non-square images). Reflect padding keeps content in the
    corners; sampling at twice the resolution between two low-pass filters keeps bilinear
    interpolation from aliasing.
    """
    n, c, h, w = images.shape
    assert inv.shape == (n, 3, 3), f"inv {tuple(inv.shape)} != ({n}, 3, 3)"
    taps = f.numel()
    m = taps // 2 - 1  # extra upsampled pixels per side consumed by the downsampling filter

    # Source extent of the rendered area, to pad just enough.
    cx, cy = (w + m) / 2, (h + m) / 2
    corners = inv.new_tensor([[-cx, -cy, 1], [cx, -cy, 1], [-cx, cy, 1], [cx, cy, 1]])
    src = torch.einsum("nij,kj->nki", inv.detach(), corners)  # [N, 4, 3]
    reach_x = src[..., 0].abs().max().item() - w / 2
    reach_y = src[..., 1].abs().max().item() - h / 2
    margin = taps / 4 + 0.5  # upsampling filter half-support plus one bilinear tap, input px
    # Capped: beyond 2x the image, grid_sample's own reflection takes over (rare tails).
    px = min(max(math.ceil(reach_x + margin), 0), 2 * w)
    py = min(max(math.ceil(reach_y + margin), 0), 2 * h)

    f = f.to(images.dtype)
    x = _up_matrix(h, py, f) @ images @ _up_matrix(w, px, f).T  # [N, C, 2(H+2py), 2(W+2px)]

    # affine_grid's normalised output coordinate x_n maps to x_n * (W + m) / 2 pixels from the
    # centre; a source point s pixels from the centre has normalised coordinate 2 s / (W + 2 px).
    to_pix = torch.diag(inv.new_tensor([cx, cy, 1.0]))
    to_norm = torch.diag(inv.new_tensor([2 / (w + 2 * px), 2 / (h + 2 * py), 1.0]))
    theta = (to_norm @ inv @ to_pix)[:, :2, :].to(images.dtype)
    grid = F.affine_grid(theta, [n, c, 2 * h + 2 * m, 2 * w + 2 * m], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return _down_matrix(h, f) @ x @ _down_matrix(w, f).T


def _rotation(theta: Tensor) -> Tensor:
    """``theta [N] -> [N, 3, 3]`` homogeneous 2-D rotations."""
    c, s = theta.cos(), theta.sin()
    o, z = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=1).view(-1, 3, 3)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    """``sx, sy [N] -> [N, 3, 3]`` homogeneous axis scalings."""
    o, z = torch.ones_like(sx), torch.zeros_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=1).view(-1, 3, 3)


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    """``tx, ty [N] -> [N, 3, 3]`` homogeneous translations."""
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=1).view(-1, 3, 3)


class AugmentPipe(nn.Module):
    """ADA ``bgc``: ``images [N, C, H, W] in [-1, 1] -> [N, C, H, W]``, differentiable.

    Each argument without a suffix is the strength of one transform: it is applied to a sample
    with probability ``p * strength`` (0 disables it). The ``*_std`` / ``*_max`` arguments set
    the size of the draws. ``p`` is a buffer (saved with the module), set by the training loop
    from :func:`ada_adjust`.

    Args:
        xflip: horizontal flip (a fair coin once drawn).
        rotate90: rotation by a uniform multiple of 90 degrees (square images).
        xint: integer translation, uniform in ``+-xint_max`` of the image size, mirrored borders.
        scale: isotropic scale ``2**N(0, scale_std)``.
        rotate: rotation ``U(-pi, pi) * rotate_max`` before and after the anisotropic scale,
            each with ``p_rot = 1 - sqrt(1 - p * rotate)`` so that at least one happens with
            ``p * rotate``.
        aniso: anisotropic scale ``diag(a, 1/a)``, ``a = 2**N(0, aniso_std)``.
        xfrac: fractional translation ``N(0, xfrac_std)`` of the image size.
        brightness: adds ``N(0, brightness_std)``.
        contrast: multiplies by ``2**N(0, contrast_std)``.
        lumaflip: mirrors along the luma axis (a fair coin once drawn; negation for 1 channel).
        hue: rotation about the luma axis by ``U(-pi, pi) * hue_max`` (RGB only).
        saturation: scales chroma by ``2**N(0, saturation_std)`` (RGB only).
    """

    def __init__(
        self,
        xflip: float = 1.0,
        rotate90: float = 1.0,
        xint: float = 1.0,
        xint_max: float = 0.125,
        scale: float = 1.0,
        rotate: float = 1.0,
        aniso: float = 1.0,
        xfrac: float = 1.0,
        scale_std: float = 0.2,
        rotate_max: float = 1.0,
        aniso_std: float = 0.2,
        xfrac_std: float = 0.125,
        brightness: float = 1.0,
        contrast: float = 1.0,
        lumaflip: float = 1.0,
        hue: float = 1.0,
        saturation: float = 1.0,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        hue_max: float = 1.0,
        saturation_std: float = 1.0,
    ) -> None:
        super().__init__()
        kwargs = dict(locals())
        kwargs.pop("self")
        kwargs.pop("__class__", None)
        for name, value in kwargs.items():
            if not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"AugmentPipe: {name} must be a number >= 0, got {value!r}")
        self.xflip, self.rotate90, self.xint, self.xint_max = xflip, rotate90, xint, xint_max
        self.scale, self.rotate, self.aniso, self.xfrac = scale, rotate, aniso, xfrac
        self.scale_std, self.rotate_max = scale_std, rotate_max
        self.aniso_std, self.xfrac_std = aniso_std, xfrac_std
        self.brightness, self.contrast, self.lumaflip = brightness, contrast, lumaflip
        self.hue, self.saturation = hue, saturation
        self.brightness_std, self.contrast_std = brightness_std, contrast_std
        self.hue_max, self.saturation_std = hue_max, saturation_std
        self.register_buffer("p", torch.zeros([]))
        self.register_buffer("resample_filter", _lanczos_halfband(3).float(), persistent=False)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}"

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images [N, C, H, W] -> [N, C, H, W]`` (the input object itself when nothing is drawn).

        Random numbers come from ``generator`` (on the images' device) or torch's global RNG.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"AugmentPipe expects float images [N, C, H, W], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        p = float(self.p)
        if p <= 0 or images.shape[0] == 0:
            return images
        # float64 inputs get float64 matrices (tests, references); anything else float32.
        pdt = torch.float64 if images.dtype == torch.float64 else torch.float32
        rng = _Draw(images.shape[0], images.device, pdt, generator)
        x = self._blit(images, p, rng)
        x = self._geom(x, p, rng)
        x = self._color(x, p, rng)
        assert x.shape == images.shape and x.dtype == images.dtype
        return x

    # -- blit ------------------------------------------------------------------------------------

    def _blit(self, images: Tensor, p: float, rng: _Draw) -> Tensor:
        """x-flip, 90-degree rotations and integer translation as one exact gather per sample."""
        n, c, h, w = images.shape
        dev = images.device
        flip = rng.coin(p * self.xflip)  # [N] bool, True = flipped
        k = rng.choice(p * self.rotate90, 4)  # [N] in 0..3, quarter turns
        use_t = rng.mask(p * self.xint)
        tx = torch.where(use_t, (rng.uniform_pm(self.xint_max) * w).round(), 0).long()
        ty = torch.where(use_t, (rng.uniform_pm(self.xint_max) * h).round(), 0).long()
        changed = flip | (k != 0) | (tx != 0) | (ty != 0)
        if not bool(changed.any()):
            return images
        if h != w and bool((k != 0).any()):
            raise ValueError(f"AugmentPipe: rotate90 needs square images, got {h}x{w}")

        # Follow each output pixel back to its source: undo the translation (mirrored borders),
        # then the rotation and the flip, in doubled centred coordinates so they stay integers.
        i = torch.arange(h, device=dev).view(1, h, 1)
        j = torch.arange(w, device=dev).view(1, 1, w)
        si = _fold(i - ty.view(n, 1, 1), h)  # [N, H, 1]
        sj = _fold(j - tx.view(n, 1, 1), w)  # [N, 1, W]
        X = (2 * sj + 1 - w).expand(n, h, w)
        Y = (2 * si + 1 - h).expand(n, h, w)
        cos = torch.tensor([1, 0, -1, 0], device=dev)[k].view(n, 1, 1)
        sin = torch.tensor([0, 1, 0, -1], device=dev)[k].view(n, 1, 1)
        X, Y = cos * X - sin * Y, sin * X + cos * Y
        X = torch.where(flip.view(n, 1, 1), -X, X)
        src = ((Y + h - 1) >> 1) * w + ((X + w - 1) >> 1)  # [N, H, W] flat index (exact halves)
        out = images.reshape(n, c, h * w).gather(2, src.view(n, 1, h * w).expand(n, c, h * w))
        return out.view(n, c, h, w)

    # -- geom ------------------------------------------------------------------------------------

    def _geom(self, images: Tensor, p: float, rng: _Draw) -> Tensor:
        """Scale, rotate, anisotropic scale, rotate, translate: one resampling per changed sample."""
        n, _, h, w = images.shape
        one, zero = rng.const(1.0), rng.const(0.0)
        # Built directly as the inverse (output -> source): inverses of these draws have the
        # same distributions, so composing inverses in reverse order is the forward chain.
        use_s = rng.mask(p * self.scale)
        s = torch.where(use_s, torch.exp2(rng.normal(self.scale_std)), one)
        p_rot = 1 - math.sqrt(1 - min(p * self.rotate, 1.0))
        use_r1 = rng.mask(p_rot)
        r1 = torch.where(use_r1, rng.uniform_pm(math.pi * self.rotate_max), zero)
        use_a = rng.mask(p * self.aniso)
        a = torch.where(use_a, torch.exp2(rng.normal(self.aniso_std)), one)
        use_r2 = rng.mask(p_rot)
        r2 = torch.where(use_r2, rng.uniform_pm(math.pi * self.rotate_max), zero)
        use_t = rng.mask(p * self.xfrac)
        tx = torch.where(use_t, rng.normal(self.xfrac_std) * w, zero)
        ty = torch.where(use_t, rng.normal(self.xfrac_std) * h, zero)
        changed = use_s | use_r1 | use_a | use_r2 | use_t
        if not bool(changed.any()):
            return images
        inv = (
            _scale2d(1 / s, 1 / s)
            @ _rotation(-r1)
            @ _scale2d(1 / a, a)
            @ _rotation(-r2)
            @ _translate2d(-tx, -ty)
        )
        if bool(changed.all()):
            return _resample(images, inv, self.resample_filter)
        # Samples that drew nothing stay bit-exact and cost nothing.
        idx = changed.nonzero().squeeze(1)
        warped = _resample(images.index_select(0, idx), inv[idx], self.resample_filter)
        return images.index_copy(0, idx, warped)

    # -- color -----------------------------------------------------------------------------------

    def _color(self, images: Tensor, p: float, rng: _Draw) -> Tensor:
        """Brightness, contrast, luma flip, hue, saturation as one affine colour map per sample."""
        n, c, h, w = images.shape
        one, zero = rng.const(1.0), rng.const(0.0)
        eye = torch.eye(c + 1, dtype=rng.dtype, device=rng.device)
        v = torch.full((c,), 1 / math.sqrt(c), dtype=rng.dtype, device=rng.device)  # luma axis
        vv = torch.outer(v, v)

        use_b = rng.mask(p * self.brightness)
        b = torch.where(use_b, rng.normal(self.brightness_std), zero)
        m = eye.repeat(n, 1, 1)
        m[:, :c, c] = b.view(n, 1)  # add b to every channel
        changed = use_b

        use_c = rng.mask(p * self.contrast)
        cs = torch.where(use_c, torch.exp2(rng.normal(self.contrast_std)), one)
        m = m * torch.cat([cs.view(n, 1).expand(n, c), one.view(1).expand(n, 1)], 1).view(n, -1, 1)
        changed = changed | use_c

        flip = rng.coin(p * self.lumaflip)
        refl = eye.clone()
        refl[:c, :c] -= 2 * vv  # Householder reflection along the luma axis
        m = torch.where(flip.view(n, 1, 1), refl @ m, m)
        changed = changed | flip

        if c == 3:  # hue and chroma exist only in colour
            use_h = rng.mask(p * self.hue)
            theta = torch.where(use_h, rng.uniform_pm(math.pi * self.hue_max), zero)
            m = _rotate_about(v, theta, eye) @ m
            use_sat = rng.mask(p * self.saturation)
            sat = torch.where(use_sat, torch.exp2(rng.normal(self.saturation_std)), one)
            chroma = eye.repeat(n, 1, 1)
            chroma[:, :c, :c] = vv + (torch.eye(c, dtype=rng.dtype, device=rng.device) - vv) * (
                sat.view(n, 1, 1)
            )
            m = chroma @ m
            changed = changed | use_h | use_sat

        if not bool(changed.any()):
            return images
        m = m.to(images.dtype)
        flat = images.reshape(n, c, h * w)
        out = torch.baddbmm(m[:, :c, c : c + 1], m[:, :c, :c], flat)
        return out.view(n, c, h, w)


def _fold(idx: Tensor, n: int) -> Tensor:
    """Integer indices folded into ``[0, n)`` by mirror reflection (edge not repeated)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _rotate_about(v: Tensor, theta: Tensor, eye: Tensor) -> Tensor:
    """Rotations by ``theta [N]`` about the unit axis ``v [3]`` (Rodrigues), as ``[N, 4, 4]``."""
    n = theta.shape[0]
    x, y, z = v.unbind()
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero]).view(3, 3)  # cross-product matrix
    c, s = theta.cos().view(n, 1, 1), theta.sin().view(n, 1, 1)
    r = torch.eye(3, dtype=v.dtype, device=v.device) + s * k + (1 - c) * (k @ k)
    out = eye.repeat(n, 1, 1)
    out[:, :3, :3] = r
    return out


class _Draw:
    """Per-sample random draws ``[N]`` on one device and dtype, from one generator."""

    def __init__(
        self, n: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator | None
    ) -> None:
        self.n, self.device, self.dtype, self.generator = n, device, dtype, generator

    def const(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=self.dtype, device=self.device)

    def _rand(self) -> Tensor:
        return torch.rand(self.n, dtype=self.dtype, device=self.device, generator=self.generator)

    def mask(self, prob: float) -> Tensor:
        """``[N]`` bool, each True with probability ``prob`` (clamped to [0, 1])."""
        return self._rand() < min(max(prob, 0.0), 1.0)

    def coin(self, prob: float) -> Tensor:
        """Drawn with ``prob``, then a fair coin: True means the transform really happens."""
        return self.mask(prob) & (self._rand() < 0.5)

    def choice(self, prob: float, k: int) -> Tensor:
        """Drawn with ``prob``, then uniform in ``0..k-1``; 0 where not drawn. ``[N]`` long."""
        value = (self._rand() * k).long().clamp_(max=k - 1)
        return torch.where(self.mask(prob), value, 0)

    def uniform_pm(self, half_width: float) -> Tensor:
        """Uniform in ``[-half_width, half_width)``."""
        return (self._rand() * 2 - 1) * half_width

    def normal(self, std: float) -> Tensor:
        return (
            torch.randn(self.n, dtype=self.dtype, device=self.device, generator=self.generator)
            * std
        )
