"""Normative models: autoencoders trained on healthy images only (VAE and AAE).

An abnormal image is reconstructed as its healthy counterpart, so the residual ``|x - x̂|``
shows where the abnormality is. Both models share one convolutional encoder/decoder with a
*spatial* latent ``[latent_channels, R / 2**levels, R / 2**levels]`` (``[4, 8, 8]`` at 64 px):
it reconstructs anatomy much more sharply than a flat vector of the same size, while its small
depth still forces a healthy-looking reconstruction.

- :class:`ConvVAE`: Gaussian posterior, reparameterisation, β-weighted KL (losses below).
- :class:`ConvAAE`: deterministic code; :class:`LatentDiscriminator` tells codes from N(0, I)
  samples (Makhzani et al. 2015).

Both answer ``anomaly(x) -> (reconstruction, residual, score)``; ``load_normative(stage_dir)``
rebuilds them from a finished ``normative`` stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cfexplain.utils.images import gaussian_blur

MODEL_NAMES = ("vae", "aae")


# ----------------------------------------------------------------------------- losses


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample ``[N]``, summed over latent dimensions."""
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps`` for a given standard-normal ``eps`` (same shape)."""
    return mu + (0.5 * logvar).exp() * eps


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample reconstruction error ``[N]``: mean absolute (``l1``) or squared (``l2``) error."""
    if kind == "l1":
        err = (x - recon).abs()
    elif kind == "l2":
        err = (x - recon).square()
    else:
        raise ValueError(f"normative.recon_loss must be 'l1' or 'l2', got {kind!r}")
    return err.flatten(1).mean(1)


def d_prior_loss(prior_logits: torch.Tensor, code_logits: torch.Tensor) -> torch.Tensor:
    """Latent discriminator loss: prior samples are 'real' (1), encoder codes 'fake' (0)."""
    return F.softplus(-prior_logits).mean() + F.softplus(code_logits).mean()


def g_prior_loss(code_logits: torch.Tensor) -> torch.Tensor:
    """Encoder's adversarial loss (non-saturating): make codes look like prior samples."""
    return F.softplus(-code_logits).mean()


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples ``a [N, D]`` and ``b [M, D]`` (RBF kernel).

    The bandwidth defaults to the median pairwise distance of the pooled samples.
    """
    pooled = torch.cat([a, b])
    d2 = torch.cdist(pooled, pooled).square()
    if bandwidth is None:
        bandwidth = float(d2[d2 > 0].median().sqrt())
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


# ----------------------------------------------------------------------------- anomaly maps


def residual_map(x: torch.Tensor, recon: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """``|x - x̂|`` averaged over channels ``[N, 1, H, W]`` (>= 0, <= 2), optionally smoothed."""
    return gaussian_blur((x - recon).abs().mean(1, keepdim=True), sigma)


def anomaly_score(residual: torch.Tensor, kind: str = "mean") -> torch.Tensor:
    """Image-level score ``[N]`` of a residual ``[N, 1, H, W]``: ``mean`` or a percentile ``pXX``."""
    flat = residual.flatten(1)
    if kind == "mean":
        return flat.mean(1)
    if kind.startswith("p") and kind[1:].replace(".", "", 1).isdigit():
        q = float(kind[1:]) / 100
        if 0 <= q <= 1:
            return flat.quantile(q, dim=1)
    raise ValueError(f"normative.score must be 'mean' or a percentile like 'p99', got {kind!r}")


# ----------------------------------------------------------------------------- networks


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: a reconstruction must not depend on the other images in a batch.
    return nn.GroupNorm(min(8, channels), channels)


def _widths(width: int, levels: int, width_max: int) -> list[int]:
    return [min(width * 2**i, width_max) for i in range(levels)]


def _level(c_in: int, c_out: int, blocks: int, up: bool) -> list[nn.Module]:
    """One resolution level: a stride-2 (transposed) 4x4 conv, then ``blocks`` 3x3 convs."""
    conv = nn.ConvTranspose2d if up else nn.Conv2d
    layers: list[nn.Module] = [conv(c_in, c_out, 4, stride=2, padding=1), _norm(c_out), nn.SiLU()]
    for _ in range(blocks):
        layers += [nn.Conv2d(c_out, c_out, 3, padding=1), _norm(c_out), nn.SiLU()]
    return layers


def conv_stack(c_in: int, widths: list[int], c_out: int, blocks: int, up: bool) -> nn.Sequential:
    """Encoder (``up=False``: ``[N, c_in, R, R] -> [N, c_out, R / 2**L, R / 2**L]``, L = len(widths))
    or decoder (``up=True``: the reverse; output unbounded, clamp to [-1, 1] for display).

    Transposed 4x4 stride-2 convs upsample: their kernels overlap evenly (no checkerboard) and
    cost less than nearest upsampling followed by a 3x3 conv at the higher resolution.
    """
    layers: list[nn.Module] = []
    if up:
        layers += [nn.Conv2d(c_in, widths[0], 3, padding=1), _norm(widths[0]), nn.SiLU()]
        c_in = widths[0]
    for c in widths:
        layers += _level(c_in, c, blocks, up)
        c_in = c
    layers.append(nn.Conv2d(c_in, c_out, 3, padding=1) if up else nn.Conv2d(c_in, c_out, 1))
    return nn.Sequential(*layers)


class NormativeModel(nn.Module):
    """An autoencoder of healthy images: ``reconstruct(x)`` and ``anomaly(x)``.

    Args:
        img_channels, img_resolution: image shape (resolution divisible by ``2**levels``).
        latent_channels: channels of the spatial code ``[latent_channels, R/2**L, R/2**L]``.
        width, levels, width_max: encoder/decoder channels (doubling per level, capped).
        blocks: 3x3 convs after the stride-2 conv of each level.
        residual_sigma: Gaussian smoothing (pixels) of the residual map; 0 = none.
        score: image score of the residual, ``mean`` or a percentile such as ``p99``.
    """

    kind = "base"

    def __init__(
        self,
        img_channels: int = 1,
        img_resolution: int = 64,
        latent_channels: int = 4,
        width: int = 32,
        levels: int = 3,
        width_max: int = 128,
        blocks: int = 1,
        residual_sigma: float = 0.0,
        score: str = "mean",
        _code_channels: int | None = None,
    ) -> None:
        super().__init__()
        if img_resolution % 2**levels:
            raise ValueError(
                f"normative: img_resolution={img_resolution} is not divisible by 2**levels={2**levels}"
            )
        anomaly_score(torch.zeros(1, 1, 2, 2), score)  # fail at construction on a bad `score`
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.latent_channels = latent_channels
        self.latent_shape = (
            latent_channels,
            img_resolution // 2**levels,
            img_resolution // 2**levels,
        )
        self.residual_sigma, self.score = float(residual_sigma), score
        widths = _widths(width, levels, width_max)
        self.encoder = conv_stack(
            img_channels, widths, _code_channels or latent_channels, blocks, up=False
        )
        self.decoder = conv_stack(latent_channels, widths[::-1], img_channels, blocks, up=True)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic code ``[N, *latent_shape]`` of images ``[N, C, R, R]``."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Healthy reconstruction ``[N, C, R, R]`` (from the deterministic code)."""
        return self.decoder(self.code(x))

    @torch.no_grad()
    def anomaly(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, C, R, R]`` in [-1, 1] -> (reconstruction [N, C, R, R] in [-1, 1], residual [N, 1, R, R] >= 0, score [N])."""
        assert x.ndim == 4 and tuple(x.shape[1:]) == (
            self.img_channels,
            self.img_resolution,
            self.img_resolution,
        ), (
            f"{self.kind}: images must be [N, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], got {tuple(x.shape)}"
        )
        recon = self.reconstruct(x).clamp(-1, 1)
        residual = residual_map(x, recon, self.residual_sigma)
        return recon, residual, anomaly_score(residual, self.score)


class ConvVAE(NormativeModel):
    """Variational autoencoder: the encoder gives ``mu, logvar`` of a Gaussian spatial code."""

    kind = "vae"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs, _code_channels=2 * kwargs.get("latent_channels", 4))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``, each ``[N, *latent_shape]``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        # Bounded log-variance: exp() of an early outlier would overflow the KL.
        return mu, logvar.clamp(-12.0, 8.0)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]


class ConvAAE(NormativeModel):
    """Adversarial autoencoder: deterministic code, pushed toward N(0, I) by a latent discriminator."""

    kind = "aae"

    def code(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class LatentDiscriminator(nn.Module):
    """MLP on the flattened code ``[N, *latent_shape] -> logits [N]``: prior sample or encoder code."""

    def __init__(self, latent_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(latent_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


# ----------------------------------------------------------------------------- loading


def load_normative(
    stage_dir: str | Path, device: str | torch.device | None = None
) -> dict[str, NormativeModel]:
    """The models of a finished ``normative`` stage, by name (``vae``, ``aae``), in eval mode."""
    from cfexplain.utils.artifacts import Artifact, ArtifactError, load_model

    art = Artifact.load(stage_dir)
    names = [n for n in art.info.get("models", []) if n in art.files]
    if not names:
        raise ArtifactError(
            f"{Path(stage_dir) / 'artifact.json'}: no normative models listed (expected files {MODEL_NAMES})"
        )
    device = device if device is not None else "cpu"
    return {n: load_model(art.path(n), map_location=device) for n in names}
