"""A gallery appears whole or not at all: explain builds it in a hidden partial folder and swaps
it in at the end, so a killed run leaves no half page and a rerun replaces an older gallery."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT
from tests.explain.test_command import classifier_run  # noqa: F401 (fixture)


def _explain(run: Path, out: Path, limit: int) -> list[str]:
    return [
        sys.executable, "-m", "cfexplain.explain", f"run={run}", f"out={out}", f"limit={limit}",
        "batch_size=1", "methods=[gradcam,occlusion]", "logger=none", "device=cpu",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _gallery(out: Path) -> tuple[int, int, int]:
    """(image folders, metrics.csv rows, summary's image count) of a finished gallery."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    return len(list((out / "images").iterdir())), len(rows), summary["images"]


def test_killed_explain_then_a_smaller_rerun_gives_one_consistent_gallery(
    classifier_run,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "g"
    partial = tmp_path / ".g.partial"
    proc = subprocess.Popen(
        _explain(classifier_run, out, 40),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (partial / "images" / "00002").is_dir() and proc.poll() is None:
        assert time.time() < deadline, "explain never got going"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "explain finished before it could be killed"
    assert not out.exists(), "a killed explain must leave no gallery where the user looks"
    assert partial.is_dir()

    r = subprocess.run(_explain(classifier_run, out, 2), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _gallery(out) == (2, 2, 2)
    assert not partial.exists()


def test_a_rerun_into_the_same_out_replaces_the_older_gallery_whole(
    classifier_run,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "g"
    for limit in (4, 2):
        r = subprocess.run(
            _explain(classifier_run, out, limit), env=_env(), capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert _gallery(out) == (limit, limit, limit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # nothing left beside it


def test_the_evaluation_links_only_complete_galleries(classifier_run, tmp_path):  # noqa: F811
    from cfexplain.evaluate.__main__ import latest_gallery
    from cfexplain.runs import TrainedRun

    run = TrainedRun(classifier_run)
    galleries = run.output_dir("explain")
    for name, files in (
        ("20260101-000000", ["index.html", "summary.json"]),  # complete, oldest
        ("20260102-000000", ["index.html"]),  # killed before its summary (an old-style folder)
        (".20260103-000000.partial", ["index.html", "summary.json"]),  # being written
    ):
        (galleries / name).mkdir(parents=True)
        for f in files:
            (galleries / name / f).write_text("x")
            time.sleep(0.01)
    out = classifier_run / "evaluation"
    assert latest_gallery(run, out) == os.path.join(
        "..", "explain", "20260101-000000", "index.html"
    )
