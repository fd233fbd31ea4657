"""Concept capsules: squash and routing, shapes, the planted attribute, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfexplain.data.concepts import attribute_metrics
from cfexplain.nn.capsules import CapsuleClassifier, capsule_losses, lengths, route, squash
from cfexplain.utils.artifacts import load_model, save_model


def test_squash_keeps_direction_and_lengths_below_one_even_for_huge_vectors():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1e-4, 0.0], [3e8, -4e8], [1e30, 0.0]])
    v = squash(s)
    n = lengths(v)
    assert torch.isfinite(v).all()
    assert (n >= 0).all() and (n < 1).all(), n
    assert n[1] == pytest.approx(25 / 26, rel=1e-5)  # |s|^2 / (1 + |s|^2)
    assert n[0] < 1e-5 and n[2] < 1e-5  # 1e-8, read through lengths()' 1e-6 floor
    cos = torch.nn.functional.cosine_similarity(v[1:4], s[1:4], dim=1)
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)


def test_routing_keeps_capsule_lengths_in_0_1_and_couplings_sum_to_one():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3, 1e12):
        votes = torch.randn(4, 30, 5, 16, generator=g) * scale
        v, c = route(votes, iterations=3)
        n = lengths(v)
        assert v.shape == (4, 5, 16) and c.shape == (4, 30, 5)
        assert (n >= 0).all() and (n < 1).all(), (scale, n.max())
        assert torch.allclose(c.sum(2), torch.ones(4, 30), atol=1e-5)


def test_routing_couples_each_input_to_the_output_it_agrees_with():
    # Inputs 0-9 vote (1, 0) for output 0 and noise for output 1; inputs 10-19 the reverse.
    g = torch.Generator().manual_seed(1)
    votes = torch.randn(1, 20, 2, 2, generator=g) * 0.3
    votes[0, :10, 0] = torch.tensor([1.0, 0.0])
    votes[0, 10:, 1] = torch.tensor([0.0, 1.0])
    _, c = route(votes, iterations=3)
    assert (c[0, :10, 0] > 0.5).all() and (c[0, 10:, 1] > 0.5).all()
    _, uniform = route(votes, iterations=1)
    assert torch.allclose(uniform, torch.full_like(uniform, 0.5))


def test_model_shapes_and_every_reading_in_0_1():
    net = CapsuleClassifier(
        in_channels=3, resolution=16, attributes=["a", "b"], width=4, types=2
    ).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = net.outputs(x)
    assert out.logits.shape == (3, 2) and out.attributes.shape == (3, 2)
    assert out.poses.shape == (3, 2, 16) and out.reconstruction.shape == x.shape
    assert (out.attributes >= 0).all() and (out.attributes < 1).all()
    assert torch.equal(net(x), out.logits)
    each = net.attribute_reconstructions(x)
    assert each.shape == (3, 2, 3, 16, 16) and each.abs().max() <= 1
    with pytest.raises(ValueError, match="distinct"):
        CapsuleClassifier(attributes=["a", "a"])


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 px noise images; attribute 0 is the brightness of a 6x6 patch at the top left, the
    other a distractor (bottom right); the label is attribute 0 >= 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.4 - 0.8
    a = torch.rand(n, 2, generator=g)
    x[:, 0, 1:7, 1:7] += 1.6 * a[:, 0, None, None]
    x[:, 0, 9:15, 9:15] += 1.6 * a[:, 1, None, None]
    return x.clamp(-1, 1), a, (a[:, 0] >= 0.5).long()


def test_the_capsules_learn_a_planted_attribute_on_tiny_data():
    torch.manual_seed(0)
    net = CapsuleClassifier(
        resolution=16, attributes=["patch", "other"], width=8, types=4, decoder_width=8
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, a, y = _planted(256, seed=0)
    for step in range(150):
        i = torch.arange(step * 32, step * 32 + 32) % 256
        terms = capsule_losses(net(x[i], outputs=True), x[i], y[i], a[i], 1.0, 0.1)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    net.eval()
    xt, at, yt = _planted(128, seed=1)
    with torch.no_grad():
        pred = net.attribute_values(xt).numpy()
        p = torch.softmax(net(xt), 1)[:, 1].numpy()
    m = attribute_metrics(pred, at.numpy(), ["patch", "other"])
    assert m["patch/auc"] > 0.95 and m["patch/mae"] < 0.15, m
    assert m["other/auc"] > 0.95, m
    assert np.corrcoef(p, at[:, 0].numpy())[0, 1] > 0.7  # the diagnosis follows the patch


def test_unsupervised_capsules_train_without_targets():
    net = CapsuleClassifier(resolution=16, width=4, types=2)
    x, _, y = _planted(8, seed=0)
    terms = capsule_losses(net(x, outputs=True), x, y, None, 0.0, 0.5)
    assert set(terms) == {"loss", "diagnosis", "reconstruction"}
    terms["loss"].backward()
    assert net.votes.grad is not None and net.votes.grad.abs().sum() > 0


def test_saved_with_its_constructor_arguments(tmp_path):
    net = CapsuleClassifier(resolution=16, attributes=["x", "y", "z"], width=4, types=2).eval()
    kwargs = {"resolution": 16, "attributes": ["x", "y", "z"], "width": 4, "types": 2}
    save_model(tmp_path / "c.safetensors", net, "cfexplain.nn.capsules.CapsuleClassifier", kwargs)
    loaded = load_model(tmp_path / "c.safetensors")
    x = torch.rand(2, 1, 16, 16)
    assert loaded.attributes == ["x", "y", "z"]
    assert torch.equal(loaded(x), net(x))
