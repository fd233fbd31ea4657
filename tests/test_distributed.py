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
def test_two_process_generator_stage_computes_its_snapshot_metrics(tmp_path):
    # Rank 0 alone measures each snapshot (torchmetrics' FD among them) while rank 1 goes on to
    # the next step's gradient all-reduce: a metric that syncs across processes waits forever.
    run_train(smoke_train(tmp_path, "stages=[classifier,generator]", processes=2), timeout=240)
    art = Artifact.load(tmp_path / "knee" / "generator")
    assert art.info["processes"] == 2
    assert art.metrics["fd_classifier"] > 0
    assert (tmp_path / "knee" / "generator" / "G_ema.safetensors").is_file()
