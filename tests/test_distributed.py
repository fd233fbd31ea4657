"""The training loop runs unchanged under torchrun: two gloo processes, one artifact."""

from __future__ import annotations

import pytest

from cfexplain.utils.artifacts import Artifact
from tests.conftest import run_train, smoke_train


@pytest.mark.slow
def test_two_process_gloo_run_writes_one_artifact(tmp_path):
    r = run_train(smoke_train(tmp_path, "stages=[classifier]", processes=2))
    art = Artifact.load(tmp_path / "knee" / "classifier")
    assert art.info["processes"] == 2
    assert (
        r.stdout.count("── classifier finished") + r.stderr.count("── classifier finished") == 1
    )  # rank 0 alone reports
    stage_dirs = sorted(p.name for p in (tmp_path / "knee").iterdir() if p.name != "logs")
    assert stage_dirs == ["classifier"]
    assert (tmp_path / "knee" / "classifier" / "classifier.safetensors").is_file()
    steps = [
        line for line in (tmp_path / "knee" / "classifier" / "log.jsonl").read_text().splitlines()
    ]
    assert steps, "rank 0 logged nothing"


@pytest.mark.slow
def test_two_process_chain_runs_every_stage(tmp_path):
    # Rank 0 alone measures each generator snapshot (torchmetrics' FD among them) while rank 1
    # goes on to the next step's gradient all-reduce: a metric that syncs across processes
    # waits forever. Every later stage must get through as well.
    run_train(smoke_train(tmp_path, processes=2), timeout=240)
    stages = ["classifier", "generator", "encoder", "normative", "direction", "guard"]
    arts = {stage: Artifact.load(tmp_path / "knee" / stage) for stage in stages}
    assert arts["generator"].info["processes"] == 2
    assert arts["generator"].metrics["fd_classifier"] > 0
    assert sorted(p.name for p in (tmp_path / "knee").iterdir() if p.name != "logs") == sorted(
        stages
    )  # no .partial folder left behind
