"""Heatmap metrics on ground truth: localisation, faithfulness and the randomisation sanity check.

Every function is a batched torch function of maps ``[N, 1, H, W]`` (or ``[N, H, W]``, higher =
more relevant) and boolean masks ``[N, H, W]``; the caller chooses what "relevant" means (the
positive part or the magnitude of a signed map). A map of another size than its mask is
resized (bilinear) to the mask first, so a grad-CAM map at feature resolution can be scored
against a full-resolution mask.

Ties are split, never broken by pixel order: where several pixels share the deciding value
(the maximum, or the K-th largest), each gets the same fractional share. The scores are then
the expectation under random tie-breaking, and a constant map scores the mask's area share on
every localisation metric instead of whatever the raster order favours.

Why our own functions and not Quantus (0.6.0, read from its wheel; not a dependency):
- it works on numpy arrays through a model wrapper, loops in Python over samples and over
  perturbation steps (one forward pass per step), and pulls in opencv-python, pandas and
  cachetools that cfexplain does not otherwise need;
- its ``PointingGame`` counts a hit when *any* maximal pixel is in the mask (a constant map
  always hits) and stores NaN for an empty mask in a bool array, where it becomes True;
  ``RelevanceRankAccuracy`` breaks ties by ``argsort`` order; ``MPRT`` re-initialises layers
  in reverse *registration* order (not the order the forward pass runs them), reseeds the
  global RNG with the same seed for every layer and leaves it changed.
Where the definitions agree: :func:`pointing_game` = ``PointingGame`` (without ties);
:func:`relevance_mass` = ``RelevanceMassAccuracy`` on the positive part (Arras et al. define it
on positive relevance; Quantus sums signed values unless ``abs``/clipping is asked for);
:func:`relevance_rank` = ``RelevanceRankAccuracy`` = ``TopKIntersection`` with k = mask area
(without ties); :func:`deletion_insertion`'s deletion curve = ``PixelFlipping`` with a constant
baseline and ``return_auc_per_sample``; :func:`randomisation_check` = ``MPRT`` with
``layer_order="top_down"`` and Spearman similarity of absolute maps. :func:`iou_at_area` has no
Quantus counterpart.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfexplain.explain.metrics import spearman
from cfexplain.utils.images import gaussian_blur

# ----------------------------------------------------------------------------- localisation


def _prepare(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Validate; ``maps [N,1,h,w] | [N,h,w]``, ``masks bool [N,H,W]`` -> flat ``[N, H*W]`` each."""
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be a bool tensor [N, H, W], got "
            f"{getattr(masks, 'dtype', type(masks).__name__)} (use masks.bool())"
        )
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise ValueError(
            f"maps must be a float tensor [N, 1, H, W] or [N, H, W], got "
            f"{getattr(maps, 'dtype', type(maps).__name__)}"
        )
    if maps.ndim == 3:
        maps = maps[:, None]
    if maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be [N, 1, H, W] or [N, H, W], got shape {tuple(maps.shape)}")
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"maps and masks disagree on the number of images: maps {tuple(maps.shape)}, "
            f"masks {tuple(masks.shape)}"
        )
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    size = (int(masks.shape[-2]), int(masks.shape[-1]))
    maps = maps.detach().float()
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    masks = masks.to(maps.device)
    return maps.flatten(1), masks.flatten(1), size


def _disc(radius: int, device: torch.device) -> Tensor:
    """Disc structuring element ``[1, 1, 2r+1, 2r+1]`` (Euclidean distance <= r)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]


def dilate(masks: Tensor, radius: int) -> Tensor:
    """Masks ``bool [N, H, W]`` grown by ``radius`` pixels (a disc), ``bool [N, H, W]``."""
    if radius <= 0:
        return masks
    m = masks[:, None].float()
    return (F.conv2d(m, _disc(radius, masks.device), padding=radius) > 0)[:, 0]


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop").

    ``[N]``: 1.0 where the map's maximum lies in the mask dilated by ``tolerance`` px (a disc;
    Zhang et al. use 15 px at 224 px), 0.0 where it lies outside; NaN where the mask is empty.
    Tied maxima score the share of them inside the mask (a constant map scores the area share).
    """
    a, m, size = _prepare(maps, masks)
    if tolerance > 0:
        m = dilate(m.view(-1, *size), int(tolerance)).flatten(1)
    top = a == a.amax(1, keepdim=True)
    hit = (top & m).sum(1).float() / top.sum(1).float()
    return torch.where(m.any(1), hit, torch.full_like(hit, math.nan))


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras et al. 2022, CLEVR-XAI).

    ``[N]``: positive relevance inside the mask / total positive relevance. NaN where the map
    has no positive relevance or the mask is empty. A constant map scores the mask's area share.
    """
    a, m, _ = _prepare(maps, masks)
    pos = a.clamp_min(0)
    total = pos.sum(1)
    inside = (pos * m).sum(1)
    ok = (total > 0) & m.any(1)
    return torch.where(ok, inside / total.clamp_min(1e-30), torch.full_like(total, math.nan))


def _top_area_overlap(a: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Pixels of the K = |mask| most relevant that lie in the mask, with ties split: ``(I, K)``.

    The pixels strictly above the K-th largest value count fully; the ``K - n_above`` remaining
    places are shared by all pixels equal to it, each weighted ``(K - n_above) / n_equal``.
    """
    k = m.sum(1)
    kth = a.sort(1, descending=True).values.gather(1, (k - 1).clamp_min(0)[:, None])  # [N, 1]
    above, equal = a > kth, a == kth
    n_above, n_equal = above.sum(1).float(), equal.sum(1).float()
    share = (k.float() - n_above) / n_equal.clamp_min(1)
    inter = (above & m).sum(1).float() + share * (equal & m).sum(1).float()
    return inter, k.float()


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance rank accuracy (Arras et al. 2022, CLEVR-XAI).

    ``[N]``: share of the K most relevant pixels (K = mask area) that lie in the mask; ties at
    the K-th value are split. NaN where the mask is empty.
    """
    a, m, _ = _prepare(maps, masks)
    inter, k = _top_area_overlap(a, m)
    return torch.where(k > 0, inter / k.clamp_min(1), torch.full_like(k, math.nan))


def iou_at_area(maps: Tensor, masks: Tensor) -> Tensor:
    """IoU of the mask and the map binarised to keep as many pixels as the mask has ``[N]``.

    The binarised map is the top-K set of :func:`relevance_rank` (tied pixels get fractional
    membership; IoU = Σmin/Σmax of the two memberships). Both sets have K pixels, so with the
    overlap I: IoU = I / (2K - I), a monotone function of the rank accuracy I / K. NaN where
    the mask is empty. (Binarising at the mask-area percentile, as in weakly supervised
    localisation, e.g. Zhou et al. 2016 CAM, but without their box fitting.)
    """
    a, m, _ = _prepare(maps, masks)
    inter, k = _top_area_overlap(a, m)
    return torch.where(
        k > 0, inter / (2 * k - inter).clamp_min(1e-30), torch.full_like(k, math.nan)
    )


def localisation(maps: Tensor, masks: Tensor, tolerance: int = 0) -> dict[str, Tensor]:
    """All four localisation scores ``{"pointing_game", "relevance_mass", "relevance_rank",
    "iou_at_area"}``, each ``[N]`` (NaN for an empty mask)."""
    return {
        "pointing_game": pointing_game(maps, masks, tolerance),
        "relevance_mass": relevance_mass(maps, masks),
        "relevance_rank": relevance_rank(maps, masks),
        "iou_at_area": iou_at_area(maps, masks),
    }


# ----------------------------------------------------------------------------- faithfulness


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no BatchNorm statistics updated by perturbed images); each flag restored."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, t in flags:
            m.training = t


def blurred(x: Tensor, sigma: float = 5.0) -> Tensor:
    """Gaussian blur of images ``[N, C, H, W]`` (reflect padding): RISE's insertion canvas.

    Pass ``baseline=blurred(x)`` to :func:`deletion_insertion` for Petsiuk et al.'s variant.
    """
    return gaussian_blur(x, sigma)


def perturbation_curves(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int = 16,
    baseline: float | Tensor = -1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Deletion and insertion curves (Petsiuk et al. 2018, RISE).

    Pixels are ranked by ``maps`` (``[N, 1, h, w]`` or ``[N, h, w]``, resized to ``x``; ties
    broken by one seeded random permutation, not by raster order). Step k = 0..steps acts on
    the top ``round(k / steps * H * W)`` pixels, all channels at once: deletion replaces them
    by ``baseline`` in ``x``; insertion copies them from ``x`` into ``baseline``. Records the
    softmax probability of ``target`` (an int or ``[N]``).

    ``baseline`` is a value or an image broadcastable to ``x`` ``[N, C, H, W]``. The default -1
    (black) is the background of the radiograph phantoms, so both curves end in an image the
    classifier has seen, and deletion and insertion differ only in direction; RISE's blurred
    insertion canvas is ``baseline=blurred(x)``.

    Returns ``{"fractions": [S+1], "deletion": [N, S+1], "insertion": [N, S+1]}`` on the CPU.
    The ``2 N (S+1)`` perturbed images are built chunk by chunk and go through ``model`` in
    ``ceil(2 N (S+1) / batch_size)`` forward passes under ``torch.no_grad()`` in eval mode.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images [N, C, H, W], got shape {tuple(x.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    n, _, h, w = x.shape
    p = h * w
    if maps.shape[0] != n:
        raise ValueError(f"maps {tuple(maps.shape)} and x {tuple(x.shape)} disagree on N")
    a, _, _ = _prepare(maps, torch.zeros(n, h, w, dtype=torch.bool))
    x = x.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        base = base.expand_as(x)
    except RuntimeError as err:
        raise ValueError(
            f"baseline of shape {tuple(base.shape)} does not broadcast to x {tuple(x.shape)}"
        ) from err
    tgt = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if len(tgt) not in (1, n):
        raise ValueError(f"target must be an int or [N={n}] class indices, got {tuple(tgt.shape)}")
    tgt = tgt.expand(n).to(x.device)

    # Rank of every pixel (0 = most relevant); ties follow a seeded permutation.
    perm = torch.randperm(p, generator=torch.Generator().manual_seed(seed))
    order = perm[a.cpu()[:, perm].argsort(dim=1, descending=True, stable=True)]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(n, p).contiguous())
    rank = rank.to(x.device)
    counts = torch.linspace(0, p, steps + 1).round().long().to(x.device)  # pixels acted on

    frames = n * (steps + 1)
    probs = torch.empty(2 * frames)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, 2 * frames, batch_size):
            j = torch.arange(start, min(start + batch_size, 2 * frames), device=x.device)
            insert, i, k = j // frames, (j % frames) // (steps + 1), j % (steps + 1)
            top = rank[i] < counts[k][:, None]  # [B, P]
            # deletion: baseline on the top pixels; insertion: baseline everywhere else.
            use_base = (top ^ (insert[:, None] == 1)).view(-1, 1, h, w)
            img = torch.where(use_base, base[i], x[i])
            prob = model(img).float().softmax(1)
            probs[start : start + len(j)] = prob[
                torch.arange(len(j), device=prob.device), tgt[i]
            ].cpu()
    curves = probs.view(2, n, steps + 1)
    return {
        "fractions": counts.cpu().double() / p,
        "deletion": curves[0],
        "insertion": curves[1],
    }


def deletion_insertion(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int = 16,
    baseline: float | Tensor = -1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Deletion and insertion AUC (Petsiuk et al. 2018, RISE) ``{"deletion": [N], "insertion": [N]}``.

    Areas under :func:`perturbation_curves` by the trapezoid rule over the fraction of pixels
    acted on, in [0, 1]. Lower deletion and higher insertion AUC mean a more faithful map.
    """
    c = perturbation_curves(model, x, maps, target, steps, baseline, batch_size, seed)
    fr = c["fractions"].float()
    return {
        "deletion": torch.trapezoid(c["deletion"], fr, dim=1),
        "insertion": torch.trapezoid(c["insertion"], fr, dim=1),
    }


# ----------------------------------------------------------------------------- randomisation


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of ``a`` and ``b`` ``[N, ...]`` image by image ``[N]``.

    NaN where ``a`` is constant (nothing to compare against); 0 where only ``b`` is.
    """
    a, b = a.flatten(1), b.flatten(1)
    constant = (a == a[:, :1]).all(1)
    return torch.where(constant, torch.nan, spearman(a, b))


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5) -> Tensor:
    """Mean SSIM (Wang et al. 2004, torchmetrics) of maps ``[N, 1, H, W]`` each scaled to [0, 1]
    by its max ``[N]``: Gaussian window (σ = 1.5, 11 px, smaller on tiny maps), data range 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    def unit(m: Tensor) -> Tensor:
        m = m.detach().double().abs()
        return m / m.flatten(1).amax(1).clamp_min(1e-30)[:, None, None, None]

    size = min(a.shape[-2:])
    kernel = max(3, min(11, size if size % 2 else size - 1))
    s = structural_similarity_index_measure(
        unit(a), unit(b), sigma=sigma, kernel_size=kernel, data_range=1.0, reduction="none"
    )
    return s.float()


@dataclass
class RandomisationResult:
    """Cascading model-parameter randomisation of one method (Adebayo et al. 2018).

    ``spearman[i]`` / ``ssim[i]``: mean over images after re-initialising ``layers[: i + 1]``;
    ``final`` the last of them (every layer random), ``cascade`` the mean |ρ| over all steps,
    which decides ``passed``.
    """

    layers: list[str]
    spearman: list[float]
    final: float
    cascade: float
    passed: bool
    threshold: float
    ssim: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_layer(m: nn.Module) -> bool:
    """A layer to randomise: owns parameters, or is a norm layer with running statistics."""
    return isinstance(m, nn.modules.batchnorm._NormBase) or any(
        True for _ in m.parameters(recurse=False)
    )


def _reinit(module: nn.Module, recurse: bool) -> None:
    """Fresh initial values for a module's parameters (and all its submodules' if ``recurse``).

    ``reset_parameters()`` where the module has one (BatchNorm: weight 1, bias 0, running mean
    0 and variance 1); otherwise PyTorch's default Linear/Conv init for tensors of >= 2
    dimensions and U(-1/√n, 1/√n) for the rest.
    """
    for m in module.modules() if recurse else [module]:
        if not _is_layer(m):
            continue
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
            continue
        with torch.no_grad():
            for p in m.parameters(recurse=False):
                if p.ndim >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                else:
                    bound = 1 / math.sqrt(max(1, p.numel()))
                    nn.init.uniform_(p, -bound, bound)


def _execution_order(model: nn.Module, run: Callable[[], Tensor]) -> tuple[list[str], Tensor]:
    """Names of ``model``'s layers in the order they first run during ``run()``, and its result."""
    seen: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if _is_layer(m):

            def hook(_m: nn.Module, _args: object, name: str = name) -> None:
                if name not in seen:
                    seen.append(name)

            handles.append(m.register_forward_pre_hook(hook))
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return seen, out


def randomisation_check(
    model: nn.Module,
    attribute: Callable[[nn.Module], Tensor],
    *,
    threshold: float = 0.5,
    seed: int = 0,
    layers: Sequence[str] | None = None,
) -> RandomisationResult:
    """Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

    ``attribute(m) -> [N, 1, H, W]`` computes the method's maps of model ``m`` for a fixed batch
    (the caller closes over the images and the target). On a deep copy of ``model`` (in eval
    mode; ``model`` itself is never touched), layers are re-initialised one at a time from the
    output towards the input, cumulatively, and the maps recomputed after each step; each step
    records the mean over images of the Spearman correlation between the absolute maps of the
    trained and the randomised model (and their SSIM).

    ``layers`` (module names) sets the steps, each re-initialising everything inside it; by
    default every module that owns parameters or running statistics (BatchNorm counts) is one
    step, in reverse order of the first call in the trained model's forward pass during
    ``attribute`` (layers it never calls, e.g. a head read directly by CAM, come first; when
    ``attribute`` does not run the model at all, reverse registration order).

    ``passed`` is ``cascade < threshold``, ``cascade`` being the mean |ρ| over the steps: a map
    must follow the learnt weights all the way down, not only once the input layer is random.
    That is Adebayo et al.'s finding for guided backprop, whose maps survive the randomisation
    of every layer but the first (``final`` alone would pass it). 0.5 is our convention: maps
    sharing on average more than a quarter of their rank variance (ρ² > 0.25) with the trained
    model's while its weights are destroyed depend more on the input than on what the model
    learnt. Re-initialisation and every
    ``attribute`` call run under ``torch.random.fork_rng`` seeded with ``seed``: reproducible,
    and the caller's global RNG is left as it was.
    """
    rand = copy.deepcopy(model).eval()
    devices = sorted({p.device.index or 0 for p in rand.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        order, ref = _execution_order(rand, lambda: attribute(rand))
        ref = ref.detach().abs()
        if ref.ndim != 4 or ref.shape[1] != 1:
            raise ValueError(f"attribute must return maps [N, 1, H, W], got {tuple(ref.shape)}")
        modules = dict(rand.named_modules())
        if layers is None:
            every = [name for name, m in modules.items() if _is_layer(m)]
            unseen = [name for name in every if name not in order]
            steps = unseen[::-1] + order[::-1]
            recurse = False
        else:
            missing = [name for name in layers if name not in modules]
            if missing:
                children = [name for name, _ in rand.named_children()]
                raise ValueError(
                    f"layers {missing} are not modules of the model; top level: {children}"
                )
            steps, recurse = list(layers), True
        if not steps:
            raise ValueError(f"{type(model).__name__} has no parameters to randomise")
        rhos, sims = [], []
        for name in steps:
            _reinit(modules[name], recurse)
            maps = attribute(rand).detach().abs()
            if maps.shape != ref.shape:
                raise ValueError(
                    f"attribute returned {tuple(maps.shape)} after randomising {name!r}, "
                    f"{tuple(ref.shape)} before"
                )
            rho = rank_correlation(ref, maps)
            rhos.append(rho.nanmean().item() if (~rho.isnan()).any() else math.nan)
            sims.append(ssim(ref, maps).mean().item())
    final = rhos[-1]
    cascade = float(np.mean(np.abs(rhos)))
    return RandomisationResult(
        layers=steps,
        spearman=rhos,
        final=final,
        cascade=cascade,
        passed=bool(cascade < threshold),  # NaN (constant trained maps) never passes
        threshold=threshold,
        ssim=sims,
    )
