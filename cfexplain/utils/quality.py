"""Generated-image quality on the features of the trained classifier (works offline).

Fréchet distance and KID come from torchmetrics; features are computed once per image set and
fed through an identity "extractor", so the real statistics are not recomputed per snapshot.
They never sync across processes (``sync_on_compute=False``): under torchrun rank 0 alone
computes them, and a sync there would wait forever for the other ranks.
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
        from torchmetrics.image.kid import KernelInceptionDistance

        out = {"fd_classifier": frechet_distance(real, fake)}
        if kid:
            n = min(len(real), len(fake))
            ident = _Identity(real.shape[1])
            k = KernelInceptionDistance(
                feature=ident, subset_size=min(n, 200), subsets=20, sync_on_compute=False
            )
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
            feature=2048,
            normalize=True,
            feature_extractor_weights_path=str(weights),
            sync_on_compute=False,
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


# ----------------------------------------------------------------------------- fixed yardsticks
# The classifier-feature FD above moves with every trained classifier. These take any fixed
# feature set (e.g. nn.perceptual.FixedFeatures, whose weights ship inside a wheel) and plain
# factor readings, so two runs' numbers can be compared.


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``[N, F]`` and ``[M, F]``:
    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (torchmetrics' FID on features
    already computed, as :meth:`FeatureStats.compare` uses it)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Identity(real.shape[1]), sync_on_compute=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[N]`` distance of each row of ``x`` to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the row itself (0)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """``[M]`` whether each point lies in at least one ball (centre, radius)."""
    return (torch.cdist(points, centres) <= radii[None]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features ``[N, F]``, ``[M, F]``.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: share of fakes inside the real manifold (realism); recall: share of
    reals inside the fake manifold (coverage of the real variety).
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_radius(real, k)).double().mean()
    recall = _covered(real, fake, _kth_radius(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def factor_coverage(
    real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], rates: tuple[str, ...] = ()
) -> dict[str, float]:
    """How well generated images cover the real factors (readings ``[N]`` per factor name).

    Per factor: the 1-D Wasserstein distance between the real and generated readings, in units
    of the real readings' std (``w1/<factor>``). Factors named in ``rates`` are 0/1 readings
    (marker present, left knee): their shares are reported for both sets
    (``rate/<factor>/real`` and ``rate/<factor>/generated``) instead.
    """
    from scipy.stats import wasserstein_distance

    out: dict[str, float] = {}
    for name in sorted(real):
        r, f = real[name].double().cpu().numpy(), fake[name].double().cpu().numpy()
        if name in rates:
            out[f"rate/{name}/real"] = float((r > 0.5).mean())
            out[f"rate/{name}/generated"] = float((f > 0.5).mean())
            continue
        std = float(r.std())
        w1 = wasserstein_distance(r, f)
        out[f"w1/{name}"] = float(w1 / std) if std > 0 else float("inf") if w1 > 0 else 0.0
    return out


def class_conditional_fd(
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    min_count: int = 2,
) -> dict[str, object]:
    """Fréchet distance of fakes against the real images of *their* class (features ``[N, F]``
    and ``[M, F]``, integer labels ``[N]`` and ``[M]``; a fake's label is e.g. the class the
    classifier gives it).

    Per class with at least ``min_count`` images on both sides: the distance of that class's
    fakes to that class's reals; ``fd``: their mean weighted by the number of fakes, so a frame
    is judged against the images it claims to be like. Returns ``fd`` (NaN when no class
    qualifies), ``per_class`` ``{label: fd}``, ``counts`` ``{label: fakes}`` and
    ``skipped_fakes``: fakes of classes left out (too few images on either side).
    """
    if min_count < 2:
        raise ValueError(f"class_conditional_fd: min_count must be >= 2, got {min_count}")
    assert real.ndim == 2 and fake.ndim == 2 and real.shape[1] == fake.shape[1], (
        f"features must be [N, F] and [M, F], got {tuple(real.shape)} and {tuple(fake.shape)}"
    )
    assert real_labels.shape == real.shape[:1] and fake_labels.shape == fake.shape[:1], (
        "one label per feature row"
    )
    per_class: dict[int, float] = {}
    counts: dict[int, int] = {}
    skipped = 0
    for c in sorted({int(v) for v in fake_labels.tolist()}):
        f, r = fake[fake_labels == c], real[real_labels == c]
        if len(f) < min_count or len(r) < min_count:
            skipped += len(f)
            continue
        per_class[c], counts[c] = frechet_distance(r, f), len(f)
    total = sum(counts.values())
    fd = sum(per_class[c] * counts[c] for c in per_class) / total if total else float("nan")
    return {"fd": fd, "per_class": per_class, "counts": counts, "skipped_fakes": skipped}
