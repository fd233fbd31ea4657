"""The smoke chain's results, pinned: a change that moves any trained weight or metric fails here.

Every stage of ``preset=smoke`` (``deterministic=true``, two threads) runs in a fresh
interpreter; the sha256 of the tensors of each ``*.safetensors`` file and every metric of each
``artifact.json`` are compared with ``tests/fixtures/smoke_golden.json``. Refactors keep them bit-identical. A change meant to alter
results regenerates the file on purpose, and its commit says why:

    python -m tests.test_golden --update

The digest pins a machine's kernels: another CPU model, instruction set or torch build may round
differently (two AVX-512 machines of different vendors gave different classifier weights; two
"AMD EPYC" machines of different generations, different generator weights), and a trained chain
amplifies the last bit. So the file keeps one digest per platform (torch build, CPU capability,
model name, family/model/stepping, vector instruction sets, threads). On a recorded platform the comparison is exact. On another, the
chain is trained twice in fresh interpreters and the two digests must be identical (the
``deterministic`` promise) and name the same metrics as the recorded ones; ``--update`` adds the
platform, after which it is compared exactly.
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
# /proc/cpuinfo flags that name the vector instructions oneDNN and ATen pick kernels by.
VECTOR_FLAGS = ("avx", "amx", "fma", "f16c", "sse", "ssse")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _platform() -> dict[str, str]:
    """What decides the kernels' rounding. A virtual machine's model name can be as vague as
    "AMD EPYC" for two generations whose AVX-512 kernels round differently (seen: the same
    classifier, another generator), so the CPU's family, model and stepping and its vector
    instruction sets count too."""
    import platform

    info = _cpuinfo()
    simd = sorted(f for f in info.get("flags", "").split() if f.startswith(VECTOR_FLAGS))
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": "-".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "simd": hashlib.sha256(" ".join(simd).encode()).hexdigest()[:12],
        "threads": str(THREADS),
    }


def platform_key(p: dict[str, str]) -> str:
    return " | ".join(f"{k}={p[k]}" for k in sorted(p))


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


def _assert_same(have: dict, want: dict, where: str) -> None:
    for stage in STAGES:
        a, b = have["stages"][stage], want["stages"][stage]
        assert a["weights"] == b["weights"], f"{stage}: weights differ{where}"
        # As JSON text: exact, and NaN equals NaN.
        assert json.dumps(a["metrics"], sort_keys=True) == json.dumps(
            b["metrics"], sort_keys=True
        ), f"{stage}: metrics differ{where}"


@pytest.mark.slow
def test_smoke_chain_matches_the_golden_digest(tmp_path):
    recorded = json.loads(GOLDEN.read_text())["platforms"]
    got = smoke_digest(tmp_path / "runs")
    key = platform_key(got["platform"])
    if key in recorded:
        _assert_same(got, recorded[key], "")
        return
    # Not recorded here: the chain must still be deterministic, and write what it always wrote.
    again = smoke_digest(tmp_path / "again")
    _assert_same(got, again, f" between two runs on {key} (no golden recorded for it)")
    some = next(iter(recorded.values()))
    for stage in STAGES:
        assert sorted(got["stages"][stage]["metrics"]) == sorted(some["stages"][stage]["metrics"])
        assert sorted(got["stages"][stage]["weights"]) == sorted(some["stages"][stage]["weights"])


if __name__ == "__main__":
    # --update: results changed on purpose; this platform's digest replaces every recorded one.
    # --add-platform: results unchanged; this platform's digest joins the recorded ones.
    if sys.argv[1:] not in (["--update"], ["--add-platform"]):
        sys.exit("usage: python -m tests.test_golden --update | --add-platform")
    with tempfile.TemporaryDirectory() as tmp:
        digest = smoke_digest(Path(tmp) / "runs")
    key = platform_key(digest["platform"])
    keep = sys.argv[1] == "--add-platform" and GOLDEN.is_file()
    platforms = json.loads(GOLDEN.read_text())["platforms"] if keep else {}
    platforms[key] = digest
    GOLDEN.write_text(json.dumps({"platforms": platforms}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(platforms)} platform(s), now with {key}")
