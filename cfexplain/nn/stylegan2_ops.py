"""StyleGAN2 maths as plain functions: FIR resampling, resampled and modulated convolution,
minibatch standard deviation.

Written from the published architecture (Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data"; Karras et al. 2019, "Analyzing and Improving the Image Quality of
StyleGAN"), in pure PyTorch: no custom kernels, nothing compiled. Every function is pure and
checks the shapes it is given.

Resampling follows the published `upfirdn2d` convention (upsample by zero insertion, pad,
convolve with a FIR filter, keep every ``down``-th sample), so weights trained with the published
code give the same images here. The filter is the normalised outer product of ``[1, 3, 3, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "setup_filter",
    "upfirdn2d",
    "filter2d",
    "upsample2d",
    "downsample2d",
    "conv2d_resample",
    "demodulation_coefficients",
    "modulated_conv2d",
    "minibatch_std",
]

Pad4 = tuple[int, int, int, int]


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """Separable FIR filter ``[k, k]``, the outer product of ``taps`` normalised to sum 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    if f.ndim != 1 or f.numel() < 1:
        raise ValueError(
            f"filter taps must be a non-empty 1-D sequence, got shape {tuple(f.shape)}"
        )
    f = torch.outer(f, f)
    return f / f.sum()


def _pad4(padding: int | Sequence[int]) -> Pad4:
    if isinstance(padding, int):
        return (padding, padding, padding, padding)
    p = tuple(int(v) for v in padding)
    if len(p) == 2:  # (x, y)
        return (p[0], p[0], p[1], p[1])
    assert len(p) == 4, f"padding must be an int, (x, y) or (x0, x1, y0, y1), got {padding}"
    return p  # type: ignore[return-value]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` when ``x`` is stored that way (and is not ambiguous), else contiguous."""
    if x.ndim == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_filter(f: torch.Tensor) -> None:
    assert f.ndim == 2 and f.shape[0] == f.shape[1], (
        f"FIR filter must be [k, k], got {tuple(f.shape)}"
    )


def _depthwise(f: torch.Tensor, channels: int, x: torch.Tensor, gain: float) -> torch.Tensor:
    """The filter as a depthwise kernel ``[C, 1, k, k]`` (flipped: FIR filtering is a convolution)."""
    return (
        (f.flip([0, 1]) * gain)
        .to(device=x.device, dtype=x.dtype)[None, None]
        .expand(channels, 1, *f.shape)
    )


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    gain: float = 1.0,
) -> torch.Tensor:
    """Reference resampling ``[N, C, H, W] -> [N, C, H', W']``: zero-insert ``up``, pad, FIR, keep every ``down``-th.

    ``padding`` is ``(x0, x1, y0, y1)`` (negative values crop), applied after the zero insertion;
    ``H' = (H * up + y0 + y1 - k) // down + 1``. ``gain`` scales the filter (``up**2`` keeps
    the mean of an upsampled image). Straightforward and general; the fast paths below
    (:func:`filter2d`, :func:`upsample2d`, :func:`downsample2d`) are tested against it.
    """
    assert x.ndim == 4, f"expected [N, C, H, W], got {tuple(x.shape)}"
    _check_filter(f)
    N, C, H, W = x.shape
    if up > 1:
        # Zero insertion: each sample followed by up-1 zeros, in both dimensions.
        x = x.reshape(N, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(N, C, H * up, W * up)
    x0, x1, y0, y1 = _pad4(padding)
    x = F.pad(x, [x0, x1, y0, y1])
    return F.conv2d(x, _depthwise(f, C, x, gain), stride=down, groups=C)


def filter2d(
    x: torch.Tensor,
    f: torch.Tensor,
    padding: int | Sequence[int] = 0,
    down: int = 1,
    gain: float = 1.0,
) -> torch.Tensor:
    """FIR filter ``[N, C, H, W] -> [N, C, (H + y0 + y1 - k) // down + 1, ...]``; ``upfirdn2d`` with ``up=1``.

    One depthwise convolution; symmetric padding goes into the convolution (no padded copy).
    """
    assert x.ndim == 4, f"expected [N, C, H, W], got {tuple(x.shape)}"
    _check_filter(f)
    x0, x1, y0, y1 = _pad4(padding)
    if x0 == x1 == y0 == y1 and x0 >= 0:
        pad = x0
    else:
        x, pad = F.pad(x, [x0, x1, y0, y1]), 0
    return F.conv2d(
        x, _depthwise(f, x.shape[1], x, gain), stride=down, padding=pad, groups=x.shape[1]
    )


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR upsampling ``[N, C, H, W] -> [N, C, 2H, 2W]`` (gain 4 keeps a constant image constant).

    Equal to ``upfirdn2d(x, f, up=2, padding=(p0, p1, p0, p1), gain=4)`` with
    ``p0 = (k + 1) // 2``, ``p1 = (k - 2) // 2``, done as one depthwise transposed convolution so
    that the zero-inserted image is never built.
    """
    assert x.ndim == 4, f"expected [N, C, H, W], got {tuple(x.shape)}"
    _check_filter(f)
    k = f.shape[0]
    p0, p1 = (k + 1) // 2, (k - 2) // 2
    # A stride-2 transposed convolution with padding q equals zero insertion (without the
    # trailing zero) padded by k-1-q on both sides, then a true convolution with the kernel:
    # the published padding (p0 before, p1 + the trailing zero after) needs k-1-q = p0 = p1 + 1.
    assert p0 == p1 + 1, f"upsample2d needs an even-length filter, got {k} taps"
    w = (f * 4.0).to(device=x.device, dtype=x.dtype)[None, None].expand(x.shape[1], 1, k, k)
    return F.conv_transpose2d(x, w, stride=2, padding=k - 1 - p0, groups=x.shape[1])


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x FIR downsampling ``[N, C, H, W] -> [N, C, H/2, W/2]``: filter, keep every second sample."""
    k = f.shape[0]
    p0, p1 = (k - 1) // 2, (k - 2) // 2
    return filter2d(x, f, padding=(p0, p1, p0, p1), down=2)


def conv2d_resample(
    x: torch.Tensor,
    weight: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Convolution (cross-correlation, like ``conv2d``) with 2x FIR up- or downsampling.

    ``x [N, groups * I, H, W]``, ``weight [groups * O, I, k, k]`` ->
    ``[N, groups * O, H * up // down, W * up // down]`` (``padding = k // 2``). Upsampling is a
    true convolution (flipped kernel) done as a stride-2 transposed convolution followed by the
    FIR filter, as published; it costs a quarter of convolving the upsampled image.
    Downsampling filters first and then convolves with stride 2 (1x1 kernels: downsample first).
    """
    assert x.ndim == 4 and weight.ndim == 4, f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    c_out, c_in, kh, kw = weight.shape
    assert kh == kw, f"square kernels only, got {kh}x{kw}"
    assert x.shape[1] == groups * c_in, (
        f"x has {x.shape[1]} channels, weight expects {groups} x {c_in}"
    )
    assert up in (1, 2) and down in (1, 2) and not (up > 1 and down > 1), f"up={up}, down={down}"
    if up == 1 and down == 1:
        if c_in == groups == kh == 1 and padding == 0:
            return _outer_1x1(x, weight, bias)
        return F.conv2d(x, weight, bias, padding=padding, groups=groups)
    assert f is not None, "resampling needs a FIR filter"
    k = f.shape[0]
    if up > 1:
        # Transposed convolution takes the kernel as [in, out / groups, k, k].
        wt = weight.reshape(groups, c_out // groups, c_in, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * c_in, c_out // groups, kh, kw)
        y = F.conv_transpose2d(x, wt, stride=2, groups=groups)
        # The published padding (p + (k + 1) // 2 before, p + (k - 2) // 2 after) minus what the
        # transposed convolution already added (kw - 1 before, kw - 2 after).
        p0 = padding + (k + 1) // 2 - (kw - 1)
        p1 = padding + (k - 2) // 2 - (kw - 2)
        y = filter2d(y, f, padding=(p0, p1, p0, p1), gain=4.0)
        return y if bias is None else y + bias.reshape(1, -1, 1, 1)
    p0, p1 = padding + (k - 1) // 2, padding + (k - 2) // 2
    if kw == 1:
        return F.conv2d(
            filter2d(x, f, padding=(p0, p1, p0, p1), down=2), weight, bias, groups=groups
        )
    return F.conv2d(filter2d(x, f, padding=(p0, p1, p0, p1)), weight, bias, stride=2, groups=groups)


def _outer_1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of one input channel (a grey image's FromRGB): ``x * w_o + b_o``, one
    broadcast pass; oneDNN runs it as a general convolution, 2.5x slower forward and backward.
    On a CPU the result is channels-last, as the generator's activations are: oneDNN's
    convolutions after it are faster that way."""
    w = weight.reshape(1, -1, 1, 1)
    y = x * w if bias is None else torch.addcmul(bias.reshape(1, -1, 1, 1), x, w)
    return y.contiguous(memory_format=torch.channels_last) if y.device.type == "cpu" else y


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """``1 / ||weight * styles||`` per sample and output channel, ``[N, O]``.

    ``weight [O, I, k, k]``, ``styles [N, I]``. The norm of the modulated kernel is
    ``sum_i s_i^2 sum_k w_oik^2``, a matrix product: no per-sample weight tensor is built.
    """
    assert weight.ndim == 4 and styles.ndim == 2 and styles.shape[1] == weight.shape[1], (
        f"weight {tuple(weight.shape)}, styles {tuple(styles.shape)}"
    )
    return torch.rsqrt(styles.square() @ weight.square().sum([2, 3]).t() + 1e-8)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    gain: float = 1.0,
    demodulate: bool = True,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution, ``gain * (conv(x, weight * styles) * demod + noise + bias)``.

    Args:
        x: activations ``[N, I, H, W]``.
        weight: shared kernel ``[O, I, k, k]``.
        styles: per-sample input-channel scales ``[N, I]``.
        noise: added before the bias, broadcastable to ``[N, 1, H', W']`` (``[H', W']`` allowed).
        bias: ``[O]``.
        gain: scales the result (the layer's activation gain, folded in here to save a pass).
        demodulate: divide each output channel by the norm of its modulated kernel, so unit-variance
            inputs give unit-variance outputs.
        up: 1, or 2 for a transposed convolution followed by the FIR filter.
        padding: convolution padding (``k // 2`` keeps the size).
        resample_filter: FIR filter ``[4, 4]`` for ``up=2``.
        fused: build a kernel per sample and run one grouped convolution (fast on GPUs for
            inference); otherwise scale the activations, convolve with the shared kernel and
            scale the result (fast on CPUs and for training). Both give the same numbers.

    Returns ``[N, O, H * up, W * up]``.
    """
    assert x.ndim == 4 and weight.ndim == 4 and styles.ndim == 2, (
        f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)}"
    )
    N, c_in, H, W = x.shape
    c_out = weight.shape[0]
    assert weight.shape[1] == c_in, (
        f"weight {tuple(weight.shape)} does not take {c_in} input channels"
    )
    assert styles.shape == (N, c_in), f"styles must be [{N}, {c_in}], got {tuple(styles.shape)}"
    assert bias is None or bias.shape == (c_out,), (
        f"bias must be [{c_out}], got {tuple(bias.shape)}"
    )
    styles = styles.to(x.dtype)
    dcoefs = demodulation_coefficients(weight, styles) if demodulate else None

    if fused:
        w = weight[None] * styles.reshape(N, 1, c_in, 1, 1)
        if dcoefs is not None:
            w = w * dcoefs.reshape(N, c_out, 1, 1, 1)
        y = conv2d_resample(
            x.reshape(1, N * c_in, H, W),
            w.reshape(N * c_out, c_in, *weight.shape[2:]),
            resample_filter,
            up=up,
            padding=padding,
            groups=N,
        )
        y = y.reshape(N, c_out, *y.shape[2:])
        scale: torch.Tensor | float = gain
    else:
        y = conv2d_resample(
            x * styles.reshape(N, c_in, 1, 1), weight, resample_filter, up=up, padding=padding
        )
        scale = gain if dcoefs is None else (dcoefs * gain).reshape(N, c_out, 1, 1)
    return _epilogue(y, scale, noise=noise, bias=bias, gain=gain)


def _epilogue(
    y: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    noise: torch.Tensor | None,
    bias: torch.Tensor | None,
    gain: float,
) -> torch.Tensor:
    """``y * scale + gain * (noise + bias)`` for y ``[N, O, H', W']``, scale ``[N, O, 1, 1]`` or a
    number, in as few passes over the big tensor as possible."""
    N, c_out = y.shape[:2]
    if noise is not None:
        if noise.ndim == 2:
            noise = noise.reshape(1, 1, *noise.shape)
        assert noise.ndim == 4 and noise.shape[1] == 1 and noise.shape[2:] == y.shape[2:], (
            f"noise must broadcast to [{N}, 1, {y.shape[2]}, {y.shape[3]}], got {tuple(noise.shape)}"
        )
        noise = noise.to(y.dtype)
    small = None  # the additive term when it has no batch dimension: [1, c_out or 1, H', W']
    if bias is not None:
        small = (bias.to(y.dtype) * gain).reshape(1, c_out, 1, 1)
    if noise is not None and noise.shape[0] == 1:
        small = noise * gain if small is None else small + noise * gain
        noise = None
        # Element-wise ops take their output layout from the first argument: keep y's.
        small = small.contiguous(memory_format=_memory_format(y))
    big = None if noise is None else noise * gain  # [N, 1, H', W']
    add = small if big is None else big
    if isinstance(scale, torch.Tensor):
        y = torch.addcmul(add, y, scale) if add is not None else y * scale
    elif scale != 1.0:
        y = y * scale if add is None else torch.add(add, y, alpha=scale)
    elif add is not None:
        y = y + add
    if big is not None and small is not None:
        y = y + small
    return y


def minibatch_std(
    x: torch.Tensor, group_size: int = 4, num_channels: int = 1, parts: int = 1
) -> torch.Tensor:
    """Append the minibatch standard deviation: ``[N, C, H, W] -> [N, C + num_channels, H, W]``.

    Samples ``n`` and ``n + N/G`` (and so on) form a group of ``G``; the std over the group,
    averaged over a channel slice and all pixels, becomes ``num_channels`` constant feature maps.
    ``G = min(group_size, N)``, lowered to the largest divisor of ``N`` when it does not divide it
    (the published code requires divisibility). ``parts``: ``x`` is that many minibatches of
    ``N / parts`` samples one after the other, grouped each on its own: the result equals
    ``parts`` separate calls (the discriminator scores reals and fakes in one pass this way).
    """
    assert x.ndim == 4, f"expected [N, C, H, W], got {tuple(x.shape)}"
    N, C, H, W = x.shape
    assert C % num_channels == 0, f"{C} channels do not split into {num_channels} groups"
    assert parts >= 1 and N % parts == 0, f"{N} samples do not split into {parts} minibatches"
    n = N // parts
    G = max(1, min(group_size, n))
    while n % G:
        G -= 1
    y = x.reshape(parts, G, n // G, num_channels, C // num_channels, H, W)
    y = y - y.mean(dim=1, keepdim=True)
    y = (y.square().mean(dim=1) + 1e-8).sqrt()  # [parts, n/G, F, c, H, W]
    y = y.mean(dim=[3, 4, 5])  # [parts, n/G, F]: sample p n + g n/G + j reads y[p, j]
    y = y[:, None, :, :, None, None].expand(parts, G, n // G, num_channels, H, W)
    return torch.cat([x, y.reshape(N, num_channels, H, W)], dim=1)
