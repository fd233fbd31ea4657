"""Concept annotations: derived from the factors, 0.5 at the clinical thresholds, in every sample."""

from __future__ import annotations

import numpy as np
import pytest

from cfexplain.data.concepts import (
    HISTOLOGY_CONCEPTS,
    KNEE_CONCEPTS,
    PRESENT,
    attribute_metrics,
    concept_targets,
    histology_concepts,
    knee_concepts,
)
from cfexplain.data.phantoms import HistologyPhantom, KneePhantom
from cfexplain.data.phantoms import knee as K

HEALTHY = {
    "jsw_medial": 0.07,
    "jsw_lateral": 0.07,
    "osteophyte": 0.0,
    "sclerosis": 0.0,
    "deformity": 0.0,
}


def test_knee_concepts_are_definite_exactly_at_the_kl_thresholds():
    assert knee_concepts(HEALTHY) == dict.fromkeys(KNEE_CONCEPTS, 0.0)
    at = knee_concepts(
        {
            "jsw_medial": K.JSW_DEFINITE,
            "jsw_lateral": K.JSW_DEFINITE,
            "osteophyte": K.OST_DEFINITE,
            "sclerosis": K.SCL_SOME,
            "deformity": K.DEF_PRESENT,
        }
    )
    assert all(v == pytest.approx(PRESENT) for v in at.values()), at
    worst = knee_concepts(
        {"jsw_medial": 0.0, "jsw_lateral": 0.0, "osteophyte": 0.2, "sclerosis": 1, "deformity": 1}
    )
    assert worst == dict.fromkeys(KNEE_CONCEPTS, 1.0)
    # graded: more disease, a higher reading, never outside [0, 1]
    widths = np.linspace(0.09, 0.0, 40)
    grades = [knee_concepts({**HEALTHY, "jsw_medial": w})["narrowing_medial"] for w in widths]
    assert all(b >= a for a, b in zip(grades, grades[1:])) and 0 <= min(grades) <= max(grades) <= 1


def test_a_definite_osteophyte_is_what_makes_kl2():
    ds = KneePhantom(60, resolution=16, split="val")
    for i in range(len(ds)):
        meta = ds[i]["meta"]
        assert meta["concepts"] == knee_concepts(meta["factors"])
        assert (meta["concepts"]["osteophytes"] >= PRESENT) == (meta["grade"] >= 2)


def test_histology_concepts_separate_tumour_from_normal_tiles():
    ds = HistologyPhantom(40, resolution=16, split="val")
    for i in range(len(ds)):
        s = ds[i]
        c = s["meta"]["concepts"]
        assert list(c) == list(HISTOLOGY_CONCEPTS) and c == histology_concepts(s["meta"]["factors"])
        assert all((v >= PRESENT) == bool(s["label"]) for v in c.values()), (s["label"], c)


def test_targets_name_the_sample_and_concept_that_is_missing():
    metas = [{"concepts": {"a": 0.2, "b": 1.0}}, {"concepts": {"a": 0.5}, "path": "x.png"}]
    assert concept_targets(metas[:1], ["b", "a"]).tolist() == [[1.0, pytest.approx(0.2)]]
    with pytest.raises(ValueError, match=r"x.png: no concept 'b'"):
        concept_targets(metas, ["a", "b"])
    with pytest.raises(ValueError, match=r"sample 7: no concept annotations"):
        concept_targets([{"index": 7}], ["a"])


def test_attribute_metrics_binarise_the_truth_at_present():
    truth = np.array([[0.0, 0.1], [0.4, 0.2], [0.5, 0.3], [0.9, 0.4]])
    pred = np.array([[0.1, 0.0], [0.2, 0.1], [0.6, 0.0], [0.7, 0.2]])
    m = attribute_metrics(pred, truth, ["x", "y"])
    assert m["x/auc"] == 1.0 and m["x/mae"] == pytest.approx(0.15)
    assert np.isnan(m["y/auc"])  # no "present" y in the split
    assert m["auc"] == 1.0 and m["mae"] == pytest.approx((0.15 + 0.175) / 2)
