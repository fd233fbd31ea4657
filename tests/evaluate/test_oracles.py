"""Factor oracles: held-out read-back on phantoms, the cache, the decorrelated training data."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cfexplain.evaluate import oracles as O
from cfexplain.utils.images import gaussian_blur

# Tiny but real: 32 px, 600 images, 300 steps (about 10 s on one core). Measured at these
# settings: R² jsw_min 0.86, osteophyte 0.70, rotation 0.88, exposure 0.68, sclerosis 0.25;
# laterality and marker accuracy >= 0.99. The thresholds below leave margin.
TINY = dict(
    resolution=32, n_train=600, n_test=300, steps=300, batch_size=32, seed=0, progress=False
)
MIN_R2 = {"jsw_min": 0.6, "osteophyte": 0.4, "rotation": 0.6, "exposure": 0.35, "sclerosis": 0.05}
MIN_ACCURACY = {"laterality": 0.9, "marker": 0.9}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return O.train_oracle(**TINY)


def test_oracle_reads_back_factors_on_held_out_phantoms(trained):
    oracle, metrics = trained
    assert oracle.factors == list(O.DEFAULT_FACTORS)
    assert set(O.CAUSAL).isdisjoint(O.NUISANCE)
    m = metrics["factors"]
    for name, r2 in MIN_R2.items():
        assert m[name]["r2"] > r2, (name, m[name])
        assert m[name]["mae"] < m[name]["factor_std"], (name, m[name])  # beats a constant guess
    for name, acc in MIN_ACCURACY.items():
        assert m[name]["accuracy"] > acc, (name, m[name])
    # Light blur (generated images are softer) does not break the read-back.
    mb = metrics["factors_blurred"]
    for name, r2 in MIN_R2.items():
        assert mb[name]["r2"] > r2 - 0.1, (name, mb[name])
    assert mb["marker"]["accuracy"] > 0.9


def test_oracle_outputs_units_and_probabilities(trained):
    oracle, metrics = trained
    from cfexplain.data.phantoms.knee import KneePhantom

    ds = KneePhantom(16, 32, seed=5, split="val")
    x = torch.stack([ds[i]["image"] for i in range(16)])
    with torch.no_grad():
        y = oracle(x)
    assert y.shape == (16, len(oracle.factors))
    b = oracle.binary
    assert ((y[:, b] >= 0) & (y[:, b] <= 1)).all()
    # De-standardised: rotation comes out in degrees (the phantom draws U(-8, 8)).
    rot = y[:, oracle.factors.index("rotation")]
    truth = torch.tensor([ds[i]["meta"]["factors"]["rotation"] for i in range(16)])
    assert (rot - truth).abs().mean() < 3.0
    assert torch.equal(oracle.change_scale[b], torch.ones(int(b.sum())))
    j = oracle.factors.index("osteophyte")
    assert oracle.change_scale[j] == pytest.approx(
        metrics["factors"]["osteophyte"]["factor_std"], rel=0.2
    )
    with pytest.raises(AssertionError, match="expected images"):
        oracle(torch.zeros(1, 1, 16, 16))


def test_factor_value_derives_jsw_min_and_names_unknown_factors():
    f = {"jsw_medial": 0.05, "jsw_lateral": 0.03, "rotation": 2.0}
    assert O.factor_value(f, "jsw_min") == 0.03
    assert O.factor_value(f, "rotation") == 2.0
    with pytest.raises(KeyError, match="'size'"):
        O.factor_value(f, "size")


def test_decorrelated_training_data_breaks_the_severity_link():
    names = ["jsw_min", "osteophyte", "sclerosis", "marker"]
    _, natural = O.phantom_factors(300, 16, 9, "train", names)
    x, mixed = O.phantom_factors(300, 16, 9, "train", names, decorrelate=True)

    def corr(y, a, b):
        return float(np.corrcoef(y[:, a].numpy(), y[:, b].numpy())[0, 1])

    assert corr(natural, 0, 1) < -0.6 and corr(natural, 1, 2) > 0.6  # one severity drives all
    assert abs(corr(mixed, 0, 1)) < 0.2 and abs(corr(mixed, 1, 2)) < 0.2
    # Same marginals: the donors are a permutation of the same samples.
    assert torch.allclose(mixed[:, 1].sort().values, natural[:, 1].sort().values)
    assert torch.equal(mixed[:, 3], natural[:, 3])  # the marker is not a disease factor
    assert x.shape == (300, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_gaussian_blur_matches_scipy_per_image():
    x = torch.rand(3, 2, 20, 20, dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64)
    y = gaussian_blur(x, sigma)
    assert torch.equal(y[0], x[0])
    radius = math.ceil(3.0 * 1.0)
    for i in (1, 2):
        s = float(sigma[i])
        for c in range(2):
            # torch's "reflect" padding is scipy's "mirror"; the same kernel radius for both.
            ref = ndimage.gaussian_filter(
                x[i, c].numpy(), s, mode="mirror", truncate=(radius + 0.25) / s
            )
            assert np.allclose(y[i, c].numpy(), ref, atol=1e-6)


def test_fit_or_load_reuses_the_cache_and_retrains_when_kwargs_change(tmp_path, monkeypatch):
    calls = []
    real = O.train_oracle

    @functools.wraps(real)
    def counting(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(O, "train_oracle", counting)
    small = dict(resolution=16, n_train=64, n_test=32, steps=5, batch_size=16, progress=False)
    folder = tmp_path / "oracle"
    first, info = O.fit_or_load(folder, **small)
    assert not info["reused"] and len(calls) == 1
    weights = folder / O.WEIGHTS_FILE
    mtime = weights.stat().st_mtime_ns
    assert info["metrics"]["factors"]["marker"]["accuracy"] >= 0.0

    # Same kwargs, a default spelled out and another device spelling: the cache is used.
    again, info2 = O.fit_or_load(folder, **small, seed=0, device=torch.device("cpu"))
    assert info2["reused"] and len(calls) == 1 and weights.stat().st_mtime_ns == mtime
    assert info2["fingerprint"] == info["fingerprint"]
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(first(x), again(x), atol=1e-6)
    assert torch.equal(again.std, first.std) and not again.training

    # Any training argument changed: retrained and the cache replaced.
    _, info3 = O.fit_or_load(folder, **{**small, "steps": 6})
    assert not info3["reused"] and len(calls) == 2
    assert info3["fingerprint"] != info["fingerprint"]
    _, info4 = O.fit_or_load(folder, **{**small, "steps": 6})
    assert info4["reused"] and len(calls) == 2

    # A damaged info file is not trusted.
    (folder / O.INFO_FILE).write_text("{not json")
    _, info5 = O.fit_or_load(folder, **{**small, "steps": 6})
    assert not info5["reused"] and len(calls) == 3

    with pytest.raises(TypeError, match="stepz"):
        O.fit_or_load(folder, stepz=3)
