"""What the commands (explain, evaluate, inspect, sensitivity, attributes, study, train) share
at their edge: one error type for a config that cannot run, the checks of the values many of
them take (counts, ``limit=``, ``target=``), and one way to report the user's mistakes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config (training or command) cannot run; the message names the field."""


_ABSENT = object()


def shown(value: Any) -> str:
    """A config value in an error message, as Hydra's syntax writes it (strings quoted)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Number:
    """A numeric config value: where it is (a dotted path), its kind (``int`` or ``float``),
    its bounds, and whether null may stand in for it."""

    path: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    above: bool = False  # low is exclusive
    null: bool = False


POSITIVE_INT: dict[str, Any] = {"kind": int, "low": 1}
SHARE: dict[str, Any] = {"low": 0.0, "high": 1.0}


def numbers_under(section: str, *fields: Number) -> tuple[Number, ...]:
    """``fields`` with their paths under ``section``."""
    return tuple(replace(f, path=f"{section}.{f.path}") for f in fields)


def number(field: Number, value: Any) -> Any:
    """``value`` if it is a number of ``field``'s kind and range (an int for a whole float;
    None where ``field.null``); ``ConfigError`` naming the field and what it takes otherwise."""
    if value is None and field.null:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and field.kind is int:
        ok = isinstance(value, int) or value.is_integer()
    if ok and field.low is not None:
        ok = value > field.low if field.above else value >= field.low
    if ok and field.high is not None:
        ok = value <= field.high
    if not ok:
        what = ["an integer" if field.kind is int else "a number"]
        if field.low is not None:
            what.append(f"{'>' if field.above else '>='} {field.low:g}")
        if field.high is not None:
            what.append(f"{'and ' if field.low is not None else ''}<= {field.high:g}")
        also = ", or null" if field.null else ""
        raise ConfigError(f"{field.path}={shown(value)}: expected {' '.join(what)}{also}")
    return int(value) if field.kind is int else value


def check_number(cfg: DictConfig, field: Number) -> None:
    """:func:`number` on ``field``'s value in ``cfg``; a path ``cfg`` lacks is not checked."""
    value = OmegaConf.select(cfg, field.path, default=_ABSENT)
    if value is not _ABSENT:
        number(field, value)


def whole_number(field: str, value: Any, low: int = 1) -> int:
    """``value`` as an int >= ``low``; ``ConfigError`` naming ``field`` otherwise."""
    return number(Number(field, int, low), value)


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


# Fields whose default's type is not the only one they take: checked by their commands.
ANY_TYPE = frozenset({"target"})  # a class index or its name
# Fields null by default that take a list of names when set (a bare name would be read letter
# by letter).
NULL_OR_LIST = frozenset(
    {"layers", "randomisation.layers", "classes", "data.classes", "segmentation.classes"}
)


def check_types(cfg: DictConfig, keys: Sequence[str], defaults: DictConfig) -> None:
    """Each of ``keys`` (the fields the user set) against the type of its default: a number
    where the default is one, true/false for a flag, a list for a list, a mapping for a
    mapping; ``ConfigError`` naming the field otherwise. A null value, strings and
    ``ANY_TYPE`` are left to the command, and so is a field that is null by default (off
    until set) unless ``NULL_OR_LIST`` says it takes a list."""
    for key in keys:
        if key in ANY_TYPE:
            continue
        default = OmegaConf.select(defaults, key, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if default is None and key in NULL_OR_LIST:
            default = ListConfig([])
        if default is None or value is None or isinstance(default, str):
            continue
        if isinstance(default, bool):
            ok, what = isinstance(value, bool), "true or false"
        elif isinstance(default, int | float):
            ok, what = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        elif isinstance(default, ListConfig):
            ok, what = isinstance(value, ListConfig), f"a list, e.g. {key}=[{value}]"
        elif isinstance(default, DictConfig):
            ok, what = isinstance(value, DictConfig), f"a mapping, e.g. {key}={{name: value}}"
        else:
            continue
        if not ok:
            raise ConfigError(f"{key}={shown(value)}: expected {what}")


def check_overrides(cfg: DictConfig) -> None:
    """:func:`check_types` on the command line's ``key=value`` overrides, against the defaults
    Hydra composes without them (the same config groups chosen); nothing outside a Hydra app."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    choices = set(hc.runtime.choices)
    keys, structural = [], []
    for o in OverridesParser.create().parse_overrides(list(hc.overrides.task)):
        group = o.is_delete() or o.package is not None or o.key_or_group in choices
        if group or o.key_or_group.startswith("hydra."):
            structural.append(o.input_line)
        else:
            keys.append(o.key_or_group)
    if keys:
        check_types(cfg, keys, compose(config_name=hc.job.config_name, overrides=structural))


def run_command(
    command: str, fn: Callable[[DictConfig], Path], cfg: DictConfig, label: str
) -> None:
    """``fn(cfg)`` inside :func:`user_errors`, its overrides' types checked first; then
    ``label: <path it returned>``."""
    with user_errors(command):
        check_overrides(cfg)
        path = fn(cfg)
    print(f"{label}: {path}")


@contextmanager
def tracked(command: str, out: Path, cfg: DictConfig, experiment: str) -> Iterator[Any]:
    """The tracking :class:`~cfexplain.utils.tracking.Run` of a command writing into ``out``,
    finished when the block ends (with exit code 1 when it raised)."""
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
