"""What the commands (explain, evaluate, inspect, sensitivity, attributes, study, train) share
at their edge: one error type for a config that cannot run, the checks of the values many of
them take (counts, ``limit=``, ``target=``), and one way to report the user's mistakes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config (training or command) cannot run; the message names the field."""


def whole_number(field: str, value: Any, low: int = 1) -> int:
    """``value`` as an int >= ``low``; ``ConfigError`` naming ``field`` otherwise."""
    whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not whole or value < low:
        shown = "null" if value is None else repr(value)
        raise ConfigError(f"{field}={shown}: expected an integer >= {low}")
    return int(value)


def image_limit(value: Any, *, null_means: str = "all") -> int | None:
    """``limit=``, the number of images a command takes: an int >= 1, or None for null, which
    stands for ``null_means``."""
    if value is None:
        return None
    try:
        return whole_number("limit", value)
    except ConfigError as e:
        raise ConfigError(f"{e}, or null ({null_means})") from None


def image_count(value: Any, available: int) -> int:
    """How many of ``available`` images ``limit=`` takes (all when it is null)."""
    limit = image_limit(value)
    return available if limit is None else min(limit, available)


def class_index(target: Any, classes: Sequence[str]) -> int:
    """``target=``: a class index, or a class's name, as the index; ``ConfigError`` naming the
    classes otherwise."""
    names = [str(c) for c in classes]
    if isinstance(target, str) and target in names:
        return names.index(target)
    whole = isinstance(target, int) and not isinstance(target, bool)
    if not whole or not 0 <= target < len(names):
        raise ConfigError(
            f"target={target}: expected a class index (0 to {len(names) - 1}) or name; "
            f"the classifier's classes are {names}"
        )
    return target


@contextmanager
def user_errors(command: str) -> Iterator[None]:
    """The one error boundary of every entry point. Errors about the user's input (config,
    files, artifacts) print one line ``cfexplain.<command>: <message>`` without a traceback
    and exit 2; anything else is a bug and keeps its traceback."""
    from cfexplain.data.readers import DataError
    from cfexplain.utils.artifacts import ArtifactError

    try:
        yield
    except (ConfigError, DataError, ArtifactError, FileNotFoundError) as e:
        print(f"cfexplain.{command}: {e}", file=sys.stderr)
        sys.exit(2)


def run_command(
    command: str, fn: Callable[[DictConfig], Path], cfg: DictConfig, label: str
) -> None:
    """``fn(cfg)`` inside :func:`user_errors`, then ``label: <path it returned>``."""
    with user_errors(command):
        path = fn(cfg)
    print(f"{label}: {path}")


@contextmanager
def tracked(command: str, out: Path, cfg: DictConfig, experiment: str) -> Iterator[Any]:
    """The tracking :class:`~cfexplain.utils.tracking.Run` of a command writing into ``out``,
    finished when the block ends (with exit code 1 when it raised)."""
    from omegaconf import OmegaConf

    from cfexplain.utils.tracking import Run

    run = Run(
        command,
        out,
        logger=OmegaConf.to_container(cfg.logger, resolve=True),
        config=OmegaConf.to_container(cfg, resolve=True),
        experiment=experiment,
    )
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
