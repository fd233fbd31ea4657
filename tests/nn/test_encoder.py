"""Encoder network: shapes in W and W+, the w_avg start, W statistics travel with the weights."""

from __future__ import annotations

import pytest
import torch

from cfexplain.nn.encoder import Encoder
from cfexplain.utils.artifacts import load_model, save_model


def test_w_space_broadcasts_one_w_and_wplus_gives_one_per_layer():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    for space in ("w", "wplus"):
        E = Encoder(img_resolution=16, img_channels=1, w_dim=12, num_ws=5, space=space, width=4)
        torch.nn.init.normal_(E.head[-1].weight, std=0.1)
        w = E(x)
        assert w.shape == (3, 5, 12)
        same = torch.allclose(w[:, :1].expand_as(w), w)
        assert same == (space == "w")


def test_starts_at_w_avg_and_works_in_units_of_w_std():
    E = Encoder(img_resolution=8, img_channels=3, w_dim=4, num_ws=2, width=4)
    w_avg, w_std = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.5, 2.0, 1.0, 4.0])
    E.set_w_stats(w_avg, w_std)
    w = E(torch.randn(2, 3, 8, 8))
    assert torch.equal(w, w_avg.expand(2, 2, 4))  # zero-initialised last layer: the mean image
    assert torch.allclose(E.normalise(w_avg + 3 * w_std), torch.full((4,), 3.0))


def test_save_and_load_keep_the_w_statistics(tmp_path):
    E = Encoder(img_resolution=16, img_channels=1, w_dim=6, num_ws=3, space="wplus", width=4)
    E.set_w_stats(torch.arange(6.0), torch.full((6,), 0.25))
    torch.nn.init.normal_(E.head[-1].weight, std=0.1)
    kwargs = dict(img_resolution=16, img_channels=1, w_dim=6, num_ws=3, space="wplus", width=4)
    save_model(tmp_path / "e.safetensors", E, "cfexplain.nn.encoder.Encoder", kwargs)
    loaded = load_model(tmp_path / "e.safetensors")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded.w_avg, E.w_avg) and torch.equal(loaded(x), E.eval()(x))


def test_wrong_inputs_are_named():
    with pytest.raises(ValueError, match="encoder.space"):
        Encoder(space="z")
    with pytest.raises(ValueError, match="power of two"):
        Encoder(img_resolution=48)
    E = Encoder(img_resolution=16, img_channels=1, w_dim=4, num_ws=2, width=4)
    with pytest.raises(AssertionError, match=r"\[N, 1, 16, 16\]"):
        E(torch.zeros(1, 3, 16, 16))
