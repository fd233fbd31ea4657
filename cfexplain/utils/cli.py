"""What the commands (explain, evaluate, inspect, sensitivity) share at their edge: one error
type for a config that cannot run, and one way to report the user's mistakes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A command's config cannot run; the message names the field."""


def run_command(
    command: str, fn: Callable[[DictConfig], Path], cfg: DictConfig, label: str
) -> None:
    """``fn(cfg)``, then ``label: <path it returned>``. Errors about the user's input (config,
    files, artifacts) print one line without a traceback and exit 2; anything else is a bug
    and keeps its traceback."""
    from cfexplain.data.readers import DataError
    from cfexplain.utils.artifacts import ArtifactError

    try:
        path = fn(cfg)
    except (ConfigError, DataError, ArtifactError, FileNotFoundError) as e:
        print(f"cfexplain.{command}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{label}: {path}")
