"""Counterfactual sequences: x → w = E(x) → G(w + λα) for a λ grid, with f's probability per frame.

Schutte et al. 2021: walking along the direction α in W that the classifier's decision follows
shows how the image would have to change for the classifier to change its mind. All frames of a
batch go through G and f in as few passes as ``max_batch`` allows.

With more than two ordered classes (KL grades) and an ordinal direction, ``walk="ordinal"``
renders the progression from the lowest grade to the highest: every frame carries all class
probabilities, hence the expected grade Σ k·p_k and the argmax grade.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfexplain.utils.cli import ConfigError, Number, number, shown

if TYPE_CHECKING:
    from cfexplain.runs import TrainedRun

LAMBDA_GRIDS = ("auto", "symmetric")
WALKS = ("auto", "target", "ordinal")


def expected_grade(probs: Tensor) -> Tensor:
    """``[...]`` expected grade Σ_k k·p_k of class probabilities ``[..., C]`` (classes in order)."""
    grades = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    return (probs * grades).sum(-1)


def parse_lambdas(spec: Any) -> str | list[float]:
    """The λ grid of a config or a call: ``"auto"``, ``"symmetric"`` or a list of numbers
    (a YAML list arrives as a ListConfig). ValueError for anything else."""
    if isinstance(spec, str):
        if spec not in LAMBDA_GRIDS:
            raise ValueError(
                f"lambdas must be 'auto', 'symmetric' or a list of numbers, got {spec!r}"
            )
        return spec
    try:
        values = [float(v) for v in spec]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"lambdas must be 'auto', 'symmetric' or a list of numbers, got {spec!r}"
        ) from e
    if not values:
        raise ValueError("lambdas: an empty list of λ values")
    return values


def refine_latents(
    G: nn.Module,
    x: Tensor,
    w0: Tensor,
    steps: int,
    perceptual: nn.Module | None = None,
    lr: float = 0.02,
    l2: float = 1.0,
) -> Tensor:
    """``w [N, num_ws, w_dim]`` optimised from ``w0`` by ``steps`` of Adam so that G(w) matches
    ``x`` (LPIPS when ``perceptual`` is given, plus ``l2`` × pixel MSE), each of the ``num_ws``
    rows on its own (W+): E lands near what G can draw, the refinement reaches details E misses.

    Each image's loss depends on its own w only, so batch and per-image results agree up to
    rounding (which Adam's normalised steps can grow: ~2e-3 in pixels after 20 steps on one CPU
    when the batch is split differently); the gradient is on even where the caller holds
    ``torch.no_grad()``.
    """
    w = w0.detach().clone()
    with torch.enable_grad():
        w.requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(int(steps)):
            rec = G.synthesis(w, noise_mode="const")
            per_image = l2 * (rec - x).square().flatten(1).mean(1)
            if perceptual is not None:
                per_image = per_image + perceptual(rec, x)
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
    return w.detach()


def project(
    G: nn.Module,
    E: nn.Module,
    x: Tensor,
    refine_steps: int = 0,
    perceptual: nn.Module | None = None,
    batch: int = 64,
    lr: float = 0.02,
    l2: float = 1.0,
) -> Tensor:
    """``w [N, num_ws, w_dim]`` of images ``x``: E(x) in passes of ``batch``, then
    ``refine_steps`` of :func:`refine_latents` (the same passes): how every method that starts
    from an image's latent (the counterfactual, the StyleSpace attributes) gets it."""
    out = []
    for b in x.split(batch):
        with torch.no_grad():
            w = E(b)
        if refine_steps > 0:
            w = refine_latents(G, b, w, refine_steps, perceptual, lr, l2)
        out.append(w)
    return torch.cat(out)


@dataclass
class Counterfactuals:
    """One sequence per image; frames ordered by increasing λ."""

    images: Tensor  # [N, K, C, H, W] frames G(w + λ_k α)
    lambdas: Tensor  # [N, K]
    probs: Tensor  # [N, K] classifier probability of `target` for every frame
    reconstruction: Tensor  # [N, C, H, W]  G(w)
    recon_error: Tensor  # [N] LPIPS(x, G(w)) (or L1 when no perceptual model)
    input_probs: Tensor  # [N] f(x) probability of `target`
    w: Tensor  # [N, num_ws, w_dim]
    target: int
    recon_probs: Tensor | None = None  # [N] f(G(w)) probability of `target`
    # Ordinal walk: every class's probability per frame [N, K, C] and of the reconstruction [N, C].
    class_probs: Tensor | None = None
    recon_class_probs: Tensor | None = None

    @property
    def ordinal(self) -> bool:
        """True for an ordinal walk (frames carry every class's probability)."""
        return self.class_probs is not None

    def grades(self) -> Tensor:
        """``[N, K]`` expected grade Σ k·p_k of every frame (ordinal walks only)."""
        if self.class_probs is None:
            raise ValueError("grades() needs an ordinal walk (class_probs)")
        return expected_grade(self.class_probs)

    def argmax_grades(self) -> Tensor:
        """``[N, K]`` the most probable grade of every frame (ordinal walks only)."""
        if self.class_probs is None:
            raise ValueError("argmax_grades() needs an ordinal walk (class_probs)")
        return self.class_probs.argmax(-1)

    def flip_index(self) -> Tensor:
        """``[N]`` index of the first frame, walking away from the reconstruction (smallest |λ|),
        whose decision (probability > 0.5) differs from the reconstruction's; -1 when none."""
        ref = self.recon_probs if self.recon_probs is not None else self.input_probs
        differs = (self.probs > 0.5) != (ref > 0.5)[:, None]
        dist = torch.where(differs, self.lambdas.abs(), torch.full_like(self.lambdas, float("inf")))
        idx = dist.argmin(dim=1)
        return torch.where(differs.any(dim=1), idx, torch.full_like(idx, -1))

    def flip_frame(self) -> tuple[Tensor, Tensor]:
        """``(frame index [N], flipped [N] bool)``: the frame a counterfactual is judged by. The
        first flipping frame, or for an image that did not flip the last frame of its sequence
        in the direction a flip needed (the largest λ when the reconstruction is not yet on the
        target side, the smallest otherwise)."""
        idx = self.flip_index()
        ref = self.recon_probs if self.recon_probs is not None else self.input_probs
        last = torch.full_like(idx, self.lambdas.shape[1] - 1)
        fallback = torch.where(ref.to(idx.device) > 0.5, torch.zeros_like(idx), last)
        flipped = idx >= 0
        return torch.where(flipped, idx, fallback), flipped


def _pair(field: str, value: Any, kind: type, what: str) -> tuple[Any, Any] | None:
    """``value`` as two numbers of ``kind`` (None stays None); ``ConfigError`` naming the
    engine's config field ``counterfactual.<field>`` otherwise."""
    if value is None:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
    ok = len(items) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and float(v) == kind(v)
        for v in items
    )
    if not ok:
        raise ConfigError(f"counterfactual.{field}={shown(value)}: expected {what}")
    return kind(items[0]), kind(items[1])


class CounterfactualEngine:
    """Render counterfactual sequences for a generator G, encoder E and classifier f.

    Args:
        G: generator with ``.synthesis(w [M, num_ws, w_dim]) -> [M, C, H, W]``.
        E: encoder ``[N, C, H, W] -> w [N, num_ws, w_dim]``.
        classifier: ``[N, C, H, W] -> logits [N, num_classes]``.
        direction: ``[w_dim]`` (binary: raises class 1; class 0 walks along -α) or
            ``[num_classes, w_dim]`` (one direction per class); normalised to unit length here.
        lambda_range: L of the symmetric grid [-L, L] (W units); a ``[num_classes]`` tensor
            gives one L per target class.
        num_frames: K of the symmetric grid.
        target_probs: probabilities that ``lambdas="auto"`` reaches per image: at the crossing
            nearest the reconstruction (λ = 0), the smallest edit that reaches them.
        bisect_steps: the precision of ``"auto"``: 4L / 2**steps over [-2L, 2L].
        scan_steps: ``"auto"`` first reads f on this many evenly spaced λ on each side of 0 over
            [-2L, 2L] and brackets, per image and goal, the crossing nearest λ = 0; bisection
            then refines it. 0: bisect the whole range, which assumes the score monotone in λ
            and can land on a far crossing where it is not (a walk that overshoots out of the
            data and wobbles back).
        max_batch: frames per G/f pass (memory bound).
        perceptual: a :class:`cfexplain.nn.perceptual.Perceptual` for the reconstruction error
            and refinement (None: L1 error, pixel loss only).
        refine_lr, refine_l2: Adam step and pixel-MSE weight of the optional refinement of w.
        ordinal: ``[w_dim]`` ordinal direction (the expected grade rises along it), for
            ``walk="ordinal"``; None: no ordinal walk.
        grade_ends: expected grades the first and last frame of an ``"auto"`` ordinal walk reach
            (per image, by bisection); the frames between are evenly spaced in λ.
        reproject: render every frame through the encoder once more, G(E(G(w + λα))): the frame
            is pulled back to what E can produce from a real image (opt-in; twice the cost).
        layers: ``[start, stop)`` of the synthesis layers (ws) the walk moves; the others keep
            E(x) (None: all). Coarse layers carry shape, fine ones texture and noise.
        lambda_bound: keep every frame's w inside the latent density along α: its projection
            on α stays within ``lambda_bound`` standard deviations of that of ``density_samples``
            mapped latents (None: no bound); a frame beyond it is held at the bound.
    """

    def __init__(
        self,
        G: nn.Module,
        E: nn.Module,
        classifier: nn.Module,
        direction: Tensor,
        *,
        lambda_range: float | Tensor = 3.0,
        num_frames: int = 9,
        target_probs: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        bisect_steps: int = 14,
        scan_steps: int = 16,
        max_batch: int = 64,
        perceptual: nn.Module | None = None,
        refine_lr: float = 0.02,
        refine_l2: float = 1.0,
        ordinal: Tensor | None = None,
        grade_ends: Sequence[float] | None = None,
        reproject: bool = False,
        layers: Sequence[int] | None = None,
        lambda_bound: float | None = None,
        density_samples: int = 2048,
        device: str | torch.device | None = None,
    ) -> None:
        device = torch.device(device) if device is not None else next(G.parameters()).device
        self.G, self.E, self.f = (m.to(device).eval() for m in (G, E, classifier))
        self.perceptual = perceptual.to(device) if perceptual is not None else None
        if direction.ndim not in (1, 2) or direction.shape[-1] != G.w_dim:
            raise ValueError(
                f"direction must be [w_dim={G.w_dim}] or [num_classes, w_dim], got {tuple(direction.shape)}"
            )
        self.direction = F.normalize(direction.float(), dim=-1).to(device)
        self.lambda_range = torch.as_tensor(lambda_range, dtype=torch.float32).flatten()
        self.num_frames, self.bisect_steps, self.scan_steps, self.max_batch = (
            int(num_frames),
            int(bisect_steps),
            int(scan_steps),
            int(max_batch),
        )
        if (
            self.num_frames < 2
            or self.max_batch < 1
            or self.bisect_steps < 0
            or self.scan_steps < 0
        ):
            raise ValueError(
                f"num_frames={num_frames} (>= 2), max_batch={max_batch} (>= 1), "
                f"bisect_steps={bisect_steps} and scan_steps={scan_steps} (>= 0) are out of range"
            )
        self.target_probs = tuple(float(p) for p in target_probs)
        self.refine_lr, self.refine_l2 = float(refine_lr), float(refine_l2)
        if ordinal is not None and tuple(ordinal.shape) != (G.w_dim,):
            raise ValueError(f"ordinal must be [w_dim={G.w_dim}], got {tuple(ordinal.shape)}")
        self.ordinal = (
            F.normalize(ordinal.float(), dim=0).to(device) if ordinal is not None else None
        )
        self.grade_ends = _pair("grade_ends", grade_ends, float, "[low, high] with low < high")
        if self.grade_ends is not None and self.grade_ends[0] >= self.grade_ends[1]:
            raise ConfigError(
                f"counterfactual.grade_ends={list(self.grade_ends)}: expected [low, high] with low < high"
            )
        self.reproject = bool(reproject)
        self.device = device
        self.layer_mask = self._layer_mask(layers)
        field = Number("counterfactual.lambda_bound", low=0.0, above=True, null=True)
        bound = number(field, lambda_bound)  # in standard deviations
        self.lambda_bound = None if bound is None else float(bound)
        self.density = self._density(int(density_samples)) if self.lambda_bound else None

    def _layer_mask(self, layers: Sequence[int] | None) -> Tensor | None:
        """``[num_ws, 1]`` 1 for the layers the walk moves, or None (all)."""
        if layers is None:
            return None
        num_ws = int(getattr(self.G, "num_ws", 0))
        what = f"[start, stop) with 0 <= start < stop <= {num_ws}, the synthesis layers"
        start, stop = _pair("layers", layers, int, what)
        if not 0 <= start < stop <= num_ws:
            raise ConfigError(f"counterfactual.layers={[start, stop]}: expected {what}")
        mask = torch.zeros(num_ws, 1, device=self.device)
        mask[start:stop] = 1.0
        return mask

    @torch.no_grad()
    def _density(self, n: int) -> Tensor:
        """``[S, w_dim]`` mapped latents (seeded: the bound is the same on every call)."""
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(n, self.G.z_dim, generator=gen).to(self.device)
        return torch.cat([self.G.mapping(b)[:, 0] for b in z.split(self.max_batch)])

    # ------------------------------------------------------------------------- building

    @classmethod
    def from_run(
        cls,
        run: TrainedRun | str | Path,
        device: str | torch.device | None = None,
        **params: Any,
    ) -> CounterfactualEngine:
        """The engine of a trained run: the run's own classifier (no second copy), generator,
        encoder and direction. ``run`` is a :class:`~cfexplain.runs.TrainedRun`, or its folder
        opened here on ``device`` (default: auto)."""
        from cfexplain.runs import TrainedRun
        from cfexplain.utils.distributed import resolve_device

        if not isinstance(run, TrainedRun):
            run = TrainedRun(run, resolve_device(str(device) if device is not None else "auto"))
        saved = run.directions
        direction = saved["direction"] if "direction" in saved else saved["directions"]
        if "perceptual" not in params:
            params["perceptual"] = run.perceptual
        params.setdefault("lambda_range", saved["lambda_range"])
        params.setdefault("ordinal", saved.get("ordinal"))
        G, E = run.generator, run.encoder
        return cls(G, E, run.classifier, direction, device=run.device, **params)

    # ------------------------------------------------------------------------- calling

    def alpha(self, target: int) -> Tensor:
        """Unit direction ``[w_dim]`` along which the probability of ``target`` rises."""
        if self.direction.ndim == 1:
            if target not in (0, 1):
                raise ValueError(f"a single (binary) direction has targets 0 and 1, got {target}")
            return self.direction if target == 1 else -self.direction
        if not 0 <= target < len(self.direction):
            raise ValueError(f"target must be in 0..{len(self.direction) - 1}, got {target}")
        return self.direction[target]

    def span(self, target: int) -> float:
        """L for ``target``: the symmetric grid covers [-L, L]."""
        L = self.lambda_range
        return float(L[target] if len(L) > 1 else L[0])

    @torch.no_grad()
    def probabilities(self, images: Tensor, target: int) -> Tensor:
        """``[M]`` classifier probability of ``target`` for images ``[M, C, H, W]``."""
        return torch.cat(
            [torch.softmax(self.f(x), dim=1)[:, target] for x in images.split(self.max_batch)]
        )

    @torch.no_grad()
    def render(
        self, w: Tensor, lambdas: Tensor, alpha: Tensor, target: int, images: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """Frames ``[N, K, C, H, W]`` (None if not ``images``) and their probabilities ``[N, K]``
        for ``w [N, num_ws, w_dim]`` moved by ``lambdas [N, K]`` along ``alpha [w_dim]``."""
        frames, p = self.render_all(w, lambdas, alpha, images)
        return frames, p[..., target]

    @torch.no_grad()
    def render_all(
        self, w: Tensor, lambdas: Tensor, alpha: Tensor, images: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """As :meth:`render`, with every class's probability ``[N, K, num_classes]``."""
        n, k = lambdas.shape
        step = alpha if self.layer_mask is None else self.layer_mask * alpha  # [(num_ws,) w_dim]
        ws = (w[:, None] + lambdas[..., None, None] * step).flatten(0, 1)  # [N*K, num_ws, w_dim]
        frames, probs = [], []
        for wb in ws.split(self.max_batch):
            x = self.G.synthesis(wb, noise_mode="const")
            if self.reproject:
                x = self.G.synthesis(self.E(x), noise_mode="const")
            probs.append(torch.softmax(self.f(x), dim=1))
            if images:
                frames.append(x)
        p = torch.cat(probs).view(n, k, -1)
        return (torch.cat(frames).view(n, k, *frames[0].shape[1:]) if images else None), p

    def __call__(
        self,
        x: Tensor,
        target: int = 1,
        lambdas: str | Sequence[float] = "auto",
        refine_steps: int = 0,
        walk: str = "target",
    ) -> Counterfactuals:
        """Sequences for images ``x [N, C, H, W]`` in [-1, 1].

        ``lambdas``: ``"symmetric"`` (K frames over [-L, L]), ``"auto"`` (per image, the λ that
        reach ``target_probs``; for an ordinal walk, K frames evenly spaced between the λ that
        reach ``grade_ends``), or explicit values (the same for every image).
        ``walk``: ``"target"`` (along the direction of ``target``), ``"ordinal"`` (along the
        ordinal direction: the result carries every class's probability), or ``"auto"``
        (ordinal when the engine has an ordinal direction).
        """
        assert x.ndim == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}"
        ordinal = self._is_ordinal(walk)
        x = x.to(self.device)
        target = int(target)
        alpha = self.ordinal if ordinal else self.alpha(target)
        assert alpha is not None
        w = project(
            self.G, self.E, x, refine_steps, self.perceptual, self.max_batch,
            self.refine_lr, self.refine_l2,
        )  # fmt: skip
        with torch.no_grad():
            lam = (
                self._ordinal_lambdas(w, lambdas, alpha)
                if ordinal
                else self._lambdas(w, lambdas, alpha, target)
            )
            if self.density is not None:
                lam = self._bounded(w, lam, alpha)
            # The reconstruction is the frame at λ = 0: reuse it when the grid has one (the
            # symmetric grid with an odd K), else render it in the same passes as the frames.
            zero = (lam == 0).all(dim=0).nonzero()
            if len(zero):
                images, probs = self.render_all(w, lam, alpha)
                rec, rec_p = images[:, int(zero[0])], probs[:, int(zero[0])]
            else:
                both = torch.cat([torch.zeros_like(lam[:, :1]), lam], dim=1)
                images, probs = self.render_all(w, both, alpha)
                rec, rec_p, images, probs = images[:, 0], probs[:, 0], images[:, 1:], probs[:, 1:]
            if self.reproject:
                # The walk starts where it would without re-projection: G(E(x)) itself.
                rec = self.G.synthesis(w, noise_mode="const")
                rec_p = torch.cat([torch.softmax(self.f(b), 1) for b in rec.split(self.max_batch)])
            input_p = self.probabilities(x, target)
            err = self._distance(x, rec)
        return Counterfactuals(
            images,
            lam,
            probs[..., target],
            rec,
            err,
            input_p,
            w,
            target,
            rec_p[..., target],
            class_probs=probs if ordinal else None,
            recon_class_probs=rec_p if ordinal else None,
        )

    def _is_ordinal(self, walk: str) -> bool:
        if walk not in WALKS:
            raise ValueError(f"walk must be one of {WALKS}, got {walk!r}")
        if walk == "ordinal" and self.ordinal is None:
            raise ValueError(
                "walk='ordinal' needs an ordinal direction (a direction stage fitted on more "
                "than two classes with direction.ordinal=auto|true)"
            )
        return walk == "ordinal" or (walk == "auto" and self.ordinal is not None)

    # ------------------------------------------------------------------------- pieces

    def _lambdas(
        self, w: Tensor, spec: str | Sequence[float], alpha: Tensor, target: int
    ) -> Tensor:
        """``[N, K]`` λ values, ascending per image."""
        n = len(w)
        spec = parse_lambdas(spec)
        if spec == "symmetric":
            grid = torch.linspace(-1.0, 1.0, self.num_frames, device=self.device)
            if self.num_frames % 2:
                grid[self.num_frames // 2] = 0.0  # exactly: that frame is the reconstruction
            return (self.span(target) * grid).expand(n, -1).contiguous()
        if spec == "auto":
            return self._bisect(w, alpha, target)
        lam = torch.as_tensor(spec, dtype=torch.float32, device=self.device)
        return lam.sort().values.expand(n, -1).contiguous()

    def _bisect(self, w: Tensor, alpha: Tensor, target: int) -> Tensor:
        """Per image, λ in [-2L, 2L] nearest 0 where f's probability of the target reaches each
        of ``target_probs`` (taken as rising in λ; unreachable ones end at ±2L)."""
        goal = torch.tensor(sorted(self.target_probs), device=self.device).expand(len(w), -1)
        lam = self._bisect_score(w, alpha, lambda p: p[..., target], goal, 2 * self.span(target))
        # The probability is not exactly monotone in λ: keep the sequence ascending anyway.
        return lam.sort(dim=1).values

    def _bisect_score(self, w: Tensor, alpha: Tensor, score, goal: Tensor, L: float) -> Tensor:
        """``[N, G]`` λ in [-L, L] where ``score(probabilities [N, M, C]) -> [N, M]`` reaches
        ``goal [N, G]`` (score taken as rising in λ): the crossing nearest λ = 0, bracketed on the
        scan grid, then bisected to the precision 2L / 2**bisect_steps."""
        lo, hi = torch.full_like(goal, -L), torch.full_like(goal, L)
        steps = self.bisect_steps
        if self.scan_steps > 0:
            lo, hi = self._nearest_bracket(w, alpha, score, goal, L)
            steps = max(steps - math.ceil(math.log2(2 * self.scan_steps)), 0)
        for _ in range(steps):
            mid = (lo + hi) / 2
            _, p = self.render_all(w, mid, alpha, images=False)
            below = score(p) < goal
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def _nearest_bracket(
        self, w: Tensor, alpha: Tensor, score, goal: Tensor, L: float
    ) -> tuple[Tensor, Tensor]:
        """``(lo, hi) [N, G]``: per image and goal, the cell of the grid of ``scan_steps`` λ on
        each side of 0 over [-L, L] in which the score first crosses the goal going out from
        λ = 0 (upwards when it starts below the goal, downwards otherwise); ``lo = hi = ±L``
        when it never does on that side."""
        s = self.scan_steps
        grid = torch.linspace(-L, L, 2 * s + 1, device=self.device)
        grid[s] = 0.0
        _, p = self.render_all(w, grid.expand(len(w), -1).contiguous(), alpha, images=False)
        sc = score(p)[:, None, :]  # [N, 1, 2s+1]
        g = goal[..., None]  # [N, G, 1]
        up = sc[..., s : s + 1] < g  # the goal lies above λ = 0
        # Going out from 0: cell j spans grid[s+j-1]..grid[s+j] upwards, grid[s-j]..grid[s-j+1]
        # downwards; a goal is crossed in the first cell whose outer end is on its other side.
        crossed_up = sc[..., s + 1 :] >= g  # [N, G, s]
        crossed_down = (sc[..., :s] < g).flip(-1)
        crossed = torch.where(up, crossed_up, crossed_down)
        found = crossed.any(-1)
        j = crossed.float().argmax(-1)  # first crossing (0-based cell)
        outer = torch.where(up.squeeze(-1), s + 1 + j, s - 1 - j)
        inner = torch.where(up.squeeze(-1), outer - 1, outer + 1)
        lo = grid[torch.minimum(outer, inner)]
        hi = grid[torch.maximum(outer, inner)]
        end = torch.where(up.squeeze(-1), L, -L).to(lo)
        return torch.where(found, lo, end), torch.where(found, hi, end)

    def _bounded(self, w: Tensor, lam: Tensor, alpha: Tensor) -> Tensor:
        """``lam [N, K]`` held where w + λα stays within ``lambda_bound`` standard deviations of
        the mapped latents' projection on α (the interval always contains λ = 0)."""
        assert self.density is not None and self.lambda_bound is not None
        ref = self.density @ alpha  # [S]
        mu, sd = ref.mean(), ref.std()
        rows = w if self.layer_mask is None else w[:, self.layer_mask[:, 0] > 0]
        proj = rows.mean(1) @ alpha  # [N]
        lo = (mu - self.lambda_bound * sd - proj).clamp(max=0.0)
        hi = (mu + self.lambda_bound * sd - proj).clamp(min=0.0)
        return torch.maximum(torch.minimum(lam, hi[:, None]), lo[:, None])

    def ordinal_span(self) -> float:
        """L of an ordinal walk: the longest of the per-class spans."""
        return float(self.lambda_range.max())

    def _ordinal_lambdas(self, w: Tensor, spec: str | Sequence[float], alpha: Tensor) -> Tensor:
        """``[N, K]`` ascending λ of an ordinal walk (see :meth:`__call__`)."""
        n = len(w)
        spec = parse_lambdas(spec)
        if spec == "symmetric":
            grid = torch.linspace(-1.0, 1.0, self.num_frames, device=self.device)
            if self.num_frames % 2:
                grid[self.num_frames // 2] = 0.0
            return (self.ordinal_span() * grid).expand(n, -1).contiguous()
        if spec != "auto":
            lam = torch.as_tensor(spec, dtype=torch.float32, device=self.device)
            return lam.sort().values.expand(n, -1).contiguous()
        with torch.no_grad():
            c = self.f(self.G.synthesis(w[:1], noise_mode="const")).shape[1]
        low, high = self.grade_ends if self.grade_ends is not None else (0.3, c - 1.3)
        goal = torch.tensor([low, high], device=self.device).expand(n, -1)
        ends = self._bisect_score(w, alpha, expected_grade, goal, 2 * self.ordinal_span())
        ends = ends.sort(dim=1).values
        t = torch.linspace(0.0, 1.0, self.num_frames, device=self.device)
        return ends[:, :1] + (ends[:, 1:] - ends[:, :1]) * t

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        """``[N]`` LPIPS (or L1 without a perceptual model) between ``x`` and ``y``."""
        if self.perceptual is None:
            return (x - y).abs().flatten(1).mean(1)
        return torch.cat(
            [
                self.perceptual(a, b)
                for a, b in zip(x.split(self.max_batch), y.split(self.max_batch))
            ]
        )

    def refine(self, x: Tensor, w0: Tensor, steps: int) -> Tensor:
        """``w [N, num_ws, w_dim]`` optimised from ``w0`` so that G(w) matches ``x``
        (:func:`refine_latents` with the engine's LPIPS, ``refine_lr`` and ``refine_l2``)."""
        return refine_latents(self.G, x, w0, steps, self.perceptual, self.refine_lr, self.refine_l2)
