"""Attribution maps behind one call shape: ``get_method(name)(model, **params).attribute(x, target)``.

Every method returns ``[N, 1, H, W]`` at the input's resolution, signed where the method is
(``method.signed``). captum computes saliency, integrated gradients, occlusion, guided
backprop, grad-CAM, guided grad-CAM and LIME; zennit computes LRP; CAM reads the linear head.
Each call runs inside :func:`isolated`, which puts the model in eval mode with out-of-place
ReLUs and afterwards restores every module's attributes, children and hook tables, so no hook
or changed module survives a call, also when the library raises midway. Nothing copies the model.

``normative`` (a healthy-only autoencoder's residual) and ``counterfactual`` (flipping frame
minus reconstruction) are maps of the same shape from the later stages of a run.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfexplain.utils.cli import ConfigError, whole_number

# Per-module tables that libraries add hooks to; restored wholesale after every call.
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


@contextmanager
def isolated(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, out-of-place ReLUs, gradients on; afterwards every module is as it was.

    A shallow snapshot of each module's ``__dict__`` (and of every dict in it: hooks, children,
    parameters, buffers) is put back in ``finally``: attributes that libraries add (zennit's
    canonizer ``forward``/``canonizer_sum``), hooks they register and flags they flip are gone
    even after an exception. Weights are not copied: zennit's BatchNorm merge restores them itself.
    """
    import torch.nn.modules.module as module_mod

    modules = list(model.modules())
    saved = [(vars(m), _snapshot(vars(m))) for m in modules]
    global_saved = {name: dict(getattr(module_mod, name, {})) for name in _GLOBAL_HOOKS}
    try:
        if any(m.training for m in modules):
            model.eval()
        for m in modules:
            # In-place ReLUs break backward hooks (guided backprop, zennit's rules).
            if isinstance(m, nn.ReLU) and m.inplace:
                m.inplace = False
        with torch.enable_grad():
            yield model
    finally:
        for d, snap in saved:
            _restore(d, snap)
        for name, table in global_saved.items():
            current = getattr(module_mod, name, None)
            if current is not None:
                current.clear()
                current.update(table)


# A module keeps its hooks, children, parameters and buffers in plain or ordered dicts.
_DICTS = (dict, OrderedDict)
_Snapshot = tuple[dict[str, Any], list[dict], list[tuple[dict, dict]]]


def _snapshot(d: dict[str, Any]) -> _Snapshot:
    """A shallow copy of a module's ``__dict__``, the dicts in it that are empty (most hook
    tables: nothing to copy) and a copy of the others. Called once per module per attribution
    call, so it stays in C-level copies and comprehensions."""
    top = d.copy()
    empty = [v for v in top.values() if type(v) in _DICTS and not v]
    full = [(v, v.copy()) for v in top.values() if v and type(v) in _DICTS]
    return top, empty, full


def _restore(d: dict[str, Any], snap: _Snapshot) -> None:
    top, empty, full = snap
    d.clear()
    d.update(top)
    for v in empty:
        if v:
            v.clear()
    for v, contents in full:
        if not _same(v, contents):
            v.clear()
            v.update(contents)


def _same(a: dict, b: dict) -> bool:
    """Same keys bound to the same objects (identity: values may be tensors)."""
    return len(a) == len(b) and all(b.get(k, _MISSING) is v for k, v in a.items())


_MISSING = object()


def to_map(a: Tensor, size: tuple[int, int], reduce: str = "sum") -> Tensor:
    """``[N, C, h, w]`` -> ``[N, 1, H, W]``: channels summed (gradient-like) or averaged (a value
    broadcast to every channel, e.g. occlusion), bilinear upsampling to ``size`` when smaller."""
    a = a.detach()
    if a.shape[1] != 1:
        a = a.sum(1, keepdim=True) if reduce == "sum" else a.mean(1, keepdim=True)
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return a


def normalise(maps: Tensor, signed: bool, quantile: float = 1.0) -> Tensor:
    """Display scale of ``[N, 1, H, W]`` maps, per image: signed maps / max|value| -> [-1, 1];
    unsigned maps / max -> [0, 1]. An all-zero map stays zero.

    ``quantile < 1`` divides by that quantile of |value| instead of the max and clips: gradient
    maps often have a few extreme pixels that would otherwise wash out everything else.
    """
    flat = maps.detach().float().flatten(1)
    if not signed:
        flat = flat.clamp(min=0)
    mag = flat.abs()
    scale = mag.amax(1) if quantile >= 1 else torch.quantile(mag, quantile, dim=1)
    # A map that is zero almost everywhere has a zero quantile: fall back to its max.
    scale = torch.where(scale > 0, scale, mag.amax(1)).clamp(min=1e-12)
    return (flat / scale[:, None]).clamp(-1, 1).view_as(maps)


def _cam_layer(model: nn.Module, method: str) -> nn.Module:
    """``model.cam_layer`` (also inside a wrapper such as BinaryLogitAdapter)."""
    for m in (model, getattr(model, "model", None)):
        layer = getattr(m, "cam_layer", None)
        if isinstance(layer, nn.Module):
            return layer
    raise ValueError(
        f"{method} needs the classifier's last convolutional stage as `model.cam_layer`; "
        f"{type(model).__name__} has none (cfexplain.nn.classifier.ResNetClassifier has it)"
    )


def check_applies(model: nn.Module, method: str) -> None:
    """A ValueError with the model's own reason when ``method`` does not apply to it (its
    ``unsupported_methods``, also inside a wrapper): the page shows it instead of a map."""
    for m in (model, getattr(model, "model", None)):
        reason = (getattr(m, "unsupported_methods", None) or {}).get(method)
        if reason:
            raise ValueError(f"{method} does not apply: {reason}")


def count_param(method: str, key: str, value: Any, low: int = 1) -> int:
    """``params.<method>.<key>`` as an int >= ``low``."""
    return whole_number(f"params.{method}.{key}", value, low)


def number_param(method: str, key: str, value: Any) -> float:
    """``params.<method>.<key>`` as a float; ``ConfigError`` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"params.{method}.{key}={value!r}: expected a number")
    return float(value)


class MethodUnavailable(ValueError):
    """A method that a trained run cannot give (a stage it needs is missing); the message is the
    note the gallery shows instead of the map."""


class Method:
    """Base: ``Method(model, **params).attribute(x [N, C, H, W], target) -> [N, 1, H, W]``.

    ``Method.from_run(run, **params)`` builds it from a trained run
    (:class:`cfexplain.runs.TrainedRun`): by default on the run's classifier; a method that
    needs more of the run (a generator, a normative model) takes it from there.
    """

    name: ClassVar[str] = ""
    # How per-channel maps become one map: "sum" for gradient-like maps, "mean" when every
    # channel holds the same value (perturbation methods).
    reduce: ClassVar[str] = "sum"
    signed: bool = True

    def __init__(self, model: nn.Module, **params: Any) -> None:
        self.model = model
        self.params = params

    @classmethod
    def from_run(cls, run: Any, **params: Any) -> Method:
        """The method on ``run.classifier``."""
        return cls(run.classifier, **params)

    def attribute(self, x: Tensor, target: int) -> Tensor:
        assert x.ndim == 4, f"{self.name}: expected images [N, C, H, W], got {tuple(x.shape)}"
        # No requires_grad here: grad-CAM and CAM need no input gradient (it would cost one
        # more backward through the first layers); captum sets it where a method needs it.
        x = x.detach().clone()
        with isolated(self.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Input Tensor 0 did not already require gradients")
            a = self._attribute(x, int(target))
        # captum's perturbation methods end in float32; hand back the input's dtype.
        out = to_map(a, tuple(x.shape[-2:]), self.reduce).to(x.dtype)
        assert out.shape == (x.shape[0], 1, *x.shape[-2:]), (self.name, tuple(out.shape))
        return out

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        raise NotImplementedError


class Saliency(Method):
    """Gradient of the target logit w.r.t. the input (signed; ``abs=True`` for |gradient|)."""

    name = "saliency"

    def __init__(self, model: nn.Module, abs: bool = False) -> None:
        super().__init__(model)
        self.abs = abs
        self.signed = not abs

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import Saliency as CaptumSaliency

        return CaptumSaliency(self.model).attribute(x, target=target, abs=self.abs)


class IntegratedGradients(Method):
    """Integrated gradients from a constant ``baseline`` image (-1: black)."""

    name = "integrated_gradients"

    def __init__(
        self,
        model: nn.Module,
        n_steps: int = 32,
        internal_batch_size: int | None = 64,
        baseline: float = -1.0,
        method: str = "gausslegendre",
    ) -> None:
        super().__init__(model)
        self.n_steps = count_param(self.name, "n_steps", n_steps)
        self.internal_batch_size = (
            None
            if internal_batch_size is None
            else count_param(self.name, "internal_batch_size", internal_batch_size)
        )
        self.baseline, self.method = number_param(self.name, "baseline", baseline), method

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import IntegratedGradients as CaptumIG

        return CaptumIG(self.model).attribute(
            x,
            baselines=self.baseline,
            target=target,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=self.internal_batch_size,
        )


class Occlusion(Method):
    """Drop of the target logit when a ``window`` square is set to ``baseline``, averaged per pixel."""

    name = "occlusion"
    reduce = "mean"

    def __init__(
        self,
        model: nn.Module,
        window: int = 8,
        stride: int = 4,
        baseline: float = -1.0,
        perturbations_per_eval: int = 32,
    ) -> None:
        super().__init__(model)
        self.window = count_param(self.name, "window", window)
        self.stride = count_param(self.name, "stride", stride)
        self.baseline = number_param(self.name, "baseline", baseline)
        self.perturbations_per_eval = count_param(
            self.name, "perturbations_per_eval", perturbations_per_eval
        )

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import Occlusion as CaptumOcclusion

        c = x.shape[1]
        return CaptumOcclusion(self.model).attribute(
            x,
            sliding_window_shapes=(c, self.window, self.window),
            strides=(c, self.stride, self.stride),
            baselines=self.baseline,
            target=target,
            perturbations_per_eval=self.perturbations_per_eval,
        )


class GuidedBackprop(Method):
    """Guided backpropagation (ReLU gradients clipped at zero on the way back)."""

    name = "guided_backprop"

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import GuidedBackprop as CaptumGB

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Setting backward hooks on ReLU")
            return CaptumGB(self.model).attribute(x, target=target)


class GradCAM(Method):
    """grad-CAM on ``model.cam_layer``, bilinearly upsampled; signed unless ``relu=True``."""

    name = "gradcam"

    def __init__(self, model: nn.Module, relu: bool = False) -> None:
        super().__init__(model)
        self.relu = relu
        self.signed = not relu
        self.layer = _cam_layer(model, self.name)

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import LayerAttribution, LayerGradCam

        a = LayerGradCam(self.model, self.layer).attribute(
            x, target=target, relu_attributions=self.relu
        )
        return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), interpolate_mode="bilinear")


class GuidedGradCAM(Method):
    """Guided backprop times the (ReLU'd) grad-CAM of ``model.cam_layer``."""

    name = "guided_gradcam"

    def __init__(self, model: nn.Module, interpolate_mode: str = "bilinear") -> None:
        super().__init__(model)
        self.interpolate_mode = interpolate_mode
        self.layer = _cam_layer(model, self.name)

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import GuidedGradCam

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Setting backward hooks on ReLU")
            return GuidedGradCam(self.model, self.layer).attribute(
                x, target=target, interpolate_mode=self.interpolate_mode
            )


def cam_maps(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """Class activation maps ``[N, 1, h, w]`` at the resolution of ``model.cam_layer``.

    ``sum_k W[target, k] A_k``: with global average pooling and a linear head, the map's mean
    plus the head's bias is the target logit. Call inside :func:`isolated` (it hooks the layer).
    """
    layer = _cam_layer(model, "cam")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cam needs a final nn.Linear head; {type(model).__name__} has none")
    head = linears[-1]
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    a = seen[-1]
    if a.ndim != 4 or a.shape[1] != head.in_features:
        raise ValueError(
            f"cam: model.cam_layer gives {tuple(a.shape)}, expected [N, {head.in_features}, h, w] "
            "feeding global average pooling and the last nn.Linear"
        )
    w = head.weight[target].to(a.dtype)
    return torch.einsum("k,nkhw->nhw", w, a)[:, None]


class CAM(Method):
    """Class activation map from the linear head over ``model.cam_layer`` (Zhou et al. 2016)."""

    name = "cam"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        check_applies(model, self.name)
        _cam_layer(model, self.name)
        if any(
            getattr(m, "attention", False) is True for m in (model, getattr(model, "model", None))
        ):
            raise ValueError(
                "cam: this classifier has trainable attention; its head reads attended "
                "descriptors, not the global average pool, so CAM does not apply (use gradcam or attention)"
            )

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        return cam_maps(self.model, x, target)


def slic_segments(x: Tensor, n_segments: int = 40, compactness: float = 1.0) -> Tensor:
    """SLIC superpixels of each image ``[N, C, H, W]`` in [-1, 1] -> int64 labels ``[N, 1, H, W]``."""
    from skimage.segmentation import slic

    masks = []
    for img in x.detach().float().cpu().numpy():
        # skimage wants channels last; gray images are 2D.
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        seg = slic(
            (arr + 1) / 2,
            n_segments=n_segments,
            compactness=compactness,
            channel_axis=None if img.shape[0] == 1 else -1,
            start_label=0,
        )
        masks.append(torch.from_numpy(seg.astype("int64")))
    return torch.stack(masks)[:, None].to(x.device)


class Lime(Method):
    """LIME on SLIC superpixels: weights of a sparse linear surrogate fitted to masked inputs."""

    name = "lime"
    reduce = "mean"

    def __init__(
        self,
        model: nn.Module,
        n_samples: int = 128,
        perturbations_per_eval: int = 32,
        n_segments: int = 40,
        compactness: float = 1.0,
        baseline: float = -1.0,
    ) -> None:
        super().__init__(model)
        self.n_samples = count_param(self.name, "n_samples", n_samples)
        self.perturbations_per_eval = count_param(
            self.name, "perturbations_per_eval", perturbations_per_eval
        )
        self.n_segments = count_param(self.name, "n_segments", n_segments)
        self.compactness = number_param(self.name, "compactness", compactness)
        self.baseline = number_param(self.name, "baseline", baseline)

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from captum.attr import Lime as CaptumLime

        masks = slic_segments(x, self.n_segments, self.compactness)
        lime = CaptumLime(self.model)
        # One image at a time: each has its own superpixels and its own surrogate fit.
        out = []
        for i in range(len(x)):
            out.append(
                lime.attribute(
                    x[i : i + 1],
                    baselines=self.baseline,
                    target=target,
                    feature_mask=masks[i : i + 1].expand(-1, x.shape[1], -1, -1),
                    n_samples=self.n_samples,
                    perturbations_per_eval=self.perturbations_per_eval,
                )
            )
        return torch.cat(out)


def lrp_composite(name: str, **kwargs: Any):
    """A zennit composite by name (``zennit.composites.COMPOSITES``) with the ResNet canonizer
    (BatchNorm merged into the convolution before it, skip connections as explicit sums)."""
    from zennit.composites import COMPOSITES
    from zennit.torchvision import ResNetCanonizer

    if name not in COMPOSITES:
        raise ValueError(f"lrp: composite {name!r} unknown; expected one of {sorted(COMPOSITES)}")
    cls = COMPOSITES[name]
    accepted = inspect.signature(cls.__init__).parameters
    # Box rules need the input range: images are in [-1, 1].
    bounds = {k: v for k, v in {"low": -1.0, "high": 1.0}.items() if k in accepted}
    return cls(canonizers=[ResNetCanonizer()], **{**bounds, **kwargs})


class LRP(Method):
    """Layer-wise relevance propagation with zennit (``composite="epsilon_plus_flat"`` by default).

    The output relevance is the target logit, so the map sums to about that logit.
    """

    name = "lrp"

    def __init__(self, model: nn.Module, composite: str = "epsilon_plus_flat") -> None:
        super().__init__(model)
        check_applies(model, self.name)
        self.composite = composite
        try:
            lrp_composite(composite)  # fail at construction on an unknown name
        except ValueError as e:
            # An error, not a missing column: the user asked for this map.
            raise ConfigError(f"params.lrp.composite={composite!r}: {e}") from e

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from zennit.attribution import Gradient

        def relevance(out: Tensor) -> Tensor:
            return out * F.one_hot(torch.tensor(target), out.shape[1]).to(out)

        with Gradient(self.model, lrp_composite(self.composite)) as attributor:
            _, rel = attributor(x.requires_grad_(True), relevance)
        return rel


class Normative(Method):
    """Residual ``|x - reconstruction|`` of a healthy-only autoencoder (unsigned; ``target`` unused).

    ``normative`` is a loaded model (``cfexplain.nn.normative.load_normative(...)[kind]``) or
    ``stage_dir`` the run's ``normative`` stage folder.
    """

    name = "normative"
    signed = False

    def __init__(
        self,
        model: nn.Module,
        normative: Any = None,
        stage_dir: str | Path | None = None,
        kind: str = "vae",
    ) -> None:
        super().__init__(model)
        if normative is None:
            if stage_dir is None:
                raise ValueError(
                    "normative needs the run's normative stage (stage_dir=) or a loaded model"
                )
            from cfexplain.nn.normative import load_normative

            models = load_normative(stage_dir, device=_device_of(model))
            if kind not in models:
                raise ValueError(f"normative: kind {kind!r} not in {stage_dir} ({sorted(models)})")
            normative = models[kind]
        self.normative, self.kind = normative, kind

    @classmethod
    def from_run(cls, run: Any, **params: Any) -> Normative:
        """The residual of the run's normative model ``kind`` (loaded once by the run)."""
        kind = str(params.pop("kind", "vae"))
        if params:
            raise TypeError(f"unexpected keyword arguments {sorted(params)}")

        if not run.has("normative"):
            raise MethodUnavailable(f"No normative map: {run.dir} has no normative stage.")
        if kind not in run.normative:
            raise ConfigError(
                f"params.normative.kind={kind!r}: the normative stage of {run.dir} has "
                f"{sorted(run.normative)}"
            )
        return cls(run.classifier, normative=run.normative[kind], kind=kind)

    def attribute(self, x: Tensor, target: int) -> Tensor:
        with torch.no_grad():
            _, residual, _ = self.normative.anomaly(x)
        return to_map(residual.float(), tuple(x.shape[-2:]), "mean")


class Counterfactual(Method):
    """Difference between the first frame that flips the decision and the reconstruction G(E(x)).

    ``engine`` is a ``cfexplain.explain.counterfactual.CounterfactualEngine``; where no frame
    flips, the last frame in the direction a flip needed is used. :meth:`sequences` gives the
    whole sequences the difference is taken from.
    """

    name = "counterfactual"
    stages: ClassVar[tuple[str, ...]] = ("generator", "encoder", "direction")

    def __init__(
        self,
        model: nn.Module,
        engine: Any = None,
        lambdas: Any = "auto",
        refine_steps: int = 0,
        walk: str = "target",
    ) -> None:
        super().__init__(model)
        if engine is None:
            raise ValueError(
                "counterfactual needs a CounterfactualEngine (the run's generator, encoder and "
                "direction stages)"
            )
        self.engine, self.lambdas, self.refine_steps = engine, lambdas, int(refine_steps)
        self.walk = walk

    @classmethod
    def from_run(
        cls,
        run: Any,
        lambdas: Any = "auto",
        refine_steps: int = 0,
        walk: str = "auto",
        **engine: Any,
    ) -> Counterfactual:
        """The engine of the run (its own classifier, G, E and direction); ``engine``: the
        :class:`~cfexplain.explain.counterfactual.CounterfactualEngine` keyword arguments.
        ``walk``: ``auto`` (the ordinal walk when the run's direction has an ordinal one),
        ``target`` or ``ordinal``."""
        from cfexplain.explain.counterfactual import WALKS, CounterfactualEngine, parse_lambdas

        missing = [s for s in cls.stages if not run.has(s)]
        if missing:
            raise MethodUnavailable(
                "No counterfactual column: it needs the generator, encoder and direction stages "
                f"of the run; {run.dir} lacks {', '.join(missing)} (python -m cfexplain.train trains them)."
            )
        try:
            lambdas = parse_lambdas(lambdas)
        except ValueError as e:
            raise ConfigError(f"lambdas: {e}") from e
        for key, low in (("num_frames", 2), ("max_batch", 1), ("bisect_steps", 0)):
            if key in engine:
                engine[key] = whole_number(f"counterfactual.{key}", engine[key], low)
        refine_steps = whole_number("refine_steps", refine_steps, 0)
        if walk not in WALKS:
            raise ConfigError(f"counterfactual.walk={walk}: choose one of {', '.join(WALKS)}")
        model = CounterfactualEngine.from_run(run, **engine)
        if walk == "ordinal" and model.ordinal is None:
            raise ConfigError(
                f"counterfactual.walk=ordinal: {run.dir} has no ordinal direction (it needs a "
                "direction stage trained on more than two classes, e.g. data.task=kl)"
            )
        return cls(
            run.classifier, engine=model, lambdas=lambdas, refine_steps=refine_steps, walk=walk
        )

    def sequences(self, x: Tensor, target: int) -> Any:
        """The :class:`~cfexplain.explain.counterfactual.Counterfactuals` of ``x [N, C, H, W]``."""
        return self.engine(
            x,
            target=target,
            lambdas=self.lambdas,
            refine_steps=self.refine_steps,
            walk=self.walk,
        )

    def attribute(self, x: Tensor, target: int) -> Tensor:
        return counterfactual_difference(self.sequences(x, target))


def counterfactual_difference(cf: Any) -> Tensor:
    """``[N, 1, H, W]``: flipping frame minus reconstruction (:meth:`Counterfactuals.flip_frame`:
    where none flips, the last frame in the direction a flip needed)."""
    idx, _ = cf.flip_frame()
    frames = cf.images[torch.arange(len(idx)), idx.to(cf.images.device)]
    return to_map((frames - cf.reconstruction).float(), tuple(frames.shape[-2:]), "sum")


class Attributes(Method):
    """StyleSpace attribute counterfactuals (Lang et al. 2021): per image, the ``top`` attributes
    of the run's ``attributes/`` (found by ``python -m cfexplain.attributes``) that raise the
    target most, each walked over ``num_frames`` steps from -d to +d.

    :meth:`strips` gives the walks; the map is the top attribute's counterfactual minus the
    reconstruction G(E(x)).
    """

    name = "attributes"
    stages: ClassVar[tuple[str, ...]] = ("generator", "encoder", "attributes")

    def __init__(
        self,
        model: nn.Module,
        G: nn.Module | None = None,
        E: nn.Module | None = None,
        found: Any = None,
        top: int = 4,
        num_frames: int = 5,
        max_batch: int = 64,
        refine_steps: int = 0,
        perceptual: nn.Module | None = None,
    ) -> None:
        super().__init__(model)
        if G is None or E is None or found is None:
            raise ValueError(
                "attributes needs a generator, an encoder and an AttributeSet "
                "(python -m cfexplain.attributes writes one into the run)"
            )
        self.G, self.E, self.found = G, E, found
        self.top = whole_number("params.attributes.top", top)
        self.num_frames = whole_number("params.attributes.num_frames", num_frames, 2)
        self.max_batch = whole_number("params.attributes.max_batch", max_batch)
        self.refine_steps = whole_number("refine_steps", refine_steps, 0)
        self.perceptual = perceptual

    @classmethod
    def from_run(cls, run: Any, **params: Any) -> Attributes:
        missing = [s for s in cls.stages if not run.has(s)]
        if missing:
            raise MethodUnavailable(
                f"No attribute counterfactuals: {run.dir} lacks {', '.join(missing)} "
                "(python -m cfexplain.attributes run=... finds the attributes of a trained run)."
            )
        if whole_number("refine_steps", params.get("refine_steps", 0), 0) > 0:
            params.setdefault("perceptual", run.perceptual)  # refined as the counterfactual's
        return cls(run.classifier, run.generator, run.encoder, run.attributes, **params)

    def strips(self, x: Tensor, target: int, w: Tensor | None = None) -> Any:
        """The :class:`~cfexplain.explain.attributes.AttributeStrips` of ``x [N, C, H, W]``;
        ``w [N, num_ws, w_dim]``: the images' latents where another method already projected
        them (explain hands over the counterfactual's), else E(x) refined here."""
        from cfexplain.explain.attributes import attribute_strips, to_styles
        from cfexplain.explain.counterfactual import project

        if w is None:
            w = project(self.G, self.E, x, self.refine_steps, self.perceptual, self.max_batch)
        with torch.no_grad():
            s = to_styles(self.G, w)
        return attribute_strips(
            self.G, self.model, s, self.found, target, self.top, self.num_frames, self.max_batch
        )

    def attribute(self, x: Tensor, target: int) -> Tensor:
        return self.strips(x, target).difference()


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        Counterfactual,
        GradCAM,
        Saliency,
        LRP,
        IntegratedGradients,
        Occlusion,
        GuidedBackprop,
        GuidedGradCAM,
        CAM,
        Lime,
        Normative,
    )
}


def get_method(name: str) -> type[Method]:
    """The attribution class registered under ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


# ----------------------------------------------------------------------------- seed toolkits


def _attention_net(model: nn.Module) -> nn.Module:
    """The module with trainable attention (also inside a wrapper such as BinaryLogitAdapter)."""
    for m in (model, getattr(model, "model", None)):
        if getattr(m, "attention", False) is True and callable(getattr(m, "attention_maps", None)):
            return m
    raise ValueError(
        f"attention needs a classifier with trainable attention (train it with "
        f"classifier.attention=true: ResNetClassifier(attention=True)); {type(model).__name__} "
        "has no attention maps"
    )


class AttentionMap(Method):
    """Trainable attention maps (Jetley et al. 2018), upsampled and averaged over the levels.

    Unsigned and class-agnostic (``target`` unused): the maps are part of the forward pass, the
    same for every class. Each level is rescaled to sum to 1 over the input's pixels before the
    mean, so the map sums to 1 per image (``cfexplain.nn.attention.upsampled_attention``).
    """

    name = "attention"
    signed = False
    reduce = "mean"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.net = _attention_net(model)

    def _attribute(self, x: Tensor, target: int) -> Tensor:
        from cfexplain.nn.attention import upsampled_attention

        with torch.no_grad():
            maps = self.net.attention_maps(x)
        return upsampled_attention(maps, tuple(x.shape[-2:]))


class DominantClass(Method):
    """CLEAR-DR dominant-class map (Kumar et al. 2019) from a base method run for every class.

    :meth:`attribute` returns the dominant *level* ``[N, 1, H, W]`` (``target`` unused: every
    class is scored); :meth:`classes` the dominant class ``[N, H, W]``; :meth:`class_maps` the
    per-class maps ``[N, K, H, W]``. The last result is kept, so asking for levels and classes of
    the same images runs the base method once per class, not twice. ``base`` is any registered
    method (grad-CAM by default); ``base_params`` go to it. Binary models: see
    ``cfexplain.explain.dominant`` (two classes; the sign of the margin's attribution).
    """

    name = "dominant_class"

    def __init__(
        self,
        model: nn.Module,
        base: str = "gradcam",
        num_classes: int | None = None,
        **base_params: Any,
    ) -> None:
        super().__init__(model)
        if base == self.name:
            raise ValueError("dominant_class: base must be another method, not dominant_class")
        self.base = get_method(base)(model, **base_params)
        self.signed = self.base.signed
        self.num_classes = num_classes
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def class_maps(self, x: Tensor) -> Tensor:
        """Base attribution of every class: ``x [N, C, H, W]`` -> ``[N, K, H, W]``."""
        if self.num_classes is None:
            with isolated(self.model), torch.no_grad():
                self.num_classes = int(self.model(x[:1].detach()).shape[1])
        return torch.cat([self.base.attribute(x, k) for k in range(self.num_classes)], dim=1)

    def dominant(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(classes LongTensor [N, H, W], levels [N, 1, H, W])`` of ``x [N, C, H, W]``."""
        from cfexplain.explain.dominant import dominant_class_map

        last = self._last
        if last is not None and last[0].shape == x.shape and torch.equal(last[0], x.detach()):
            return last[2], last[3]
        per_class = self.class_maps(x)
        classes, levels = dominant_class_map(per_class)
        self._last = (x.detach().clone(), per_class, classes, levels)
        return classes, levels

    def classes(self, x: Tensor) -> Tensor:
        """Dominant class per pixel, LongTensor ``[N, H, W]``."""
        return self.dominant(x)[0]

    def attribute(self, x: Tensor, target: int) -> Tensor:
        return self.dominant(x)[1]


METHODS[AttentionMap.name] = AttentionMap
METHODS[DominantClass.name] = DominantClass


class Report(Method):
    """The report the run's ``reporter`` stage writes for each image, with an attention map per
    finding word (:mod:`cfexplain.explain.reporter`). As a map (``attribute``): the mean of the
    present findings' word maps (unsigned; ``target`` unused). The words and their maps are
    :meth:`write`'s; the last batch is kept, so the gallery asks for both without a second pass.
    """

    name = "report"
    signed = False

    def __init__(
        self,
        model: nn.Module,
        reporter: nn.Module,
        kind: str = "knee",
        decode: str = "greedy",
        beam_size: int = 3,
        span: str = "peak",
    ) -> None:
        super().__init__(model)
        from cfexplain.explain.reporter import DECODERS, SPANS

        if decode not in DECODERS:
            raise ValueError(f"decode={decode!r}: expected one of {DECODERS}")
        if span not in SPANS:
            raise ValueError(f"span={span!r}: expected one of {SPANS}")
        self.reporter, self.kind, self.decode = reporter, kind, decode
        self.beam_size, self.span = int(beam_size), span
        self._last: tuple[Tensor, list[Any]] | None = None

    @classmethod
    def from_run(cls, run: Any, **params: Any) -> Report:
        """The run's report writer; the phantom's kind of findings from its training data."""
        if not run.has("reporter"):
            raise MethodUnavailable(
                f"No report: {run.dir} has no reporter stage (train it: stages=[reporter])."
            )
        kind = "histology" if str(run.config.data.get("name")) == "histology" else "knee"
        return cls(run.classifier, run.reporter, kind=params.pop("kind", kind), **params)

    def write(self, x: Tensor) -> list[Any]:
        """The :class:`~cfexplain.explain.reporter.WrittenReport` of each image of ``x``."""
        from cfexplain.explain.reporter import write_reports

        last = self._last
        if last is not None and last[0].shape == x.shape and torch.equal(last[0], x):
            return last[1]
        written = write_reports(
            self.reporter, x.detach(), self.kind, self.decode, self.beam_size, self.span
        )
        self._last = (x.detach().clone(), written)
        return written

    def attribute(self, x: Tensor, target: int) -> Tensor:
        from cfexplain.explain.reporter import report_map

        size = (int(x.shape[-2]), int(x.shape[-1]))
        maps = [report_map(w, size) for w in self.write(x)]
        return torch.stack(maps).to(x.device, x.dtype)


METHODS[Report.name] = Report
METHODS[Attributes.name] = Attributes
