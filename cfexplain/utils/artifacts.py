"""Artifacts are data, not code: JSON, safetensors and weights-only torch state.

A finished stage lives in ``runs/<experiment>/<stage>/`` with ``artifact.json``; while it trains
it lives in ``runs/<experiment>/.<stage>.partial/`` so a crash never touches a finished stage.
Every write goes to a temporary file in the same folder and is renamed into place; a kill leaves
that temporary file behind, and :func:`clean_temp_files` removes it before a resume or a commit.
``artifact.json`` records the size and sha256 of every file it lists, and loading checks them.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

log = logging.getLogger("cfexplain")

ARTIFACT_FILE = "artifact.json"
STATE_FILE = "state.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)
# What torch's zip writer (inline_container.cc) raises when a write comes up short: a full disk.
_SHORT_WRITE = ("unexpected pos", "file write failed")


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
    try:
        write(tmp)
        # mkstemp makes 0600 files, and a writer may have replaced ours with its own: artifacts
        # are as readable as any other file
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e):
            raise ArtifactError(f"no space left on device while writing {path}") from e
        raise
    return path


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _SHORT_WRITE)


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Delete what killed writes left in ``folder``: our ``.<name>.*.tmp`` files and the
    ``.tmp*`` files of writers that make their own; returns what it deleted."""
    stale = [
        p
        for p in sorted(Path(folder).rglob(".*"))
        if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".tmp"))
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    """A resumable ``state.pt`` written by :func:`torch_save`, or None when there is none.

    An unreadable one (truncated, empty) is moved aside to ``<name>.corrupt`` with a warning,
    and None is returned: the stage starts over rather than stopping on a traceback.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch_load(path)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        aside = path.with_name(f"{path.name}.corrupt")
        empty = path.stat().st_size == 0
        os.replace(path, aside)
        why = "0 bytes" if empty else f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        log.warning(f"{path} is unreadable ({why}); moved to {aside.name}, starting over")
        return None


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
    return _sha256(path)[:16]


def file_checksum(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, as ``artifact.json`` records it."""
    return {"size": Path(path).stat().st_size, "sha256": _sha256(path)}


def verify_file(path: str | Path, expected: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`ArtifactError` naming ``path`` unless it has the recorded size
    and sha256 (a file changed or damaged after its stage finished)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {ARTIFACT_FILE} lists it")
    size = path.stat().st_size
    if size != expected["size"]:
        raise ArtifactError(
            f"{path}: {size} bytes, {ARTIFACT_FILE} records {expected['size']}; the file is damaged"
        )
    if _sha256(path) != expected["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 differs from the one {ARTIFACT_FILE} records; the file is damaged"
        )


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- weights


def save_model(
    path: str | Path, module: torch.nn.Module, target: str, kwargs: Mapping[str, Any]
) -> Path:
    """Save weights as safetensors with the class path and constructor kwargs in its metadata.

    The file alone rebuilds the module (:func:`load_model`), without Hydra and without pickle.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    meta = {"target": target, "kwargs": json.dumps(dict(kwargs), default=_json_default)}
    return save_tensors(path, state, meta)


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous, CPU) as safetensors, atomically and byte for byte the same
    for the same tensors and metadata.

    The safetensors writer makes its own temporary file (left behind by a kill) and orders the
    metadata keys differently from run to run; its bytes are rewritten here with a sorted header.
    """
    blob = safetensors_bytes(dict(tensors), metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    # padded with spaces to 8 bytes, as the format asks, so every tensor stays aligned
    head = header.encode() + b" " * (-len(header.encode()) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            f.write(memoryview(blob)[8 + n :])

    path = atomic_write(Path(path), write)
    _keep_record_true(path)
    return path


def _keep_record_true(path: Path) -> None:
    """When the ``artifact.json`` beside ``path`` records its checksum, record the new one: a
    file replaced through this module is not a damaged file."""
    record = path.parent / ARTIFACT_FILE
    if not record.is_file():
        return
    try:
        d = json.loads(record.read_text(encoding="utf-8"))
    except ValueError:
        return  # an unreadable record is reported where it is read
    checksums = d.get("checksums") if isinstance(d, dict) else None
    if isinstance(checksums, dict) and path.name in checksums:
        checksums[path.name] = file_checksum(path)
        write_json(record, d)


@contextmanager
def reading_safetensors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt safetensors file (or none at all) as one ``ArtifactError`` naming
    it, instead of the deserialiser's own error."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise ArtifactError(
            f"{path}: unreadable safetensors file, truncated or corrupt ({e}); retrain the "
            "stage that wrote it (force=true) or restore the file"
        ) from e


def read_model_meta(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The ``(target, kwargs)`` stored by :func:`save_model`."""
    with reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "target" not in meta or "kwargs" not in meta:
        raise ArtifactError(
            f"{path}: no 'target'/'kwargs' metadata; not written by cfexplain.save_model"
        )
    return meta["target"], json.loads(meta["kwargs"])


def verify_beside(path: str | Path) -> None:
    """Check ``path`` against the ``artifact.json`` in its folder, when that records it."""
    path = Path(path)
    record = path.parent / ARTIFACT_FILE
    if not record.is_file():
        return
    try:
        checksums = json.loads(record.read_text(encoding="utf-8")).get("checksums") or {}
    except (ValueError, AttributeError, OSError) as e:
        raise ArtifactError(f"{record}: unreadable, cannot check {path.name} ({e})") from e
    if path.name in checksums:
        verify_file(path, checksums[path.name])


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
    """Rebuild a module saved by :func:`save_model` and load its weights (eval mode).

    When an ``artifact.json`` beside the file records its size and sha256, they are checked
    first: a damaged file is a one-line :class:`ArtifactError`, not a deserialiser's traceback.
    """
    verify_beside(path)
    target, kwargs = read_model_meta(path)
    module = import_target(target)(**kwargs)
    with reading_safetensors(path):
        state = load_file(str(path), device=str(map_location))
    module.load_state_dict(state)
    return module.to(map_location).eval()


# ----------------------------------------------------------------------------- stage folders


@dataclass
class Artifact:
    """What a finished stage says about itself; ``artifact.json`` is this, as JSON.

    ``checksums`` maps each file of ``files`` (its name relative to ``dir``) to its size and
    sha256, filled in by :meth:`write` and checked by :meth:`verify`.
    """

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
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Absolute path of one of the artifact's files, by its key in ``files``."""
        if name not in self.files:
            raise ArtifactError(
                f"{self.dir / ARTIFACT_FILE}: no file '{name}' (has {sorted(self.files)})"
            )
        return self.dir / self.files[name]

    def write(self) -> Path:
        """Write ``artifact.json``, recording the size and sha256 of each listed file there is."""
        self.checksums = {
            rel: file_checksum(self.dir / rel)
            for rel in sorted(set(self.files.values()))
            if (self.dir / rel).is_file()
        }
        d = asdict(self)
        d.pop("dir")
        return write_json(self.dir / ARTIFACT_FILE, d)

    def verify(self) -> None:
        """Check every recorded file's size and sha256; the error names the first that differs."""
        for rel, expected in self.checksums.items():
            verify_file(self.dir / rel, expected)

    @classmethod
    def load(cls, stage_dir: str | Path) -> Artifact:
        stage_dir = Path(stage_dir)
        f = stage_dir / ARTIFACT_FILE
        if not f.is_file():
            raise ArtifactError(
                f"{stage_dir}: no {ARTIFACT_FILE}; the stage has not finished there"
            )
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, or not text at all
            raise ArtifactError(f"{f}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ArtifactError(f"{f}: holds a {type(d).__name__}, expected an object")
        if d.get("status") != "complete":
            raise ArtifactError(f"{f}: status is {d.get('status')!r}, expected 'complete'")
        try:
            return cls(dir=stage_dir, **d)
        except TypeError as e:  # a field missing or unknown
            raise ArtifactError(f"{f}: not an artifact record ({e})") from e


def _versions() -> dict[str, str]:
    from cfexplain import __version__

    return {
        "cfexplain": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        # The last bits of a CPU kernel's sums depend on the instruction set and on how the work
        # is split between threads, so the same seed reproduces weights only with both equal.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(torch.get_num_threads()),
    }


def partial_dir(exp_dir: Path, stage: str) -> Path:
    """Where ``stage`` works until it finishes."""
    return exp_dir / f".{stage}.partial"


def _old_dir(final: Path) -> Path:
    """Where :func:`commit_stage` and :func:`staged_dir` keep the folder they replace."""
    return final.with_name(f".{final.name}.old")


def commit_stage(partial: Path, final: Path) -> None:
    """Move a finished partial folder into place, replacing an older finished one.

    Temporary files of killed writes are deleted first. The old folder is renamed aside and
    only deleted once the new one is in place, so at every instant either the old or the new
    finished stage exists; :func:`recover_commit` repairs a commit killed between the renames.
    """
    if not (partial / ARTIFACT_FILE).is_file():
        raise ArtifactError(
            f"{partial}: no {ARTIFACT_FILE}; refusing to commit an unfinished stage"
        )
    clean_temp_files(partial)
    _swap_in(partial, final)


def _swap_in(new: Path, final: Path) -> None:
    old = _old_dir(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def recover_commit(final: Path, partial: Path) -> str | None:
    """Repair a commit of ``partial`` into ``final`` that was killed between its two renames.

    With ``.<stage>.old`` there and no ``final``: a complete partial (its ``artifact.json``
    loads and its files verify) is moved in, otherwise the old folder goes back. A leftover
    ``.old`` beside a ``final`` is deleted. Returns a line saying what was done, or None.
    """
    old = _old_dir(final)
    if not old.exists():
        return None
    if final.exists():
        shutil.rmtree(old)
        return f"deleted {old}, left by a commit that had finished"
    try:
        Artifact.load(partial).verify()
    except ArtifactError as e:
        os.replace(old, final)
        return f"rolled back an interrupted commit: {old} is {final} again ({partial} is not complete: {e})"
    clean_temp_files(partial)
    os.replace(partial, final)
    shutil.rmtree(old)
    return f"finished an interrupted commit: {partial} is now {final}"


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A folder to fill in place of ``out``: ``.<name>.partial`` beside it, swapped in whole
    when the block finishes (an older ``out`` is replaced whole).

    On an error the partial folder is deleted and ``out`` is left as it was. A swap killed
    between its renames is finished on the next entry (the partial was complete by then).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a folder")
    partial = out.with_name(f".{out.name}.partial")
    old = _old_dir(out)
    if old.exists() and not out.exists() and partial.is_dir():
        os.replace(partial, out)  # only a finished block's partial is ever swapped
    elif old.exists() and not out.exists():
        os.replace(old, out)
    if old.exists():
        shutil.rmtree(old)
    if partial.exists():
        shutil.rmtree(partial)  # what a killed block left
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    clean_temp_files(partial)
    _swap_in(partial, out)
