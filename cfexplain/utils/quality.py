"""Generated-image quality on the features of the trained classifier (works offline).

Fréchet distance and KID come from torchmetrics; features are computed once per image set and
fed through an identity "extractor", so the real statistics are not recomputed per snapshot.
With ``inception_weights`` (a local file: nothing is downloaded) the Inception-v3 FID is added.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Identity(nn.Module):
    """Feature extractor for torchmetrics that receives features already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class FeatureStats:
    """Penultimate-layer features and class shares of a classifier ``[N,C,H,W] -> logits [N,K]``."""

    def __init__(self, classifier: nn.Module, device: torch.device, batch: int = 256) -> None:
        self.model, self.device, self.batch = classifier.eval(), device, batch
        head = None if isinstance(classifier, torch.jit.ScriptModule) else _last_linear(classifier)
        # TorchScript modules take no hooks: their logits stand in for features.
        self.head = head
        self.feature_source = (
            "penultimate layer (input of the last Linear)" if head is not None else "logits"
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, F]`` float64 features of images ``[N, C, H, W]`` in [-1, 1]."""
        out = []
        for x in images.split(self.batch):
            captured: list[torch.Tensor] = []
            hook = lambda m, a: captured.append(a[0])  # noqa: B023, E731  (used in this iteration)
            ctx = self.head.register_forward_pre_hook(hook) if self.head else None
            with contextlib.ExitStack() as stack:
                if ctx is not None:
                    stack.callback(ctx.remove)
                logits = self.model(x.to(self.device))
            out.append((captured[0] if captured else logits).flatten(1).double().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def class_shares(self, images: torch.Tensor) -> list[float]:
        """Share of images the classifier assigns to each class (argmax)."""
        preds = torch.cat(
            [self.model(x.to(self.device)).argmax(1).cpu() for x in images.split(self.batch)]
        )
        k = int(self.model(images[:1].to(self.device)).shape[1])
        return (torch.bincount(preds, minlength=k).double() / len(preds)).tolist()

    def compare(
        self, fake: torch.Tensor, real: torch.Tensor, kid: bool = False
    ) -> dict[str, float]:
        """Fréchet distance (and KID) between feature sets ``[N, F]``."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        ident = _Identity(real.shape[1])
        fid = FrechetInceptionDistance(feature=ident, reset_real_features=False)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out = {"fd_classifier": float(fid.compute())}
        if kid:
            n = min(len(real), len(fake))
            k = KernelInceptionDistance(feature=ident, subset_size=min(n, 200), subsets=20)
            k.update(real, real=True)
            k.update(fake, real=False)
            out["kid_classifier"] = float(k.compute()[0])
        return out


def inception_fd(
    fake: torch.Tensor, real: torch.Tensor, weights: str, device: torch.device
) -> float:
    """Inception-v3 FID of images ``[N, C, H, W]`` in [-1, 1], from a local weights file.

    Needs torch-fidelity (``pip install 'cfexplain[inception]'``); 1-channel images are repeated
    to 3 channels, as in the published protocol.
    """
    from pathlib import Path

    if not Path(weights).is_file():
        raise FileNotFoundError(f"generator.metrics.inception_weights: no such file {weights}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(
            feature=2048, normalize=True, feature_extractor_weights_path=str(weights)
        ).to(device)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"generator.metrics.inception_weights needs torch-fidelity: pip install 'cfexplain[inception]' ({e})"
        ) from e
    for imgs, is_real in ((real, True), (fake, False)):
        for x in imgs.split(64):
            x = (x.to(device) + 1) / 2
            fid.update(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, real=is_real)
    return float(fid.compute())
