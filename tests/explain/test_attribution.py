"""Attribution methods against slow float64 references on tiny models; no hook or change survives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfexplain.explain.attribution import (
    METHODS,
    cam_maps,
    get_method,
    isolated,
    lrp_composite,
    normalise,
    slic_segments,
)
from cfexplain.nn.classifier import ResNetClassifier

# Methods that take only the classifier (normative/counterfactual need later stages).
# Methods that need more than a classifier (a generator, a normative model, a reporter).
NEEDS_A_RUN = ("normative", "counterfactual", "attributes", "report")
CLASSIFIER_METHODS = [n for n in METHODS if n not in NEEDS_A_RUN]
FAST = {
    "integrated_gradients": {"n_steps": 8},
    "occlusion": {"window": 8, "stride": 8},
    "lime": {"n_samples": 16, "n_segments": 8},
}


def tiny_resnet(dtype=torch.float64, seed: int = 0, attention: bool = False) -> ResNetClassifier:
    """A two-stage ResNet with non-trivial BatchNorm statistics (the init makes blocks identity)."""
    torch.manual_seed(seed)
    m = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=(1, 1), attention=attention)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.to(dtype).eval()


def images(n: int = 2, size: int = 16, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g, dtype=dtype) * 2 - 1


def logit(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    return model(x)[:, target]


# ----------------------------------------------------------------------------- references


def test_registry_names_and_unknown_method():
    assert list(METHODS) == [
        "counterfactual",
        "gradcam",
        "saliency",
        "lrp",
        "integrated_gradients",
        "occlusion",
        "guided_backprop",
        "guided_gradcam",
        "cam",
        "lime",
        "normative",
        "attention",
        "dominant_class",
        "report",
        "attributes",
    ]
    with pytest.raises(ValueError, match="unknown attribution method 'gradcum'"):
        get_method("gradcum")


def test_saliency_is_the_autograd_gradient_exactly():
    model, x = tiny_resnet(), images()
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logit(model, xr, 1).sum(), xr)
    got = get_method("saliency")(model).attribute(x, target=1)
    assert got.dtype == torch.float64 and got.shape == (2, 1, 16, 16)
    torch.testing.assert_close(got, grad, rtol=0, atol=1e-12)
    assert (got < 0).any(), "signed by default"
    torch.testing.assert_close(
        get_method("saliency")(model, abs=True).attribute(x, 1), grad.abs(), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("relu", [False, True])
def test_gradcam_matches_hand_computation(relu):
    model, x = tiny_resnet(), images()
    acts = []
    handle = model.cam_layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    (a,) = acts
    (g,) = torch.autograd.grad(out[:, 0].sum(), a)
    weights = g.mean(dim=(2, 3), keepdim=True)  # alpha_k: pooled gradients
    ref = (weights * a).sum(1, keepdim=True)
    ref = ref.clamp(min=0) if relu else ref
    ref = F.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False)
    got = get_method("gradcam")(model, relu=relu).attribute(x, target=0)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)


def test_integrated_gradients_completeness_within_one_percent():
    model, x = tiny_resnet(), images()
    got = get_method("integrated_gradients")(model, n_steps=64, baseline=-1.0).attribute(x, 1)
    with torch.no_grad():
        expected = logit(model, x, 1) - logit(model, torch.full_like(x, -1.0), 1)
    total = got.flatten(1).sum(1)
    assert (expected.abs() > 1e-3).all()
    assert ((total - expected).abs() <= 0.01 * expected.abs()).all(), (total, expected)


class PatchModel(nn.Module):
    """Logits ``[0, mean of x over the patch rows 8:16, cols 4:12]``: the answer is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, 8:16, 4:12].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(v), v], dim=1)


def test_occlusion_finds_the_patch_the_model_reads():
    x = images(size=24)
    got = get_method("occlusion")(PatchModel(), window=4, stride=4, baseline=-1.0).attribute(x, 1)
    # Each 4x4 window inside the patch covers 16 of its 64 pixels: occluding it with -1 lowers
    # the logit by (sum of those pixels + 16) / 64; windows outside change nothing.
    expected = torch.zeros_like(x)
    for r in range(8, 16, 4):
        for c in range(4, 12, 4):
            drop = (x[:, :, r : r + 4, c : c + 4].sum(dim=(1, 2, 3)) + 16) / 64
            expected[:, :, r : r + 4, c : c + 4] = drop[:, None, None, None]
    # captum divides its sums in float32: exact up to float32 rounding.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (got[:, :, :8] == 0).all() and (got[:, :, :, 12:] == 0).all()


def test_cam_mean_plus_bias_is_the_logit_and_upsamples():
    model, x = tiny_resnet(), images()
    with isolated(model):
        low = cam_maps(model, x, 1)
    assert low.shape == (2, 1, 8, 8)  # 16 px, one stride-2 stage
    with torch.no_grad():
        torch.testing.assert_close(
            low.mean(dim=(1, 2, 3)) + model.fc.bias[1], logit(model, x, 1), rtol=1e-10, atol=1e-12
        )
    got = get_method("cam")(model).attribute(x, 1)
    ref = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_lrp_is_zennit_on_the_same_model_and_differs_from_gradient_times_input():
    from zennit.attribution import Gradient

    model, x = tiny_resnet(), images()
    got = get_method("lrp")(model).attribute(x, 1)
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    with Gradient(ref_model, lrp_composite("epsilon_plus_flat")) as attributor:
        one_hot = torch.tensor([[0.0, 1.0]], dtype=x.dtype).expand(len(x), -1)
        out, rel = attributor(x.clone().requires_grad_(True), one_hot)
    ref = out[:, 1:].detach()[:, :, None, None] * rel  # output relevance = the target logit
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logit(model, xr, 1).sum(), xr)
    assert not torch.allclose(got, grad * x, atol=1e-6), "the LRP rules did not apply"
    other = get_method("lrp")(model, composite="epsilon_gamma_box").attribute(x, 1)
    assert not torch.allclose(got, other)
    with pytest.raises(ValueError, match="composite 'nope' unknown"):
        get_method("lrp")(model, composite="nope")


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * (g > 0)


def test_guided_backprop_matches_textbook_rule():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double()  # fmt: skip
    x = images(size=8).requires_grad_(True)
    h = x
    for m in net:
        h = _GuidedReLU.apply(h) if isinstance(m, nn.ReLU) else m(h)
    (ref,) = torch.autograd.grad(h[:, 1].sum(), x)
    got = get_method("guided_backprop")(net).attribute(x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_lime_weights_only_the_superpixels_the_model_reads():
    x = images(n=1, size=24, seed=3)
    torch.manual_seed(0)  # LIME samples its masks with torch's global generator
    got = get_method("lime")(PatchModel(), n_samples=200, n_segments=16).attribute(x, 1)[0, 0]
    segments = slic_segments(x, n_segments=16)[0, 0]
    patch = torch.zeros(24, 24, dtype=torch.bool)
    patch[8:16, 4:12] = True
    overlap = {int(s): int((patch & (segments == s)).sum()) for s in segments.unique()}
    weight = {s: float(got[segments == s].mean()) for s in overlap}
    assert len(overlap) >= 8
    for s, n in overlap.items():
        assert (got[segments == s] == weight[s]).all(), "one weight per superpixel"
        if n == 0:
            assert abs(weight[s]) < 0.02, (s, weight[s])
    assert max(weight, key=weight.get) == max(overlap, key=overlap.get)


def test_display_normalisation_keeps_signs():
    m = torch.tensor([[[[-4.0, 2.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    s = normalise(m, signed=True)
    torch.testing.assert_close(s[0].flatten(), torch.tensor([-1.0, 0.5, 0.25, 0.0]))
    assert (s[1] == 0).all()
    u = normalise(m, signed=False)
    torch.testing.assert_close(u[0].flatten(), torch.tensor([0.0, 1.0, 0.5, 0.0]))


# ----------------------------------------------------------------------------- isolation


def _hook_count(model: nn.Module) -> int:
    tables = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, t)) for m in model.modules() for t in tables)


def _state(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        {n: sorted(vars(m)) for n, m in model.named_modules()},
        [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)],
    )


def _assert_unchanged(model: nn.Module, before, training: bool) -> None:
    weights, types, attrs, inplace = _state(model)
    assert _hook_count(model) == 0
    assert weights.keys() == before[0].keys()
    for k in weights:
        assert torch.equal(weights[k], before[0][k]), f"{k} changed"
    assert types == before[1] and attrs == before[2] and inplace == before[3]
    assert all(m.training == training for m in model.modules())


class Bomb(nn.Module):
    """Identity until armed; armed, it raises inside the forward pass (after hooks are set)."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom")
        return x


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_no_hook_or_change_survives_a_call_or_an_error(name):
    model = tiny_resnet(torch.float32, attention=name == "attention")
    model.dropout = Bomb()
    model.train()  # the method switches to eval inside and must switch back
    before = _state(model)
    x = images(dtype=torch.float32)
    out = get_method(name)(model, **FAST.get(name, {})).attribute(x, 1)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    _assert_unchanged(model, before, training=True)
    Bomb.armed = True  # on the class: the instance keeps its attributes
    try:
        with pytest.raises(RuntimeError, match="boom"):
            get_method(name)(model, **FAST.get(name, {})).attribute(x, 1)
    finally:
        Bomb.armed = False
    _assert_unchanged(model, before, training=True)


def test_cam_methods_name_what_they_need():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    for name in ("gradcam", "guided_gradcam", "cam"):
        with pytest.raises(ValueError, match="cam_layer"):
            get_method(name)(net)


def test_display_quantile_clips_outliers_and_falls_back_to_the_max():
    m = torch.zeros(1, 1, 10, 10)
    m[0, 0, 0, :] = torch.linspace(-1, 1, 10)
    m[0, 0, 5, 5] = 100.0  # one extreme pixel
    s = normalise(m, signed=True, quantile=0.9)
    assert s.max() == 1 and s[0, 0, 0, 0] < -0.5, "the outlier no longer washes out the rest"
    sparse = torch.zeros(1, 1, 10, 10)
    sparse[0, 0, 3, 3] = 2.0
    assert normalise(sparse, signed=False, quantile=0.9)[0, 0, 3, 3] == 1
