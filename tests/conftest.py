"""Shared fixtures: the real Hydra config, shrunk by the smoke preset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]


def compose_config(*overrides: str) -> DictConfig:
    """The training config as ``python -m cfexplain.train`` composes it."""
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def smoke_chain(runs: Path, *overrides: str) -> Path:
    """Train the knee smoke chain (``overrides`` on top) into ``runs``; return ``runs/knee``."""
    from cfexplain.train import run_chain

    run_chain(
        compose_config(
            "+dataset=knee",
            "preset=smoke",
            "logger=none",
            f"runs_dir={runs}",
            "device=cpu",
            *overrides,
        )  # fmt: skip
    )
    return runs / "knee"


@pytest.fixture
def smoke_cfg(tmp_path):
    """``+dataset=knee preset=smoke logger=none`` writing into a temporary runs folder."""

    def make(*overrides: str, dataset: str = "knee") -> DictConfig:
        return compose_config(
            f"+dataset={dataset}",
            "preset=smoke",
            "logger=none",
            f"runs_dir={tmp_path / 'runs'}",
            "device=cpu",
            *overrides,
        )

    return make


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a fresh interpreter, capturing output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_train(runs: Path, *overrides: str, processes: int = 1) -> list[str]:
    """The command line of ``python -m cfexplain.train`` on the knee smoke preset into ``runs``.

    ``processes > 1`` runs it under ``torchrun --standalone`` (gloo on CPU).
    """
    launcher = (
        ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
        if processes > 1
        else []
    )
    return [
        sys.executable,
        "-m",
        *launcher,
        "cfexplain.train",
        "+dataset=knee",
        "preset=smoke",
        "logger=none",
        "device=cpu",
        f"runs_dir={runs}",
        *overrides,
    ]


def run_train(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a ``smoke_train`` command to the end; fail with the tail of its output if it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def kill_when(cmd: list[str], ready: Callable[[], bool], settle: float = 0.0) -> None:
    """Start ``cmd`` and SIGKILL it once ``ready()`` holds (plus ``settle`` seconds).

    Fails when the run finished before it could be killed: the test would then prove nothing.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"


def killed_and_resumed(tmp_path: Path, stage: str, steps: int) -> tuple[Any, Any]:
    """Train the knee smoke ``stage`` for ``steps`` steps (``<stage>.steps``, a checkpoint every
    2) once to the end, and once killed mid-run then resumed; their artifacts ``(ref, resumed)``,
    the resumed one checked to have resumed mid-run and to hold the reference's weights."""
    import torch
    from safetensors.torch import load_file

    from cfexplain.utils.artifacts import Artifact, torch_load

    def cmd(runs: Path) -> list[str]:
        return smoke_train(
            runs, f"stages=[{stage}]", f"{stage}.steps={steps}", "checkpoint_every=2"
        )

    def mid_run(state_file: Path) -> bool:
        try:
            return 0 < torch_load(state_file)["loop"]["step"] < steps
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            return False

    run_train(cmd(tmp_path / "ref"))
    runs = tmp_path / "killed"
    state = runs / "knee" / f".{stage}.partial" / "state.pt"
    kill_when(cmd(runs), lambda: mid_run(state))
    assert not (runs / "knee" / stage).exists()
    run_train(cmd(runs))
    art = Artifact.load(runs / "knee" / stage)
    assert 0 < art.info["resumed_from_step"] < steps
    ref = Artifact.load(tmp_path / "ref" / "knee" / stage)
    a, b = load_file(str(ref.path("weights"))), load_file(str(art.path("weights")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return ref, art
