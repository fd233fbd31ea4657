"""StyleGAN2-ADA generator (skip architecture) and discriminator (residual architecture).

Our own implementation of the published architecture (Karras et al. 2020), in pure PyTorch.
Parameter and buffer names and shapes equal those of the published networks, so their
``state_dict`` loads here. The maths lives in :mod:`cfexplain.nn.stylegan2_ops`.

``Generator = synthesis ∘ mapping``: ``G.mapping(z [N, z_dim]) -> w [N, num_ws, w_dim]`` and
``G.synthesis(w) -> img [N, C, H, W]``, images in roughly [-1, 1].

Equalised learning rate everywhere: weights are stored N(0, 1) (``N(0, 1) / lr_multiplier`` in
the mapping) and scaled by ``1 / sqrt(fan_in)`` at run time, so Adam's per-parameter step sizes
mean the same thing in every layer. Where an activation gain or a residual gain is a positive
constant, it is folded into the (small) weight and bias instead of a pass over the activations:
``lrelu(z) * g == lrelu(z * g)`` for ``g > 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cfexplain.nn.stylegan2_ops import (
    conv2d_resample,
    demodulation_coefficients,
    downsample2d,
    filter2d,
    minibatch_std,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)

__all__ = [
    "Generator",
    "MappingNetwork",
    "SynthesisNetwork",
    "Discriminator",
    "FullyConnected",
    "Conv2dLayer",
    "modulated_conv2d",
    "demodulation_coefficients",
    "conv2d_resample",
    "upfirdn2d",
    "filter2d",
    "upsample2d",
    "downsample2d",
    "minibatch_std",
    "setup_filter",
    "channels_at",
]

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the second moment of lrelu(N(0, 1)) near 1
FUSED_MODES = ("auto", "grouped", "unfused")
NOISE_MODES = ("const", "random", "none")


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature channels at resolution ``res``: ``min(channel_base // res, channel_max)``."""
    return min(channel_base // res, channel_max)


def _check_resolution(img_resolution: int, channel_base: int, channel_max: int, who: str) -> None:
    r = img_resolution
    if not (isinstance(r, int) and r >= 8 and r & (r - 1) == 0):
        raise ValueError(f"{who}: img_resolution must be a power of two >= 8, got {r!r}")
    if channels_at(r, channel_base, channel_max) < 1:
        raise ValueError(
            f"{who}: channel_base={channel_base} gives no channels at {r} px "
            f"(need channel_base >= img_resolution)"
        )


def _check_shape(t: torch.Tensor, expected: tuple, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``t`` has ``expected`` shape (None: any size)."""
    ok = isinstance(t, torch.Tensor) and t.ndim == len(expected)
    ok = ok and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = "[" + ", ".join("N" if e is None else str(e) for e in expected) + "]"
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what}: expected a tensor {want}, got {got}")


# --------------------------------------------------------------------------------------------
# Equalised-learning-rate layers


class FullyConnected(nn.Module):
    """Equalised-lr linear layer ``[N, in_features] -> [N, out_features]``.

    Args:
        activation: ``"linear"`` or ``"lrelu"`` (slope 0.2, gain sqrt(2)).
        lr_multiplier: scales the effective learning rate (0.01 in the mapping network).
        bias_init: initial bias (1 for the style affines: styles start at 1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and x.shape[1] == self.in_features, (
            f"expected [N, {self.in_features}], got {tuple(x.shape)}"
        )
        g = LRELU_GAIN if self.activation == "lrelu" else 1.0
        b = None if self.bias is None else self.bias * (self.bias_gain * g)
        x = F.linear(x, self.weight * (self.weight_gain * g), b)
        return F.leaky_relu(x, LRELU_SLOPE, inplace=True) if self.activation == "lrelu" else x

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalised-lr convolution ``[N, I, H, W] -> [N, O, H * up / down, W * up / down]``.

    Args:
        kernel_size: square kernel, padding ``kernel_size // 2``.
        activation: ``"linear"`` or ``"lrelu"`` (gain sqrt(2)).
        up, down: 2 for FIR resampling with ``resample_filter``.
        conv_clamp: clamp the output to ``±conv_clamp * gain`` (None: no clamp).
        gain: extra output gain (sqrt(0.5) on the residual branches of the discriminator).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: tuple[float, ...] = (1, 3, 3, 1),
        conv_clamp: float | None = None,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.activation = kernel_size, activation
        self.up, self.down, self.padding = up, down, kernel_size // 2
        self.conv_clamp, self.gain = conv_clamp, gain
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("resample_filter", setup_filter(resample_filter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == self.in_channels, (
            f"expected [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
        )
        g = self.gain * (LRELU_GAIN if self.activation == "lrelu" else 1.0)
        w = self.weight * (self.weight_gain * g)
        b = None if self.bias is None else self.bias * g
        x = conv2d_resample(
            x, w, self.resample_filter, up=self.up, down=self.down, padding=self.padding, bias=b
        )
        if self.activation == "lrelu":
            # In place: the convolution's backward does not need its output.
            x = F.leaky_relu(x, LRELU_SLOPE, inplace=True)
        if self.conv_clamp is not None:
            c = self.conv_clamp * self.gain
            x = x.clamp(-c, c)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
            f"activation={self.activation}, up={self.up}, down={self.down}"
        )


# --------------------------------------------------------------------------------------------
# Generator


def _use_grouped(mode: str, x: torch.Tensor) -> bool:
    """``auto``: the grouped convolution only for CUDA inference.

    On CPUs the unfused path is the faster one (measured 1.7-3.3x for G inference at batch 16:
    building one kernel per sample and a many-group convolution cost more than modulating the
    activations); for training the published code also keeps to the unfused path.
    """
    if mode == "grouped":
        return True
    if mode == "unfused":
        return False
    return x.is_cuda and not torch.is_grad_enabled()


class MappingNetwork(nn.Module):
    """``z [N, z_dim] -> w [N, num_ws, w_dim]``: normalise z, ``num_layers`` lrelu FCs, broadcast.

    Keeps ``w_avg``, the running mean of w (updated only when asked), for truncation.
    """

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_ws: int,
        num_layers: int = 2,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mapping_layers must be >= 1, got {num_layers}")
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        for i in range(num_layers):
            fc = FullyConnected(
                z_dim if i == 0 else w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{i}", fc)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(
        self,
        z: torch.Tensor,
        psi: float = 1.0,
        cutoff: int | None = None,
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        """``z [N, z_dim] -> w [N, num_ws, w_dim]``.

        ``update_w_avg``: move ``w_avg`` towards this batch's mean w (``beta = w_avg_beta``).
        ``psi``: truncation ``w_avg + psi * (w - w_avg)`` on the first ``cutoff`` ws (all if None).
        """
        _check_shape(z, (None, self.z_dim), "mapping input z")
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        # A real copy per ws (not an expanded view): callers mix styles by writing into it.
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if psi != 1.0:
            w_avg = self.w_avg.to(ws.dtype)
            if cutoff is None:
                ws = w_avg.lerp(ws, psi)
            else:
                ws = torch.cat([w_avg.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], dim=1)
        return ws


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution + noise + bias + lrelu, ``[N, I, H, W] -> [N, O, res, res]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        kernel_size: int = 3,
        conv_clamp: float | None = None,
        resample_filter: tuple[float, ...] = (1, 3, 3, 1),
        fused_modconv: str = "auto",
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.padding = resolution, up, kernel_size // 2
        self.conv_clamp, self.fused_modconv = conv_clamp, fused_modconv
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        # No weight gain: demodulation normalises the kernel's scale away.
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        return self.modulate(x, self.affine(w), noise_mode)

    def modulate(
        self, x: torch.Tensor, styles: torch.Tensor, noise_mode: str = "const"
    ) -> torch.Tensor:
        """The layer from its StyleSpace coordinates ``styles [N, in_channels]`` (= ``affine(w)``)."""
        N = x.shape[0]
        if noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        elif noise_mode == "random":
            r = self.resolution
            noise = torch.randn(N, 1, r, r, device=x.device, dtype=x.dtype) * self.noise_strength
        else:
            noise = None
        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            noise=noise,
            bias=self.bias,
            gain=LRELU_GAIN,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            fused=_use_grouped(self.fused_modconv, x),
        )
        # In place: the epilogue's backward needs its inputs only.
        x = F.leaky_relu(x, LRELU_SLOPE, inplace=True)
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, resolution={self.resolution}, up={self.up}"
        )


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution without demodulation, ``[N, C, H, W] -> [N, img_channels, H, W]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        conv_clamp: float | None = None,
        fused_modconv: str = "auto",
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv_clamp, self.fused_modconv = conv_clamp, fused_modconv
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)  # no demodulation: equalised lr instead

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, self.affine(w))

    def modulate(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        """The layer from its StyleSpace coordinates ``styles [N, in_channels]`` (= ``affine(w)``)."""
        styles = styles * self.weight_gain
        x = modulated_conv2d(
            x,
            self.weight,
            styles,
            bias=self.bias,
            demodulate=False,
            fused=_use_grouped(self.fused_modconv, x),
        )
        if self.conv_clamp is not None:
            x = x.clamp(-self.conv_clamp, self.conv_clamp)
        return x


class SynthesisBlock(nn.Module):
    """One resolution: ``conv0`` (2x up; absent at 4 px, which starts from ``const``), ``conv1``,
    ``torgb``; the running image is upsampled and the block's RGB added (skip architecture)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None = None,
        fused_modconv: str = "auto",
        resample_filter: tuple[float, ...] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        kw = dict(
            w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, fused_modconv=fused_modconv
        )
        if in_channels != 0:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **kw)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **kw)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp, fused_modconv)
        self.num_conv = 1 if in_channels == 0 else 2
        self.num_torgb = 1

    def forward(
        self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, noise_mode: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws [N, num_conv + 1, w_dim]``; returns features ``[N, O, r, r]`` and image ``[N, C, r, r]``."""
        return self.modulate(x, img, self.styles(ws), noise_mode)

    def layers(self) -> list[nn.Module]:
        """The modulated layers in the order their ws are read: [conv0,] conv1, torgb."""
        convs = [self.conv1] if self.in_channels == 0 else [self.conv0, self.conv1]
        return [*convs, self.torgb]

    def styles(self, ws: torch.Tensor) -> list[torch.Tensor]:
        """StyleSpace coordinates ``[N, in_channels]`` of each of :meth:`layers`."""
        return [layer.affine(ws[:, i]) for i, layer in enumerate(self.layers())]

    def modulate(
        self,
        x: torch.Tensor | None,
        img: torch.Tensor | None,
        styles: list[torch.Tensor],
        noise_mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` from the StyleSpace coordinates of :meth:`styles`."""
        if self.in_channels == 0:
            x = self.const.unsqueeze(0).expand(styles[0].shape[0], -1, -1, -1)
            if x.device.type == "cpu":
                # oneDNN's transposed and depthwise convolutions are much faster channels-last;
                # every later op keeps the layout. Measured: +12-18% inference, training even.
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.conv1.modulate(x, styles[0], noise_mode)
        else:
            x = self.conv0.modulate(x, styles[0], noise_mode)
            x = self.conv1.modulate(x, styles[1], noise_mode)
        y = self.torgb.modulate(x, styles[self.num_conv])
        img = y if img is None else y.add_(upsample2d(img, self.resample_filter))
        return x, img


class SynthesisNetwork(nn.Module):
    """``ws [N, num_ws, w_dim] -> img [N, img_channels, img_resolution, img_resolution]``.

    Blocks ``b4, b8, ..., b{img_resolution}``; ``num_ws = 2 * log2(img_resolution) - 2`` (one per
    convolution plus the last ToRGB; each block's ToRGB shares its w with the next block's conv0).
    """

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 16384,
        channel_max: int = 512,
        conv_clamp: float | None = None,
        fused_modconv: str = "auto",
    ) -> None:
        super().__init__()
        _check_resolution(img_resolution, channel_base, channel_max, "SynthesisNetwork")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        self.num_ws = 0
        for res in self.block_resolutions:
            c_in = 0 if res == 4 else channels_at(res // 2, channel_base, channel_max)
            c_out = channels_at(res, channel_base, channel_max)
            block = SynthesisBlock(
                c_in,
                c_out,
                w_dim,
                res,
                img_channels,
                conv_clamp=conv_clamp,
                fused_modconv=fused_modconv,
            )
            setattr(self, f"b{res}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last ToRGB

    def forward(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        _check_shape(ws, (None, self.num_ws, self.w_dim), "synthesis input ws")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        return self.from_styles(self.styles(ws), noise_mode)

    def blocks(self) -> list[SynthesisBlock]:
        return [getattr(self, f"b{res}") for res in self.block_resolutions]

    def styles(self, ws: torch.Tensor) -> list[torch.Tensor]:
        """StyleSpace (Wu et al. 2021): ``ws [N, num_ws, w_dim]`` -> the output of every modulated
        layer's ``affine``, ``[N, in_channels]`` each, block by block ([conv0,] conv1, torgb).
        A block's ToRGB reads the same w as the next block's conv0, but has its own coordinates."""
        _check_shape(ws, (None, self.num_ws, self.w_dim), "synthesis input ws")
        out: list[torch.Tensor] = []
        w_idx = 0
        for block in self.blocks():
            out += block.styles(ws[:, w_idx : w_idx + block.num_conv + 1])
            w_idx += block.num_conv
        return out

    def from_styles(self, styles: list[torch.Tensor], noise_mode: str = "const") -> torch.Tensor:
        """``img [N, C, H, W]`` from StyleSpace coordinates (:meth:`styles`):
        ``from_styles(styles(ws)) == forward(ws)``."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        x = img = None
        i = 0
        for block in self.blocks():
            n = block.num_conv + block.num_torgb
            x, img = block.modulate(x, img, styles[i : i + n], noise_mode)
            i += n
        return img.contiguous()  # callers get the standard layout (a small copy for RGB)


class Generator(nn.Module):
    """StyleGAN2-ADA generator ``z [N, z_dim] -> img [N, img_channels, img_resolution, img_resolution]``.

    Args:
        z_dim, w_dim: latent sizes.
        img_resolution: power of two >= 8; img_channels: 1 (radiographs) or 3 (RGB).
        mapping_layers: fully connected layers in the mapping network.
        channel_base, channel_max: channels at resolution r are min(channel_base // r, channel_max).
        mapping_lr_multiplier: learning-rate multiplier of the mapping network.
        w_avg_beta: decay of the running mean of w used for truncation.
        conv_clamp: clamp convolution outputs to ±conv_clamp (None: no clamp).
        fused_modconv: "auto" (grouped only for CUDA inference), "grouped" or "unfused".
    """

    def __init__(
        self,
        z_dim: int = 512,
        w_dim: int = 512,
        img_resolution: int = 64,
        img_channels: int = 1,
        mapping_layers: int = 2,
        channel_base: int = 16384,
        channel_max: int = 512,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
        conv_clamp: float | None = None,
        fused_modconv: str = "auto",
    ) -> None:
        super().__init__()
        if fused_modconv not in FUSED_MODES:
            raise ValueError(f"fused_modconv must be one of {FUSED_MODES}, got {fused_modconv!r}")
        if img_channels < 1:
            raise ValueError(f"img_channels must be >= 1, got {img_channels}")
        self.init_kwargs = dict(
            z_dim=z_dim,
            w_dim=w_dim,
            img_resolution=img_resolution,
            img_channels=img_channels,
            mapping_layers=mapping_layers,
            channel_base=channel_base,
            channel_max=channel_max,
            mapping_lr_multiplier=mapping_lr_multiplier,
            w_avg_beta=w_avg_beta,
            conv_clamp=conv_clamp,
            fused_modconv=fused_modconv,
        )
        self.z_dim, self.w_dim = z_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        # Synthesis first: the published state_dict lists it before the mapping.
        self.synthesis = SynthesisNetwork(
            w_dim,
            img_resolution,
            img_channels,
            channel_base,
            channel_max,
            conv_clamp,
            fused_modconv,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier, w_avg_beta
        )

    def forward(
        self,
        z: torch.Tensor,
        psi: float = 1.0,
        noise_mode: str = "const",
        cutoff: int | None = None,
        update_w_avg: bool = False,
    ) -> torch.Tensor:
        """``z [N, z_dim] -> img [N, img_channels, H, W]``; ``psi``/``cutoff`` truncate (see mapping)."""
        ws = self.mapping(z, psi=psi, cutoff=cutoff, update_w_avg=update_w_avg)
        return self.synthesis(ws, noise_mode=noise_mode)


# --------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """Residual block ``[N, I, r, r] -> [N, O, r/2, r/2]``: (conv0, conv1 down) + skip 1x1 down, each
    branch scaled by sqrt(0.5). The top block reads the image through ``fromrgb``."""

    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None = None,
        resample_filter: tuple[float, ...] = (1, 3, 3, 1),
    ) -> None:
        super().__init__()
        self.in_channels, self.img_channels, self.resolution = in_channels, img_channels, resolution
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        kw = dict(resample_filter=resample_filter, conv_clamp=conv_clamp)
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", **kw)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", **kw)
        r = math.sqrt(0.5)
        self.conv1 = Conv2dLayer(
            tmp_channels, out_channels, 3, activation="lrelu", down=2, gain=r, **kw
        )
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, gain=r, **kw)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            x = self.fromrgb(img)
        y = self.skip(x)
        x = self.conv1(self.conv0(x))
        return y.add_(x)  # the skip's backward does not need its output


class DiscriminatorEpilogue(nn.Module):
    """``[N, C, 4, 4] -> logits [N, 1]``: minibatch std, 3x3 conv, fc, out."""

    def __init__(
        self,
        in_channels: int,
        resolution: int = 4,
        mbstd_group_size: int = 4,
        mbstd_channels: int = 1,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.mbstd_group_size, self.mbstd_channels = mbstd_group_size, mbstd_channels
        extra = mbstd_channels if mbstd_group_size and mbstd_channels else 0
        self.conv = Conv2dLayer(
            in_channels + extra, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.fc = FullyConnected(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnected(in_channels, 1)

    def forward(self, x: torch.Tensor, parts: int = 1) -> torch.Tensor:
        if self.mbstd_group_size and self.mbstd_channels:
            x = minibatch_std(x, self.mbstd_group_size, self.mbstd_channels, parts)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """StyleGAN2-ADA residual discriminator ``img [N, C, H, W] -> logits [N, 1]``.

    Args:
        img_resolution: power of two >= 8; img_channels: image channels.
        channel_base, channel_max: channels at resolution r are min(channel_base // r, channel_max).
        mbstd_group_size: minibatch-std group (0 or None: off); mbstd_channels: its feature maps.
        conv_clamp: clamp convolution outputs (None: no clamp).
    """

    def __init__(
        self,
        img_resolution: int = 64,
        img_channels: int = 1,
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group_size: int = 4,
        mbstd_channels: int = 1,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        _check_resolution(img_resolution, channel_base, channel_max, "Discriminator")
        if img_channels < 1:
            raise ValueError(f"img_channels must be >= 1, got {img_channels}")
        self.init_kwargs = dict(
            img_resolution=img_resolution,
            img_channels=img_channels,
            channel_base=channel_base,
            channel_max=channel_max,
            mbstd_group_size=mbstd_group_size,
            mbstd_channels=mbstd_channels,
            conv_clamp=conv_clamp,
        )
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(int(math.log2(img_resolution)), 2, -1)]
        for res in self.block_resolutions:
            c_in = 0 if res == img_resolution else channels_at(res, channel_base, channel_max)
            block = DiscriminatorBlock(
                c_in,
                channels_at(res, channel_base, channel_max),
                channels_at(res // 2, channel_base, channel_max),
                res,
                img_channels,
                conv_clamp=conv_clamp,
            )
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(
            channels_at(4, channel_base, channel_max),
            4,
            mbstd_group_size,
            mbstd_channels,
            conv_clamp,
        )

    def forward(self, img: torch.Tensor, parts: int = 1) -> torch.Tensor:
        """``img [N, C, H, W] -> logits [N, 1]``. ``parts``: ``img`` is that many minibatches one
        after the other (reals, then fakes), scored as if by separate calls (minibatch std within
        each) in one pass: on a CPU, where every layer's fixed cost is a large part of a small
        network's time, that is 1.3x faster than two passes of half the batch."""
        r = self.img_resolution
        _check_shape(img, (None, self.img_channels, r, r), "discriminator input")
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        return self.b4(x, parts)
