"""Scoring: textbook statistics, planted accuracies, refusal of answers of another study."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from cfexplain.study.score import (
    analyse,
    clopper_pearson,
    fleiss_kappa,
    load_answers,
    load_key,
    proportion,
)
from cfexplain.utils.cli import ConfigError
from tests.study.conftest import make_study, simulated_answers

# Fleiss (1971) as Wikipedia's "Fleiss' kappa" article works it: 10 subjects, 14 raters,
# 5 categories; P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook_example():
    assert round(fleiss_kappa(np.array(FLEISS_TABLE)), 3) == 0.210
    # perfect agreement is 1; every item split evenly between two raters is -1
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[1, 1], [1, 1]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_clopper_pearson_textbook_values():
    # 3 of 10: the exact interval every table gives, (0.0667, 0.6525)
    lo, hi = clopper_pearson(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.0667, 0.6525)
    # the closed forms at the edges: 0 of n -> [0, 1 - (a/2)^(1/n)], n of n -> [(a/2)^(1/n), 1]
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    # symmetry: k of n mirrors n-k of n
    lo, hi = clopper_pearson(29, 50)
    lo2, hi2 = clopper_pearson(21, 50)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    assert proportion(6, 8)["accuracy"] == 0.75


@pytest.fixture(scope="module")
def small_study(study_run, tmp_path_factory):
    return make_study(study_run, tmp_path_factory.mktemp("s") / "study", readers=3)


def _write(tmp_path, answers: dict, name: str):
    path = tmp_path / name
    path.write_text(json.dumps(answers))
    return path


def test_planted_accuracies_kappa_and_likert(small_study, tmp_path):
    key = load_key(small_study)
    files = [
        _write(tmp_path, simulated_answers(key, r, right), f"r{r}.json")
        for r, right in enumerate((5, 8, 2))
    ]
    res = analyse(key, load_answers(files, key), published=0.58, bins=2)
    assert [r["accuracy"] for r in res["readers"]] == [5 / 8, 8 / 8, 2 / 8]
    assert (res["pooled"]["correct"], res["pooled"]["n"]) == (15, 24)
    assert res["readers"][1]["sensitivity"] == 1.0 and res["readers"][1]["ci_high"] == 1.0
    # per class and per realism bin, every answer is counted once
    assert sum(r["n"] for r in res["by_class"]) == 24
    assert sum(r["n"] for r in res["by_realism"]) == 24
    assert res["agreement"]["items"] == 8 and res["agreement"]["readers"] == 3
    assert -1 <= res["agreement"]["fleiss_kappa"] <= 1
    plausible = res["likert"][0]
    assert (plausible["4"], plausible["n"], plausible["mean"]) == (6, 6, 4.0)
    assert res["pooled"]["p_chance"] == pytest.approx(
        binomtest(15, 24, 0.5, alternative="greater").pvalue
    )


def test_answers_of_another_study_are_refused(small_study, tmp_path):
    key = load_key(small_study)
    other = simulated_answers(key, 0, 4)
    other["study"] = "0123456789abcdef"
    path = _write(tmp_path, other, "other.json")
    with pytest.raises(ConfigError, match=r"other\.json: answers of study 0123456789abcdef"):
        load_answers([path], key)
    # a key rebuilt with another seed is another study: its answers do not fit this one
    rebuilt = load_key(make_study(key["run"], tmp_path / "rebuilt", seed=4))
    assert rebuilt["study_id"] != key["study_id"]
    path = _write(tmp_path, simulated_answers(rebuilt, 0, 4), "rebuilt.json")
    with pytest.raises(ConfigError, match="rebuilt.json: answers of study"):
        load_answers([path], key)
    # a second file of one reader, an unknown item, a file that is not answers
    a = _write(tmp_path, simulated_answers(key, 0, 4), "a.json")
    b = _write(tmp_path, simulated_answers(key, 0, 3), "b.json")
    with pytest.raises(ConfigError, match="b.json: a second file for reader-1"):
        load_answers([a, b], key)
    bad = simulated_answers(key, 1, 4)
    bad["turing"][0]["item"] = "ffffffffffff"
    with pytest.raises(ConfigError, match="is not in the key"):
        load_answers([_write(tmp_path, bad, "bad.json")], key)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="junk.json: not a readable answers file"):
        load_answers([tmp_path / "junk.json"], key)
