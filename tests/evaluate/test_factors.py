"""Counterfactual factor metrics: constructed changes with known answers, and true phantom
counterfactuals (``KneePhantom.render`` with overrides) as the ground truth of the ratio."""

from __future__ import annotations

import math

import pytest
import torch

from cfexplain.data.phantoms.knee import KneePhantom
from cfexplain.evaluate import factors as Fm
from cfexplain.evaluate.oracles import CAUSAL, NUISANCE, train_oracle
from cfexplain.explain.counterfactual import Counterfactuals
from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.utils.quality import FeatureStats

RES = 32
NAMES = list(CAUSAL + NUISANCE)


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    model, _ = train_oracle(
        resolution=RES, n_train=600, n_test=100, steps=300, batch_size=32, progress=False
    )
    return model


@pytest.fixture(scope="module")
def phantom():
    # Split "val" of seed 11: neither the oracle's seed nor its splits' images.
    return KneePhantom(40, RES, seed=11, split="val")


def _renders(ds, overrides, n=40):
    return torch.stack([ds.render(i, overrides)["image"] for i in range(n)])


# ----------------------------------------------------------------------------- constructed


def test_mnac_counts_changes_above_the_threshold():
    changes = torch.tensor([[0.1, 0.6, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert Fm.mnac(changes).tolist() == [2, 0, 4]  # strictly above 0.5
    assert Fm.mnac(changes, 0.05).tolist() == [4, 0, 4]
    per_factor = torch.tensor([0.05, 1.0, 0.4, 3.0])
    assert Fm.mnac(changes, per_factor).tolist() == [2, 0, 2]


def test_causal_nuisance_ratio_is_pooled_over_images():
    names = ["jsw_min", "osteophyte", "rotation", "marker", "gamma"]
    changes = torch.tensor(
        [
            [1.0, 3.0, 0.0, 0.0, 9.0],  # nuisance 0 here: a per-image ratio would be infinite
            [0.0, 0.0, 1.0, 1.0, 9.0],
        ]
    )
    # causal mean (1 + 3 + 0 + 0) / 4 = 1, nuisance mean (0 + 0 + 1 + 1) / 4 = 0.5; "gamma"
    # belongs to neither group and is ignored.
    assert Fm.causal_nuisance_ratio(changes, names) == pytest.approx(2.0)
    assert Fm.causal_nuisance_ratio(changes[:1], names) == math.inf
    assert math.isnan(Fm.causal_nuisance_ratio(torch.zeros(3, 5), names))
    assert math.isnan(Fm.causal_nuisance_ratio(changes[:, :2], names[:2]))  # no nuisance column
    with pytest.raises(AssertionError, match="changes must be"):
        Fm.causal_nuisance_ratio(changes, names[:3])


def _cf(images, recon, probs, recon_probs):
    n, k = probs.shape
    return Counterfactuals(
        images=images,
        lambdas=torch.linspace(-1, 1, k).expand(n, -1),
        probs=probs,
        reconstruction=recon,
        recon_error=torch.zeros(n),
        input_probs=recon_probs,
        w=torch.zeros(n, 1, 3),
        target=1,
        recon_probs=recon_probs,
    )


def test_counterfactual_factors_picks_flip_or_last_frame_and_sees_the_marker(oracle, phantom):
    ost = [0.0, 0.03, 0.06, 0.09, 0.12]
    seqs = [
        torch.stack([phantom.render(i, {"osteophyte": o, "marker": 0})["image"] for o in ost])
        for i in range(3)
    ]
    # Image 2: the marker appears in the last frame (the shortcut a classifier may take).
    seqs[2][-1] = phantom.render(2, {"osteophyte": ost[-1], "marker": 1})["image"]
    images = torch.stack(seqs)  # [3, 5, 1, R, R]
    recon = images[:, 0].clone()
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.4, 0.6, 0.8],  # flips at frame 3
            [0.1, 0.1, 0.2, 0.3, 0.4],  # never flips: the last frame (largest λ)
            [0.6, 0.6, 0.7, 0.8, 0.9],  # reconstruction already positive, no flip: frame 0
        ]
    )
    cf = _cf(images, recon, probs, torch.tensor([0.1, 0.1, 0.65]))
    out = Fm.counterfactual_factors(oracle, cf)
    assert out["frame_index"].tolist() == [3, 4, 0]
    assert out["flipped"].tolist() == [True, False, False]
    after = torch.stack([images[0, 3], images[1, 4], images[2, 0]])
    expected = Fm.factor_changes(oracle, recon, after, oracle.change_scale)
    assert torch.allclose(out["changes"], expected, atol=1e-5)
    assert torch.allclose(out["changes"][2], torch.zeros(len(NAMES)), atol=1e-6)
    # float32 convolutions differ in the last digits with the batch they run in (threads).
    assert out["ratio"] == pytest.approx(Fm.causal_nuisance_ratio(expected, NAMES), rel=1e-4)
    assert out["ratio_flipped"] == pytest.approx(
        Fm.causal_nuisance_ratio(expected[:1], NAMES), rel=1e-4
    )
    assert torch.equal(out["mnac"], Fm.mnac(expected))
    assert out["mnac_flipped"] == pytest.approx(float(Fm.mnac(expected[:1])[0]))
    # The marker is judged over the whole sequence, not just the chosen frame.
    assert out["marker_changed"].tolist() == [False, False, True]
    assert out["marker_frame"].tolist() == [-1, -1, 4]  # the frame it changed in
    j = NAMES.index("osteophyte")
    assert out["after"][0, j] > out["before"][0, j]


def test_read_factors_keeps_leading_dims_and_batches(oracle, phantom):
    x = _renders(phantom, {}, 12).view(3, 4, 1, RES, RES)
    y = Fm.read_factors(oracle, x, batch_size=5)
    assert y.shape == (3, 4, len(NAMES))
    with torch.no_grad():
        ref = oracle(x.flatten(0, 1)).view(3, 4, -1)
    assert torch.allclose(y, ref, atol=1e-5)


# ----------------------------------------------------------------------------- true counterfactuals


def test_true_disease_counterfactual_moves_the_disease_reading_only(oracle, phantom):
    before = _renders(phantom, {"osteophyte": 0.0})
    after = _renders(phantom, {"osteophyte": 0.1})
    delta = Fm.read_factors(oracle, after) - Fm.read_factors(oracle, before)
    j = NAMES.index("osteophyte")
    assert (delta[:, j] > 0).float().mean() > 0.85  # the right direction, image by image
    changes = Fm.factor_changes(oracle, before, after, oracle.change_scale)
    nuisance = [NAMES.index(f) for f in NUISANCE]
    assert changes[:, j].mean() > 1.0  # 0 -> 0.1 is about 2.5 std of the phantom's osteophyte
    assert changes[:, nuisance].mean() < 0.15
    ratio = Fm.causal_nuisance_ratio(changes, NAMES)
    assert ratio > 5.0
    assert Fm.mnac(changes).float().mean() < 2.0  # mostly the osteophyte alone


def test_true_counterfactual_ratios_separate_disease_from_nuisance_edits(oracle):
    # Measured with this tiny oracle: disease edits 5.2-7.2, nuisance edits 0.59-0.75 (the
    # floor set by its reading noise; larger oracles read less noisily).
    res = Fm.true_counterfactual_ratios(oracle, n=40)
    assert [k for k, v in res.items() if v["kind"] == "disease"] == [
        "osteophyte",
        "sclerosis",
        "narrowing",
    ]
    disease = [v["ratio"] for v in res.values() if v["kind"] == "disease"]
    nuisance = [v["ratio"] for v in res.values() if v["kind"] == "nuisance"]
    assert min(disease) > 3.0 and max(nuisance) < 1.0
    assert min(disease) > 4.0 * max(nuisance)
    # In every edit the edited factor is the one read as changing most.
    edited = {"narrowing": "jsw_min"}
    for name, v in res.items():
        ch = v["changes"]
        assert max(ch, key=ch.get) == edited.get(name, name), (name, ch)


# ----------------------------------------------------------------------------- realism


def test_realism_fd_is_zero_for_identical_sets_and_grows_with_a_shift(phantom):
    torch.manual_seed(0)
    net = ResNetClassifier(1, 2, width=4, blocks=(1, 1)).eval()
    stats = FeatureStats(net, torch.device("cpu"))
    real = _renders(phantom, {}, 40)
    other = torch.stack([KneePhantom(40, RES, seed=12, split="val")[i]["image"] for i in range(40)])
    same = Fm.realism_fd(stats, real.view(8, 5, 1, RES, RES), real)  # frames [N, K, C, H, W]
    near = Fm.realism_fd(stats, other, real)
    far = Fm.realism_fd(stats, (other * 0.5 - 0.5).clamp(-1, 1), real)  # darker, lower contrast
    assert abs(same) < 1e-3 * far
    assert near < far
    with pytest.raises(ValueError, match="at least 2"):
        Fm.realism_fd(stats, real[:1], real)
