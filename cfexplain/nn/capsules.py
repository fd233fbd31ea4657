"""A concept-capsule classifier in the style of DX-Caps (LaLonde et al. 2019).

conv stem -> primary capsules (a convolution whose channels are ``types`` capsules of
``primary_dim`` per position) -> dynamic routing by agreement (Sabour et al. 2017) to one
output capsule per named attribute -> the diagnosis from the attribute capsules' poses (a linear
head), and a decoder that redraws the image from those poses (the regulariser). The length of
attribute capsule ``a`` (in [0, 1)) is its reading of attribute ``a``: the explanation is in
the clinician's terms.

``forward(x)`` gives the class logits only, so every map and the counterfactual engine treat it
like any other classifier; :meth:`CapsuleClassifier.outputs` gives everything for training and
the gallery. grad-CAM reads the primary capsules' convolution (``cam_layer``), the last spatial
map before routing. LRP does not apply: routing and squashing are no layers with a relevance
rule (``unsupported_methods`` says so, and the explain page names it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# |s|^2 is capped here inside squash: |v| <= 1e6 / (1 + 1e6) < 1 even in float32.
_MAX_SQUARED_NORM = 1e6


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``v = |s|^2 / (1 + |s|^2) * s / |s|``: same direction, length in [0, 1)."""
    # The norm of s / max|s|, rescaled: no overflow of |s|^2 for huge poses.
    peak = s.abs().amax(dim, keepdim=True).clamp_min(eps)
    norm = peak * torch.linalg.vector_norm(s / peak, dim=dim, keepdim=True)
    n2 = (norm * norm).clamp(max=_MAX_SQUARED_NORM)
    return s / norm.clamp_min(eps) * (n2 / (1.0 + n2))


def route(votes: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """Dynamic routing by agreement (Sabour et al. 2017, procedure 1).

    ``votes [N, I, J, D]``: each of I input capsules' prediction for each of J output capsules.
    Returns ``(v [N, J, D] squashed outputs, c [N, I, J] coupling coefficients)``. The logits
    start at 0 (uniform coupling); each iteration adds the agreement ``votes · v``. The votes
    are detached in all but the last iteration, so the gradient flows through one weighted sum
    (as in most implementations: cheaper, and the coupling acts as attention, not a parameter).
    """
    assert votes.ndim == 4, f"votes must be [N, I, J, D], got {tuple(votes.shape)}"
    b = votes.new_zeros(votes.shape[:3])
    detached = votes.detach()
    for r in range(iterations):
        c = torch.softmax(b, dim=2)
        u = votes if r == iterations - 1 else detached
        v = squash((c[..., None] * u).sum(1))
        if r < iterations - 1:
            b = b + (detached * v[:, None]).sum(-1)
    return v, c


def lengths(v: Tensor) -> Tensor:
    """Capsule lengths ``[..., J]`` of capsules ``[..., J, D]``."""
    return torch.sqrt((v * v).sum(-1) + 1e-12)


class CapsuleOutputs(NamedTuple):
    """Everything one forward pass gives: ``logits [N, K]``, ``attributes [N, A]`` (capsule
    lengths in [0, 1)), ``poses [N, A, D]``, ``reconstruction [N, C, H, W]`` in [-1, 1]."""

    logits: Tensor
    attributes: Tensor
    poses: Tensor
    reconstruction: Tensor


class CapsuleClassifier(nn.Module):
    """``x [N, C, H, W] -> logits [N, num_classes]`` through named attribute capsules.

    Args:
        in_channels: image channels.
        num_classes: diagnosis logits.
        resolution: input size R (square); the primary grid is R/8 (the stem and the primary
            capsules halve it three times), each position with its own vote weights.
        attributes: names of the attribute capsules, one output capsule each.
        width: channels of the stem's first convolution (then 2x, 4x).
        types: primary capsule types per position.
        primary_dim: dimensions of a primary capsule.
        capsule_dim: dimensions of an attribute capsule.
        routing: routing iterations.
        decoder_width: channels of the decoder's first feature map (R/8 px).
    """

    # Methods that do not apply, and why (the explain page shows the reason).
    unsupported_methods = {
        "lrp": "the capsule classifier routes by agreement and squashes vectors; zennit has no "
        "relevance rule for either, so LRP would be a plain gradient there",
        "cam": "the capsule classifier's head reads attribute capsules, not a global average "
        "pool (use gradcam: it reads the primary capsules)",
    }

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        resolution: int = 64,
        attributes: Sequence[str] = ("capsule_0", "capsule_1", "capsule_2", "capsule_3"),
        width: int = 16,
        types: int = 8,
        primary_dim: int = 8,
        capsule_dim: int = 16,
        routing: int = 3,
        decoder_width: int = 16,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if resolution % 8 or resolution < 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        if not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes must be distinct names, got {list(attributes)}")
        if routing < 1:
            raise ValueError(f"routing must be >= 1 iteration, got {routing}")
        self.in_channels, self.num_classes, self.resolution = in_channels, num_classes, resolution
        self.attributes = [str(a) for a in attributes]
        self.types, self.primary_dim, self.capsule_dim = types, primary_dim, capsule_dim
        self.routing = routing
        self.grid = resolution // 8
        A = len(self.attributes)

        def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        # Strided from the first layer, as the ResNet's stem_stride=2: the capsules' cost stays
        # in the routing, not in full-resolution convolutions.
        self.stem = nn.Sequential(
            *conv(in_channels, width, 2), *conv(width, 2 * width, 2), *conv(2 * width, 4 * width, 1)
        )
        self.primary = nn.Conv2d(4 * width, types * primary_dim, 3, stride=2, padding=1)
        n_in = self.grid * self.grid * types
        # One vote matrix per primary capsule and attribute: [I, J, D, d].
        self.votes = nn.Parameter(torch.randn(n_in, A, capsule_dim, primary_dim) * 0.05)
        self.head = nn.Linear(A * capsule_dim, num_classes)
        g = self.grid
        self.decoder_in = nn.Linear(A * capsule_dim, decoder_width * g * g)
        self.decoder_width = decoder_width
        ups: list[nn.Module] = []
        c = decoder_width
        for _ in range(3):
            ups += [nn.ConvTranspose2d(c, max(c // 2, 8), 4, stride=2, padding=1), nn.ReLU()]
            c = max(c // 2, 8)
        self.decoder = nn.Sequential(*ups, nn.Conv2d(c, in_channels, 3, padding=1), nn.Tanh())

    @property
    def cam_layer(self) -> nn.Module:
        """The primary capsules' convolution: the last spatial map, it feeds every vote."""
        return self.primary

    def capsules(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [N, C, R, R] -> (poses [N, A, D], coupling [N, I, A])``."""
        assert x.ndim == 4 and x.shape[1] == self.in_channels, (
            f"expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
        )
        assert x.shape[-1] == x.shape[-2] == self.resolution, (
            f"expected {self.resolution} px images, got {tuple(x.shape)}"
        )
        p = self.primary(self.stem(x))  # [N, T*d, g, g]
        n = x.shape[0]
        u = p.view(n, self.types, self.primary_dim, self.grid, self.grid)
        u = squash(u.permute(0, 3, 4, 1, 2).reshape(n, -1, self.primary_dim))  # [N, I, d]
        votes = torch.einsum("ijdk,nik->nijd", self.votes, u)
        return route(votes, self.routing)

    def decode(self, poses: Tensor) -> Tensor:
        """``poses [N, A, D] -> image [N, C, R, R]`` in [-1, 1]."""
        h = F.relu(self.decoder_in(poses.flatten(1)))
        return self.decoder(h.view(-1, self.decoder_width, self.grid, self.grid))

    def outputs(self, x: Tensor) -> CapsuleOutputs:
        poses, _ = self.capsules(x)
        return CapsuleOutputs(
            logits=self.head(poses.flatten(1)),
            attributes=lengths(poses),
            poses=poses,
            reconstruction=self.decode(poses),
        )

    def forward(self, x: Tensor, outputs: bool = False) -> Tensor | CapsuleOutputs:
        """The class logits ``[N, K]``; with ``outputs=True`` everything (:meth:`outputs`:
        training calls it so, through DistributedDataParallel)."""
        if outputs:
            return self.outputs(x)
        poses, _ = self.capsules(x)
        return self.head(poses.flatten(1))

    def attribute_values(self, x: Tensor) -> Tensor:
        """The attribute readings ``[N, A]`` in [0, 1) of images ``x``."""
        return lengths(self.capsules(x)[0])

    def attribute_reconstructions(self, x: Tensor) -> Tensor:
        """``[N, A, C, R, R]``: the image redrawn from each attribute capsule alone (the others
        zeroed), what that capsule encodes."""
        poses, _ = self.capsules(x)
        A = poses.shape[1]
        eye = torch.eye(A, device=poses.device, dtype=poses.dtype)
        alone = poses[:, None] * eye[None, :, :, None]  # [N, A(kept), A, D]
        out = self.decode(alone.flatten(0, 1))
        return out.view(x.shape[0], A, *out.shape[1:])


def capsule_losses(
    out: CapsuleOutputs,
    x: Tensor,
    y: Tensor,
    targets: Tensor | None,
    attribute_weight: float,
    reconstruction_weight: float,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The training loss and its terms: cross-entropy of the diagnosis, mean squared error of
    the attribute lengths against ``targets [N, A]`` in [0, 1] (None when
    ``attribute_weight`` is 0: unsupervised capsules), and of the reconstruction against ``x``."""
    terms = {
        "diagnosis": F.cross_entropy(out.logits, y, label_smoothing=label_smoothing),
        "reconstruction": F.mse_loss(out.reconstruction, x),
    }
    loss = terms["diagnosis"] + reconstruction_weight * terms["reconstruction"]
    if attribute_weight > 0:
        assert targets is not None and targets.shape == out.attributes.shape, (
            "attribute targets must match the capsules",
            None if targets is None else tuple(targets.shape),
            tuple(out.attributes.shape),
        )
        terms["attributes"] = F.mse_loss(out.attributes, targets)
        loss = loss + attribute_weight * terms["attributes"]
    return {"loss": loss, **terms}


def capsule_net(model: nn.Module) -> CapsuleClassifier | None:
    """The capsule classifier in ``model`` (also inside a wrapper), or None."""
    for m in (model, getattr(model, "model", None)):
        if isinstance(m, CapsuleClassifier):
            return m
    return None
