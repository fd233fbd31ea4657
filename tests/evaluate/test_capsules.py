"""``python -m cfexplain.evaluate`` on a capsule run: attribute MAE and AUC, diagnosis AUC."""

from __future__ import annotations

import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cfexplain.data.concepts import PRESENT
from cfexplain.evaluate.__main__ import evaluate
from cfexplain.evaluate.pipeline import concept_summary
from cfexplain.nn.capsules import CapsuleClassifier
from tests.evaluate.test_command import TINY, evaluate_cfg
from tests.explain.test_capsules import NAMES, capsule_run  # noqa: F401 (fixture)
from tests.explain.test_command import classifier_run, full_run  # noqa: F401 (fixtures)


def test_evaluation_page_has_attribute_and_diagnosis_aucs(capsule_run, full_run):  # noqa: F811
    index = evaluate(
        evaluate_cfg(f"run={capsule_run}", "methods=[gradcam]", f"baseline={full_run}", *TINY)
    )
    summary = json.loads((index.parent / "summary.json").read_text())
    c = summary["concepts"]
    assert c["attributes"] == NAMES and set(c["per_attribute"]) == set(NAMES)
    for m in c["per_attribute"].values():
        assert 0 <= m["mae"] <= 1 and 0 <= m["present"] <= 1
    assert 0 <= c["diagnosis_auc"] <= 1 and 0 <= c["baseline_diagnosis_auc"] <= 1
    page = index.read_text()
    assert "Concept capsules" in page and "osteophytes" in page and "diagnosis AUC" in page


def test_concept_summary_against_a_hand_computed_auc():
    torch.manual_seed(0)
    net = CapsuleClassifier(resolution=16, attributes=["a", "b"], width=4, types=2).eval()
    x = torch.rand(12, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        read = net.attribute_values(x).numpy()
        p = torch.softmax(net(x), 1)[:, 1].numpy()
    truth = np.stack([np.linspace(0, 1, 12), np.full(12, 0.2)], 1)
    data = {
        "x": x,
        "labels": torch.tensor([0, 1] * 6),
        "concepts": [{"a": float(t[0]), "b": float(t[1])} for t in truth],
    }
    c = concept_summary(net, data, 1, torch.device("cpu"), batch=5)
    assert c["per_attribute"]["a"]["auc"] == roc_auc_score(truth[:, 0] >= PRESENT, read[:, 0])
    assert np.isnan(c["per_attribute"]["b"]["auc"])  # no "b" present in these images
    assert c["per_attribute"]["b"]["mae"] == np.abs(read[:, 1] - 0.2).mean().astype(float)
    assert c["diagnosis_auc"] == roc_auc_score(data["labels"].numpy(), p)
