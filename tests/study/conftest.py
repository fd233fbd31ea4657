"""A smoke run with the stages a study reads (classifier, generator, encoder, direction), trained
once per test session, and a simulated reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cfexplain.study.build import build_study
from cfexplain.study.page import ANSWERS_FORMAT
from tests.conftest import smoke_chain

SMALL = dict(readers=2, n_real=4, n_fake=4, n_cf=2, seed=3, target=1, batch_size=8, device="cpu")


@pytest.fixture(scope="session")
def study_run(tmp_path_factory) -> Path:
    """``runs/knee`` of the smoke chain without the normative stage (~20 s)."""
    runs = tmp_path_factory.mktemp("study_runs")
    return smoke_chain(runs, "stages=[classifier,generator,encoder,direction]")


def make_study(run: Path, out: Path, **overrides: Any) -> Path:
    """A small study of ``run`` in ``out`` (SMALL, changed by ``overrides``)."""
    return build_study(run, out, **{**SMALL, **overrides})


def simulated_answers(key: dict, reader: int, right: int) -> dict[str, Any]:
    """The answers file of reader ``reader`` (0-based) who gets the first ``right`` Turing items
    of their order right and the rest wrong, and rates every counterfactual (4, 2, 5)."""
    plan = key["readers"][reader]
    flip = {"real": "generated", "generated": "real"}
    turing = []
    for i, e in enumerate(plan["turing"]):
        truth = key["items"][e["item"]]["truth"]
        said = truth if i < right else flip[truth]
        turing.append(
            {"order": i + 1, "item": e["token"], "answer": said, "confidence": 3, "ms": 900}
        )
    cf = [
        {
            "order": i + 1,
            "item": e["token"],
            "plausible": 4,
            "explains": 2,
            "identity": 5,
            "comment": "",
            "ms": 2000,
        }
        for i, e in enumerate(plan["counterfactual"])
    ]
    return {
        "format": ANSWERS_FORMAT,
        "study": key["study_id"],
        "reader": plan["reader"],
        "finished": True,
        "turing": turing,
        "counterfactual": cf,
    }
