"""Shared fixtures: the real Hydra config, shrunk by the smoke preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
