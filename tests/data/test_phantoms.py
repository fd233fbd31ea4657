"""Phantoms: determinism, the sample contract, ground truth that agrees with the label,
balanced classes, the shortcut rule and the locality of the disease signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch.utils.data import DataLoader

from cfexplain.data.phantoms import HistologyPhantom, KneePhantom, kl_grade
from cfexplain.data.phantoms import knee as knee_mod

PHANTOMS = {"knee": KneePhantom, "histology": HistologyPhantom}
CHANNELS = {"knee": 1, "histology": 3}


def _same(a: dict, b: dict) -> bool:
    return (
        torch.equal(a["image"], b["image"])
        and a["label"] == b["label"]
        and all(
            torch.equal(a["meta"]["masks"][k], b["meta"]["masks"][k]) for k in a["meta"]["masks"]
        )
    )


@pytest.mark.parametrize("name", list(PHANTOMS))
def test_deterministic_per_seed_split_and_index(name):
    cls = PHANTOMS[name]
    a = cls(n=6, resolution=32, seed=3, split="val", cache=False)
    b = cls(n=40, resolution=32, seed=3, split="val", cache=False)
    assert all(_same(a[i], b[i]) for i in range(6))  # independent of n and of the instance
    other_seed = cls(n=6, resolution=32, seed=4, split="val", cache=False)
    other_split = cls(n=6, resolution=32, seed=3, split="test", cache=False)
    for i in range(6):
        assert not torch.equal(a[i]["image"], other_seed[i]["image"])
        assert not torch.equal(a[i]["image"], other_split[i]["image"])
        assert not torch.equal(a[i]["image"], a[(i + 1) % 6]["image"])


@pytest.mark.parametrize("name", list(PHANTOMS))
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_sample_contract(name, resolution):
    ds = PHANTOMS[name](n=4, resolution=resolution, seed=1)
    assert len(ds) == 4 and ds.resolution == resolution and ds.channels == CHANNELS[name]
    assert ds.num_classes == len(ds.class_names) and all(isinstance(c, str) for c in ds.class_names)
    for i in range(len(ds)):
        s = ds[i]
        img = s["image"]
        assert img.dtype == torch.float32
        assert img.shape == (CHANNELS[name], resolution, resolution)
        assert img.min() >= -1.0 and img.max() <= 1.0 and img.std() > 0.05
        assert isinstance(s["label"], int) and 0 <= s["label"] < ds.num_classes
        if name == "knee":
            assert set(s["meta"]["masks"]) == set(knee_mod.MASK_NAMES)
            named = set(knee_mod.DISEASE_FACTORS + knee_mod.NUISANCE_FACTORS) | {"marker"}
            assert named == set(s["meta"]["factors"])
        else:
            assert set(s["meta"]["masks"]) == {"tumour"}
        for mask in s["meta"]["masks"].values():
            assert mask.dtype == torch.bool and mask.shape == (resolution, resolution)
        assert all(isinstance(v, float) for v in s["meta"]["factors"].values())
        assert s["meta"]["index"] == i and s["meta"]["split"] == "train"


def test_knee_attributes_per_task():
    assert KneePhantom(n=1, task="binary").num_classes == 2
    kl = KneePhantom(n=1, task="kl")
    assert kl.num_classes == 5 and len(kl.class_names) == 5
    assert HistologyPhantom(n=1).class_names == ["normal", "tumour"]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"resolution": 48}, "resolution"),
        ({"resolution": 8}, "resolution"),
        ({"resolution": 2048}, "resolution"),
        ({"split": "dev"}, "split"),
        ({"seed": -1}, "seed"),
        ({"n": -3}, "n must"),
        ({"task": "grade"}, "task"),
        ({"shortcut_rate": 1.5}, "shortcut_rate"),
        ({"shortcut_rate": -0.1}, "shortcut_rate"),
        ({"decorrelate": 1.2}, "decorrelate"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, word):
    args = {"n": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        KneePhantom(**args)
    if not {"task", "shortcut_rate", "decorrelate"} & set(kwargs):
        with pytest.raises(ValueError, match=word):
            HistologyPhantom(**args)


def test_index_out_of_range_and_cache_is_not_aliased():
    ds = KneePhantom(n=3, resolution=16)
    with pytest.raises(IndexError):
        ds[3]
    first = ds[1]
    first["image"].zero_()
    first["meta"]["masks"]["joint_space"].zero_()
    again = ds[1]
    assert again["image"].abs().sum() > 0 and again["meta"]["masks"]["joint_space"].any()
    fresh = KneePhantom(n=3, resolution=16, cache=False)
    assert _same(again, fresh[1])
    assert _same(fresh[-1], fresh[2])


# --- ground truth ----------------------------------------------------------------------------

_factor = st.floats(0.0, 1.0, allow_nan=False)
_jsw = st.floats(0.0, 0.12, allow_nan=False)
_ost = st.floats(0.0, 0.15, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    base=st.fixed_dictionaries(
        {
            "jsw_medial": _jsw,
            "jsw_lateral": _jsw,
            "osteophyte": _ost,
            "sclerosis": _factor,
            "deformity": _factor,
        }
    ),
    key=st.sampled_from(knee_mod.DISEASE_FACTORS),
    step=st.floats(0.0, 0.2, allow_nan=False),
)
def test_kl_grade_is_monotone_in_every_factor(base, key, step):
    worse = dict(base)
    # Narrower joint space and larger anything else are both "worse".
    worse[key] = base[key] - step if key.startswith("jsw") else base[key] + step
    grade = kl_grade(base)
    assert 0 <= grade <= 4
    assert kl_grade(worse) >= grade


def test_kl_grade_rule_levels():
    k = knee_mod
    healthy = {
        "jsw_medial": 2 * k.JSW_DOUBTFUL,
        "jsw_lateral": 2 * k.JSW_DOUBTFUL,
        "osteophyte": 0.0,
        "sclerosis": 0.0,
        "deformity": 0.0,
    }
    assert kl_grade(healthy) == 0
    assert kl_grade({**healthy, "osteophyte": 0.5 * k.OST_DEFINITE}) == 1
    assert kl_grade({**healthy, "jsw_medial": k.JSW_DOUBTFUL}) == 1
    assert kl_grade({**healthy, "osteophyte": k.OST_DEFINITE}) == 2
    grade3 = {
        **healthy,
        "osteophyte": k.OST_MODERATE,
        "jsw_lateral": k.JSW_DEFINITE,
        "sclerosis": k.SCL_SOME,
    }
    assert kl_grade(grade3) == 3
    assert kl_grade({**grade3, "sclerosis": 1.0, "deformity": 1.0}) == 3  # no marked narrowing
    grade4 = {
        **grade3,
        "osteophyte": k.OST_LARGE,
        "jsw_medial": k.JSW_MARKED,
        "sclerosis": k.SCL_SEVERE,
        "deformity": k.DEF_PRESENT,
    }
    assert kl_grade(grade4) == 4
    with pytest.raises(KeyError, match="osteophyte"):
        kl_grade({"jsw_medial": 0.1, "jsw_lateral": 0.1, "sclerosis": 0, "deformity": 0})


def test_labels_follow_the_grade_of_the_factors():
    binary = KneePhantom(n=40, resolution=16, seed=2, cache=False)
    kl = KneePhantom(n=40, resolution=16, seed=2, task="kl", cache=False)
    grades = set()
    for i in range(40):
        b, g = binary[i], kl[i]
        grade = kl_grade(b["meta"]["factors"])
        assert b["meta"]["grade"] == grade == g["label"] == g["meta"]["grade"]
        assert b["label"] == int(grade >= 2)
        grades.add(grade)
    assert len(grades) >= 4  # the sampler reaches (almost) every grade


def test_masks_present_exactly_when_their_factor_is():
    ds = KneePhantom(n=100, resolution=32, seed=5, shortcut_rate=0.3, cache=False)
    seen = {"osteophyte": set(), "sclerosis": set(), "marker": set()}
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        f, m = meta["factors"], meta["masks"]
        assert m["joint_space"].any()
        for name, present in (
            ("osteophyte", f["osteophyte"] > 0),
            ("sclerosis", f["sclerosis"] > 0),
            ("marker", f["marker"] == 1.0),
        ):
            assert bool(m[name].any()) == present, (i, name, f[name])
            seen[name].add(present)
    assert all(v == {True, False} for v in seen.values())  # both cases were exercised


def test_histology_tumour_mask_iff_label():
    ds = HistologyPhantom(n=40, resolution=32, seed=1, cache=False)
    labels = []
    for i in range(len(ds)):
        s = ds[i]
        assert bool(s["meta"]["masks"]["tumour"].any()) == (s["label"] == 1)
        assert (s["meta"]["tumour_fraction"] > 0) == (s["label"] == 1)
        labels.append(s["label"])
    assert 0 < sum(labels) < len(labels)


def test_masks_follow_laterality_mirroring():
    ds = KneePhantom(n=30, resolution=32, seed=7, cache=False)
    i = next(j for j in range(30) if ds.params(j)[0]["osteophyte"] > 0.05)
    keys = ("osteophyte", "joint_space", "sclerosis")
    still = {"rotation": 0.0, "shift_x": 0.0, "noise": 0.0, "marker": 0.0}
    left = ds.render(i, {**still, "laterality": 0.0})
    right = ds.render(i, {**still, "laterality": 1.0})
    for k in keys:
        assert left["meta"]["masks"][k].any()
        assert torch.equal(right["meta"]["masks"][k], left["meta"]["masks"][k].flip(-1))
    assert torch.allclose(right["image"], left["image"].flip(-1), atol=1e-5)
    # With a rotation and shift, mirroring also mirrors them.
    f = ds.params(i)[0]
    turned = ds.render(i, {"laterality": 1.0})
    back = ds.render(i, {"laterality": 0.0, "rotation": -f["rotation"], "shift_x": -f["shift_x"]})
    for k in keys:
        assert torch.equal(turned["meta"]["masks"][k], back["meta"]["masks"][k].flip(-1))


def test_masks_move_with_the_anatomy():
    ds = KneePhantom(n=10, resolution=32, seed=8, cache=False)
    base = ds.render(0, {"rotation": 0.0, "shift_x": 0.0, "shift_y": 0.0})
    moved = ds.render(0, {"rotation": 0.0, "shift_x": 0.0, "shift_y": 4 / 32})
    rows = lambda m: m.any(-1).nonzero().flatten().float().mean()  # noqa: E731
    js0, js1 = base["meta"]["masks"]["joint_space"], moved["meta"]["masks"]["joint_space"]
    assert abs(float(rows(js1) - rows(js0)) - 4.0) < 0.75


# --- class balance and the shortcut ------------------------------------------------------------


def test_binary_classes_are_balanced():
    ds = KneePhantom(n=400, resolution=16, seed=11, cache=False)
    share = np.mean([ds[i]["label"] for i in range(len(ds))])
    assert 0.35 <= share <= 0.65
    histo = HistologyPhantom(n=200, resolution=16, seed=11, cache=False)
    assert 0.35 <= np.mean([histo.params(i)[0]["tumour"] for i in range(len(histo))]) <= 0.65


def test_nuisance_does_not_track_disease():
    ds = KneePhantom(n=400, resolution=16, seed=12)
    factors = [ds.params(i)[0] for i in range(len(ds))]
    diseased = np.array([kl_grade(f) >= 2 for f in factors], dtype=float)
    for key in knee_mod.NUISANCE_FACTORS:
        values = np.array([f[key] for f in factors])
        assert abs(np.corrcoef(values, diseased)[0, 1]) < 0.15, key


def test_marker_places_cover_every_drawn_marker_and_little_else():
    knees = KneePhantom(n=60, resolution=32, seed=5, shortcut_rate=1.0, cache=False)
    places = knee_mod.marker_places(32)
    assert places.shape == (4, 32, 32) and places.sum(0).max() == 1  # four disjoint plates
    masks = [knees[i]["meta"]["masks"]["marker"].bool() for i in range(len(knees))]
    drawn = torch.stack([m for m in masks if m.any()])
    assert len(drawn) >= 10
    inside = (drawn[:, None] & ~places[None]).flatten(2).any(2) == 0  # [markers, plates]
    assert (inside.sum(1) == 1).all()  # every marker lies within exactly one plate
    assert set(inside.float().argmax(1).tolist()) == {0, 1, 2, 3}  # all four corners seen
    assert places.any(0).float().mean() < 0.1  # four plates, not the image


def test_shortcut_marker_rule():
    always = KneePhantom(n=150, resolution=16, seed=13, shortcut_rate=1.0, cache=False)
    for i in range(len(always)):
        s = always[i]
        assert s["meta"]["factors"]["marker"] == float(s["label"])
        assert bool(s["meta"]["masks"]["marker"].any()) == bool(s["label"])
    never = KneePhantom(n=400, resolution=16, seed=13, shortcut_rate=0.0)
    agree = [
        never.params(i)[0]["marker"] == float(kl_grade(never.params(i)[0]) >= 2)
        for i in range(len(never))
    ]
    assert 0.4 <= np.mean(agree) <= 0.6


def _disease_matrix(ds: KneePhantom) -> np.ndarray:
    return np.array(
        [[ds.params(i)[0][k] for k in knee_mod.DISEASE_FACTORS] for i in range(len(ds))]
    )


def test_decorrelate_takes_the_severity_apart_and_keeps_each_factor():
    n = 1500
    coupled = _disease_matrix(KneePhantom(n=n, resolution=16, seed=14))
    apart = _disease_matrix(KneePhantom(n=n, resolution=16, seed=14, decorrelate=1.0))
    half = _disease_matrix(KneePhantom(n=n, resolution=16, seed=14, decorrelate=0.5))
    jsw_m, ost, scl = 0, 2, 3
    r = {
        name: np.corrcoef(m[:, jsw_m], m[:, ost])[0, 1]
        for name, m in (("coupled", coupled), ("half", half), ("apart", apart))
    }
    assert r["coupled"] < -0.9  # one severity drives the joint space and the osteophyte
    assert abs(r["apart"]) < 0.08
    assert 0.15 < r["half"] / r["coupled"] < 0.4  # about (1 - q)^2 = 0.25
    assert abs(np.corrcoef(apart[:, ost], apart[:, scl])[0, 1]) < 0.08
    for j in range(coupled.shape[1]):  # each factor keeps its distribution
        assert abs(np.median(apart[:, j]) - np.median(coupled[:, j])) < 0.1 * coupled[:, j].std()
        assert abs(apart[:, j].std() / coupled[:, j].std() - 1) < 0.1
    # the two joint-space widths narrow together: they are exchanged as one group
    assert np.corrcoef(apart[:, 0], apart[:, 1])[0, 1] > 0.5


def test_decorrelate_zero_is_the_phantom_sample_for_sample():
    a = KneePhantom(n=20, resolution=16, seed=15, cache=False)
    b = KneePhantom(n=20, resolution=16, seed=15, cache=False, decorrelate=0.0)
    c = KneePhantom(n=20, resolution=16, seed=15, cache=False, decorrelate=1.0)
    assert all(_same(a[i], b[i]) for i in range(20))
    assert sum(_same(a[i], c[i]) for i in range(20)) < 5
    for i in range(20):  # the label follows the exchanged factors
        s = c[i]
        assert s["label"] == int(kl_grade(s["meta"]["factors"]) >= 2)


# --- locality: disease lives at the joint ----------------------------------------------------


def test_disease_signal_is_concentrated_at_the_joint():
    ds = KneePhantom(n=12, resolution=32, seed=14, cache=False)
    for i in range(6):
        anatomy = ds.params(i)[1]
        still = {"noise": 0.0, "marker": 0.0}
        healthy = ds.render(
            i,
            {
                **still,
                "jsw_medial": anatomy["jsw0_medial"],
                "jsw_lateral": anatomy["jsw0_lateral"],
                "osteophyte": 0.0,
                "sclerosis": 0.0,
                "deformity": 0.0,
            },
        )
        sick = ds.render(
            i,
            {
                **still,
                "jsw_medial": 0.01,
                "jsw_lateral": 0.03,
                "osteophyte": 0.1,
                "sclerosis": 1.0,
                "deformity": 1.0,
            },
        )
        assert healthy["label"] == 0 and sick["label"] == 1
        diff = (healthy["image"] - sick["image"]).abs()[0].numpy()
        joint = np.zeros(diff.shape, dtype=bool)
        for s in (healthy, sick):
            for k in ("joint_space", "osteophyte", "sclerosis"):
                joint |= s["meta"]["masks"][k].numpy()
        region = ndimage.binary_dilation(joint, iterations=2)
        assert region.mean() < 0.4  # the joint is a small part of the image...
        assert diff[region].sum() / diff.sum() > 0.9  # ...and holds the change
        # The change is large enough to see: several grey levels over many pixels.
        assert (diff > 0.1).sum() >= 20


def test_histology_tumour_is_local():
    ds = HistologyPhantom(n=20, resolution=32, seed=15, cache=False)
    i = next(j for j in range(20) if ds.params(j)[0]["tumour"] == 1.0)
    tumour = ds.render(i, {"noise": 0.0})
    normal = ds.render(i, {"noise": 0.0, "tumour": 0.0})
    assert normal["label"] == 0 and not normal["meta"]["masks"]["tumour"].any()
    diff = (tumour["image"] - normal["image"]).abs().sum(0).numpy()
    region = ndimage.binary_dilation(tumour["meta"]["masks"]["tumour"].numpy(), iterations=3)
    assert diff[region].sum() / diff.sum() > 0.9


def test_works_with_a_dataloader():
    ds = KneePhantom(n=4, resolution=16).materialise()
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16)
    assert batch["meta"]["masks"]["joint_space"].shape == (4, 16, 16)
