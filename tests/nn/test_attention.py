"""Trainable attention: normalised maps, training, save/load, the stage option, the `attention` method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cfexplain.explain.attribution import get_method
from cfexplain.nn.attention import AttentionEstimator, spatial_softmax, upsampled_attention
from cfexplain.nn.classifier import BinaryLogitAdapter, ResNetClassifier, load_classifier
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import load_model, read_model_meta, save_model

TARGET = "cfexplain.nn.classifier.ResNetClassifier"
KW = dict(in_channels=1, num_classes=2, width=4, blocks=(1, 1, 1), stem_stride=1)


def blobs(n: int = 16, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1: a bright square in the left half; label 0: in the right half. Noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.4 - 1
    y = torch.arange(n) % 2
    for i in range(n):
        r = int(torch.randint(0, size - 4, (1,), generator=g))
        c = int(torch.randint(0, size // 2 - 4, (1,), generator=g)) + (0 if y[i] else size // 2)
        x[i, :, r : r + 4, c : c + 4] = 1.0
    return x, y


def randomise_u(model: ResNetClassifier, seed: int = 1) -> None:
    """u starts at zero (uniform attention); give it values so the maps are not trivially flat."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for est in model.attend:
            est.u.weight.copy_(torch.randn(est.u.weight.shape, generator=g))


def test_maps_are_non_negative_and_sum_to_one_per_image_and_level():
    torch.manual_seed(0)
    model = ResNetClassifier(**KW, attention=True).eval()
    assert model.attention_stages == (1, 2)  # default: the last two stages
    randomise_u(model)
    x, _ = blobs(4)
    logits, maps = model.forward_attention(x)
    assert logits.shape == (4, 2) and len(maps) == 2
    assert [tuple(a.shape) for a in maps] == [(4, 1, 8, 8), (4, 1, 4, 4)]
    for a in maps:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum((1, 2, 3)), torch.ones(4))
        assert a.flatten(1).std(1).min() > 0  # not uniform: the test would be empty otherwise
    torch.testing.assert_close(model(x), logits)


def test_estimator_matches_the_paper_formula_in_float64():
    torch.manual_seed(0)
    est = AttentionEstimator(3, 5).double()
    torch.nn.init.normal_(est.u.weight)
    local, g = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    a, g_a = est(local, g)
    # c_i = <u, P l_i + g>, a = softmax over the 16 positions, g_a = sum_i a_i P l_i
    P, u = est.project.weight[:, :, 0, 0], est.u.weight[0, :, 0, 0]
    lp = torch.einsum("oc,nchw->nohw", P, local).flatten(2)  # [N, 5, 16]
    c = torch.einsum("o,nop->np", u, lp + g[:, :, None])
    ref_a = torch.softmax(c, dim=1)
    torch.testing.assert_close(a.flatten(1), ref_a)
    torch.testing.assert_close(g_a, torch.einsum("np,nop->no", ref_a, lp))
    with pytest.raises(AssertionError):
        spatial_softmax(torch.zeros(2, 3, 4, 4))


def test_attention_off_is_the_plain_resnet_and_old_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    model = ResNetClassifier(**KW).eval()
    assert not model.attention and not any("attend" in k for k in model.state_dict())
    x, _ = blobs(3)
    plain = model.fc(torch.flatten(model.pool(model.features(x)), 1))
    torch.testing.assert_close(model(x), plain)
    # A checkpoint written before the option existed has no `attention` kwarg.
    path = save_model(tmp_path / "old.safetensors", model, TARGET, KW)
    assert "attention" not in read_model_meta(path)[1]
    torch.testing.assert_close(load_model(path)(x), model(x))
    with pytest.raises(ValueError, match="attention=False"):
        model.attention_maps(x)


def test_attention_classifier_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    kwargs = {**KW, "attention": True, "attention_stages": [-2, -1]}
    model = ResNetClassifier(**kwargs)
    x, y = blobs(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    # u started at zero and was learnt: the maps are no longer uniform
    assert any(est.u.weight.abs().sum() > 0 for est in model.attend)
    model.eval()
    path = save_model(tmp_path / "att.safetensors", model, TARGET, kwargs)
    loaded = load_model(path)
    assert loaded.attention and loaded.attention_stages == model.attention_stages
    torch.testing.assert_close(loaded(x), model(x))
    for a, b in zip(loaded.attention_maps(x), model.attention_maps(x), strict=True):
        torch.testing.assert_close(a, b)


def test_attention_stages_are_validated():
    with pytest.raises(ValueError, match="attention_stages: stage 3"):
        ResNetClassifier(**KW, attention=True, attention_stages=[3])
    m = ResNetClassifier(**KW, attention=True, attention_stages=[-1])
    assert m.attention_stages == (2,) and m.fc.in_features == 16


def _hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_attention_method_shape_normalisation_and_no_hooks():
    torch.manual_seed(0)
    model = ResNetClassifier(**KW, attention=True).train()
    randomise_u(model)
    x, _ = blobs(3)
    before = _hooks(model)
    a = get_method("attention")(model).attribute(x, 1)
    assert a.shape == (3, 1, 16, 16) and (a >= 0).all()
    torch.testing.assert_close(a.sum((1, 2, 3)), torch.ones(3))
    assert _hooks(model) == before and model.training  # isolated() restored train mode
    # the mean of the levels, each brought to the input and rescaled to sum to 1
    with torch.no_grad():
        ref = upsampled_attention(model.eval().attention_maps(x), (16, 16))
    torch.testing.assert_close(a, ref)
    # a wrapped model works too; a model without attention fails clearly
    get_method("attention")(BinaryLogitAdapter(model)).attribute(x, 0)
    with pytest.raises(ValueError, match="classifier.attention=true"):
        get_method("attention")(ResNetClassifier(**KW))


def test_gradcam_works_and_cam_refuses_on_an_attention_model():
    torch.manual_seed(0)
    model = ResNetClassifier(**KW, attention=True)
    x, _ = blobs(2)
    g = get_method("gradcam")(model).attribute(x, 1)
    assert g.shape == (2, 1, 16, 16) and g.abs().sum() > 0
    with pytest.raises(ValueError, match="cam"):
        get_method("cam")(model).attribute(x, 1)


def test_stage_trains_with_classifier_attention_true_and_reloads(smoke_cfg):
    art = run_chain(smoke_cfg("stages=[classifier]", "classifier.attention=true"))["classifier"]
    model = load_classifier(art.dir)
    assert model.attention and len(model.attend) == 2
    res = smoke_cfg().data.resolution
    x = torch.zeros(2, 1, res, res)
    assert model(x).shape == (2, 2)
    assert get_method("attention")(model).attribute(x, 1).shape == (2, 1, res, res)
