"""Counterfactual sequences: x → w = E(x) → G(w + λα) for a λ grid, with f's probability per frame.

Schutte et al. 2021: walking along the direction α in W that the classifier's decision follows
shows how the image would have to change for the classifier to change its mind. All frames of a
batch go through G and f in as few passes as ``max_batch`` allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from cfexplain.runs import TrainedRun

LAMBDA_GRIDS = ("auto", "symmetric")


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
        target_probs: probabilities that ``lambdas="auto"`` reaches per image by bisection.
        bisect_steps: bisection iterations over [-2L, 2L] (precision 4L / 2**steps).
        max_batch: frames per G/f pass (memory bound).
        perceptual: a :class:`cfexplain.nn.perceptual.Perceptual` for the reconstruction error
            and refinement (None: L1 error, pixel loss only).
        refine_lr, refine_l2: Adam step and pixel-MSE weight of the optional refinement of w.
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
        max_batch: int = 64,
        perceptual: nn.Module | None = None,
        refine_lr: float = 0.02,
        refine_l2: float = 1.0,
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
        self.num_frames, self.bisect_steps, self.max_batch = (
            int(num_frames),
            int(bisect_steps),
            int(max_batch),
        )
        if self.num_frames < 2 or self.max_batch < 1 or self.bisect_steps < 0:
            raise ValueError(
                f"num_frames={num_frames} (>= 2), max_batch={max_batch} (>= 1) and "
                f"bisect_steps={bisect_steps} (>= 0) are out of range"
            )
        self.target_probs = tuple(float(p) for p in target_probs)
        self.refine_lr, self.refine_l2 = float(refine_lr), float(refine_l2)
        self.device = device

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
        n, k = lambdas.shape
        ws = (w[:, None] + lambdas[..., None, None] * alpha).flatten(0, 1)  # [N*K, num_ws, w_dim]
        frames, probs = [], []
        for wb in ws.split(self.max_batch):
            x = self.G.synthesis(wb, noise_mode="const")
            probs.append(torch.softmax(self.f(x), dim=1)[:, target])
            if images:
                frames.append(x)
        p = torch.cat(probs).view(n, k)
        return (torch.cat(frames).view(n, k, *frames[0].shape[1:]) if images else None), p

    def __call__(
        self,
        x: Tensor,
        target: int = 1,
        lambdas: str | Sequence[float] = "auto",
        refine_steps: int = 0,
    ) -> Counterfactuals:
        """Sequences for images ``x [N, C, H, W]`` in [-1, 1].

        ``lambdas``: ``"symmetric"`` (K frames over [-L, L]), ``"auto"`` (per image, the λ that
        reach ``target_probs``), or explicit values (the same for every image).
        """
        assert x.ndim == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}"
        x = x.to(self.device)
        target = int(target)
        alpha = self.alpha(target)
        with torch.no_grad():
            w = torch.cat([self.E(b) for b in x.split(self.max_batch)])
        if refine_steps > 0:
            w = self.refine(x, w, refine_steps)
        with torch.no_grad():
            lam = self._lambdas(w, lambdas, alpha, target)
            # The reconstruction is the frame at λ = 0: reuse it when the grid has one (the
            # symmetric grid with an odd K), else render it in the same passes as the frames.
            zero = (lam == 0).all(dim=0).nonzero()
            if len(zero):
                images, probs = self.render(w, lam, alpha, target)
                rec, rec_p = images[:, int(zero[0])], probs[:, int(zero[0])]
            else:
                both = torch.cat([torch.zeros_like(lam[:, :1]), lam], dim=1)
                images, probs = self.render(w, both, alpha, target)
                rec, rec_p, images, probs = images[:, 0], probs[:, 0], images[:, 1:], probs[:, 1:]
            input_p = self.probabilities(x, target)
            err = self._distance(x, rec)
        return Counterfactuals(images, lam, probs, rec, err, input_p, w, target, rec_p)

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
        """Per image, λ in [-2L, 2L] where f's probability of the target reaches each of
        ``target_probs`` (probability taken as increasing in λ; unreachable ones end at ±2L)."""
        goal = torch.tensor(sorted(self.target_probs), device=self.device).expand(len(w), -1)
        L = 2 * self.span(target)
        lo, hi = torch.full_like(goal, -L), torch.full_like(goal, L)
        for _ in range(self.bisect_steps):
            mid = (lo + hi) / 2
            _, p = self.render(w, mid, alpha, target, images=False)
            below = p < goal
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        # The probability is not exactly monotone in λ: keep the sequence ascending anyway.
        return ((lo + hi) / 2).sort(dim=1).values

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
        """``w [N, num_ws, w_dim]`` optimised from ``w0`` so that G(w) matches ``x`` (LPIPS + pixel L2).

        Each image's loss depends on its own w only, so batch and per-image results agree.
        """
        w = w0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.refine_lr)
        for _ in range(int(steps)):
            rec = self.G.synthesis(w, noise_mode="const")
            per_image = self.refine_l2 * (rec - x).square().flatten(1).mean(1)
            if self.perceptual is not None:
                per_image = per_image + self.perceptual(rec, x)
            opt.zero_grad(set_to_none=True)
            per_image.sum().backward()
            opt.step()
        return w.detach()
