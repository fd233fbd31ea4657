"""Artifacts are data, not code: JSON, safetensors and weights-only torch state.

A finished stage lives in ``runs/<experiment>/<stage>/`` with ``artifact.json``; while it trains
it lives in ``runs/<experiment>/.<stage>.partial/`` so a crash never touches a finished stage.
Every write goes to a temporary file in the same folder and is renamed into place.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

ARTIFACT_FILE = "artifact.json"
STATE_FILE = "state.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(RuntimeError):
    """A stage folder is missing, unfinished or does not hold what was expected."""


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: a
    crash leaves the old file (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(
        tmp, 0o666 & ~_UMASK
    )  # mkstemp makes 0600 files; artifacts are as readable as any other file
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (an encoded PNG, GIF, ...)."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically; load it back with :func:`torch_load`."""
    return atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def torch_load(path: str | Path) -> Any:
    """Load a state file written by :func:`torch_save`: tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(path: str | Path) -> Any | None:
    """A resumable ``state.pt`` written by :func:`torch_save`, or None when there is none."""
    path = Path(path)
    return torch_load(path) if path.is_file() else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- fingerprints


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able structure (dict order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- weights


def save_model(
    path: str | Path, module: torch.nn.Module, target: str, kwargs: Mapping[str, Any]
) -> Path:
    """Save weights as safetensors with the class path and constructor kwargs in its metadata.

    The file alone rebuilds the module (:func:`load_model`), without Hydra and without pickle.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"target": target, "kwargs": json.dumps(dict(kwargs), default=_json_default)}
    return atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def read_model_meta(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The ``(target, kwargs)`` stored by :func:`save_model`."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "target" not in meta or "kwargs" not in meta:
        raise ArtifactError(
            f"{path}: no 'target'/'kwargs' metadata; not written by cfexplain.save_model"
        )
    return meta["target"], json.loads(meta["kwargs"])


def import_target(target: str) -> Any:
    """Import ``package.module.Name``; the error names the path that failed."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ImportError(f"'{target}' is not a dotted path of the form module.Class")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import '{target}': {e}") from e


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a module saved by :func:`save_model` and load its weights (eval mode)."""
    target, kwargs = read_model_meta(path)
    module = import_target(target)(**kwargs)
    module.load_state_dict(load_file(str(path), device=str(map_location)))
    return module.to(map_location).eval()


# ----------------------------------------------------------------------------- stage folders


@dataclass
class Artifact:
    """What a finished stage says about itself; ``artifact.json`` is this, as JSON."""

    stage: str
    dir: Path
    fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    status: str = "complete"
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    versions: dict[str, str] = field(default_factory=lambda: _versions())

    def path(self, name: str) -> Path:
        """Absolute path of one of the artifact's files, by its key in ``files``."""
        if name not in self.files:
            raise ArtifactError(
                f"{self.dir / ARTIFACT_FILE}: no file '{name}' (has {sorted(self.files)})"
            )
        return self.dir / self.files[name]

    def write(self) -> Path:
        d = asdict(self)
        d.pop("dir")
        return write_json(self.dir / ARTIFACT_FILE, d)

    @classmethod
    def load(cls, stage_dir: str | Path) -> Artifact:
        stage_dir = Path(stage_dir)
        f = stage_dir / ARTIFACT_FILE
        if not f.is_file():
            raise ArtifactError(
                f"{stage_dir}: no {ARTIFACT_FILE}; the stage has not finished there"
            )
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{f}: not valid JSON ({e})") from e
        if d.get("status") != "complete":
            raise ArtifactError(f"{f}: status is {d.get('status')!r}, expected 'complete'")
        return cls(dir=stage_dir, **d)


def _versions() -> dict[str, str]:
    from cfexplain import __version__

    return {
        "cfexplain": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def partial_dir(exp_dir: Path, stage: str) -> Path:
    """Where ``stage`` works until it finishes."""
    return exp_dir / f".{stage}.partial"


def commit_stage(partial: Path, final: Path) -> None:
    """Move a finished partial folder into place, replacing an older finished one.

    The old folder is renamed aside first and only deleted once the new one is in place, so
    at every instant either the old or the new finished stage exists.
    """
    if not (partial / ARTIFACT_FILE).is_file():
        raise ArtifactError(
            f"{partial}: no {ARTIFACT_FILE}; refusing to commit an unfinished stage"
        )
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    if old.exists():
        shutil.rmtree(old)
