"""The smoke chain's results, pinned: a change that moves any trained weight or metric fails here.

Every stage of ``preset=smoke`` (``deterministic=true``, two threads) runs in a fresh
interpreter; the sha256 of the tensors of each ``*.safetensors`` file and every metric of each
``artifact.json`` are compared with ``tests/fixtures/smoke_golden.json``. Refactors keep them bit-identical. A change meant to alter
results regenerates the file on purpose, and its commit says why:

    python -m tests.test_golden --update

The digest pins this machine's kernels: another CPU instruction set or torch build may round
differently. The file records both, and a mismatch of those is named in the failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, smoke_train

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "smoke_golden.json"
STAGES = ("classifier", "generator", "encoder", "normative", "direction", "guard", "segmentation")
# Metrics that measure the machine, not the result.
THREADS = 2
TIMING = ("seconds", "s_per_kimg", "s_per_step", "img_per_s", "minutes")


def _platform() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": str(THREADS),
    }


def _metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def tensor_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes). Not of the file:
    the safetensors writer orders its metadata header differently from run to run."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def smoke_digest(runs: Path) -> dict:
    """Train every stage of the smoke chain into ``runs``; the digest of what it wrote."""
    cmd = smoke_train(runs, f"stages=[{','.join(STAGES)}]", "deterministic=true")
    # A CPU reduction's rounding depends on how many threads share it: the digest fixes two.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    digest: dict = {"platform": _platform(), "stages": {}}
    for stage in STAGES:
        folder = runs / "knee" / stage
        art = json.loads((folder / "artifact.json").read_text())
        weights = {p.name: tensor_digest(p) for p in sorted(folder.glob("*.safetensors"))}
        digest["stages"][stage] = {"weights": weights, "metrics": _metrics(art["metrics"])}
    return digest


@pytest.mark.slow
def test_smoke_chain_matches_the_golden_digest(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = smoke_digest(tmp_path / "runs")
    where = (
        ""
        if got["platform"] == golden["platform"]
        else f" (recorded on {golden['platform']}, running on {got['platform']})"
    )
    for stage in STAGES:
        want, have = golden["stages"][stage], got["stages"][stage]
        assert have["weights"] == want["weights"], f"{stage}: weights differ{where}"
        # As JSON text: exact, and NaN equals NaN.
        assert json.dumps(have["metrics"], sort_keys=True) == json.dumps(
            want["metrics"], sort_keys=True
        ), f"{stage}: metrics differ{where}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update")
    with tempfile.TemporaryDirectory() as tmp:
        digest = smoke_digest(Path(tmp) / "runs")
    GOLDEN.write_text(json.dumps(digest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
