"""The user's own images for ``explain``: a folder, a glob, a CSV manifest or a DICOM folder.

Files are decoded and fitted by the dataset readers (``cfexplain.data.readers``: centre crop,
antialiased resize, gray <-> RGB, DICOM LUTs), so an explained image is exactly what the model
was trained on. A corrupt file, and a multi-frame DICOM (a series, not one image; training
skips it too under ``data.on_bad_file=skip``), is reported and skipped; a file that cannot
become the model's input (e.g. 4 channels where the model wants 1, no rule) stops with an
error naming it. An image far smaller than the model's resolution is explained with a warning
(logged, and in its note).
"""

from __future__ import annotations

import csv
import glob
import itertools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cfexplain.data.readers import (
    BadFile,
    DataError,
    decode_image,
    far_smaller,
    fit_image,
    is_dicom,
)

log = logging.getLogger("cfexplain")

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


@dataclass
class UserImage:
    """One decoded file: ``image [C, R, R]`` in [-1, 1]; ``label`` a class name or None."""

    path: Path
    image: torch.Tensor
    label: str | None
    note: str


def list_images(
    spec: str | Path, class_names: Sequence[str] = (), *, limit: int | None = None
) -> list[tuple[Path, str | None]]:
    """The first ``limit`` (all when None) of :func:`iter_images`, as a list."""
    return list(itertools.islice(iter_images(spec, class_names), limit))


def iter_images(
    spec: str | Path, class_names: Sequence[str] = ()
) -> Iterator[tuple[Path, str | None]]:
    """``(path, label)`` for ``spec``, one at a time: a folder (searched recursively; a parent
    folder named like one of ``class_names`` gives the label), a glob pattern, or a CSV with a
    ``path`` column and an optional ``label`` column (paths relative to the CSV).

    Folders and ``**`` globs are walked in sorted order without listing the whole tree first,
    and a symlinked folder is entered once (a link back to a folder above ends there), so a
    symlink loop neither hangs nor repeats files.
    """
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        yield from _manifest(path)
        return
    if path.is_dir():
        names = set(class_names)
        found = False
        for p in _walk(path, lambda q: q.suffix.lower() in SUFFIXES or is_dicom(q)):
            found = True
            yield p, p.parent.name if p.parent.name in names else None
        if not found:
            raise DataError(f"images={spec_str}: no {'/'.join(SUFFIXES)} files in that folder")
        return
    if path.is_file():
        yield path, None
        return
    if any(ch in spec_str for ch in "*?["):
        found = False
        for p in _glob(spec_str):
            found = True
            yield p, None
        if not found:
            raise DataError(f"images={spec_str}: the pattern matches no files")
        return
    raise DataError(
        f"images={spec_str}: no such file or folder (expected a folder, a glob or a .csv)"
    )


def _walk(top: Path, wanted: Callable[[Path], bool]) -> Iterator[Path]:
    """Files under ``top`` for which ``wanted`` holds, depth first in sorted order, hidden
    names skipped; each real folder is entered once, however many links lead to it."""
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return  # unreadable or a dangling link: nothing to explain there
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            if entry.is_dir():
                yield from visit(p)
            elif entry.is_file() and wanted(p):
                yield p

    yield from visit(top)


def _glob(pattern: str) -> Iterator[Path]:
    """Files matching ``pattern`` (``**`` spans folders), streamed by walking from the part of
    the pattern before its first wildcard; a symlink loop is walked once (see :func:`_walk`)."""
    parts = Path(pattern).expanduser().parts
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    rest = "/".join(parts[fixed:])
    if "**" not in rest:
        # No recursion: the standard glob cannot loop and lists a single level.
        yield from sorted(Path(p) for p in glob.iglob(pattern) if Path(p).is_file())
        return
    regex = re.compile(fnmatch_pattern(rest))
    for p in _walk(base, lambda q: True):
        if regex.fullmatch(p.relative_to(base).as_posix()):
            yield p


def fnmatch_pattern(pattern: str) -> str:
    """A regular expression for a glob over '/'-separated paths: ``**/`` spans any number of
    folders (also none), ``*`` and ``?`` stay inside one name, ``[...]`` is a set."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            ch = pattern[i]
            if ch == "*":
                out.append("[^/]*")
            elif ch == "?":
                out.append("[^/]")
            elif ch == "[" and "]" in pattern[i + 2 :]:
                end = pattern.index("]", i + 2)
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
            else:
                out.append(re.escape(ch))
            i += 1
    return "".join(out)


def _manifest(path: Path) -> list[tuple[Path, str | None]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"images={path}: unreadable CSV ({err})") from err
    if not rows or "path" not in {k.strip().lower() for k in rows[0]}:
        raise DataError(
            f"images={path}: expected a header with a 'path' column (and optional 'label')"
        )
    out = []
    for row in rows:
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if row.get("path"):
            out.append((path.parent / row["path"], row.get("label") or None))
    return out


def load_user_image(path: Path, label: str | None, *, resolution: int, channels: int) -> UserImage:
    """Decode and fit one file; ``BadFile`` (corrupt) or ``DataError`` (no conversion rule)."""
    path = Path(path)
    # Decoded and fitted in two steps (not ``load_image``): the note gives the file's own size.
    try:
        pixels, _ = decode_image(path)
    except BadFile as err:
        if err.corrupt or err.volume:
            raise
        raise DataError(
            f"{path}: cannot convert to the model's input ({channels} channel(s), "
            f"{resolution}x{resolution}): {err.reason}"
        ) from err
    h, w, c = pixels.shape
    image = fit_image(pixels, resolution=resolution, channels=channels)
    kind = {1: "gray", 3: "RGB"}[c]
    want = {1: "gray", 3: "RGB"}[channels]
    note = f"{path.name}: {kind} {w}x{h} -> {want} {resolution}x{resolution}"
    if (h, w) != (resolution, resolution):
        note += " (centre crop, resize)"
    small = far_smaller(h, w, resolution)
    if small:
        note += f"; warning: {small}"
        log.warning(f"[explain] {path}: {small}")
    return UserImage(Path(path), image, label, note)


def iter_user_images(
    items: Iterable[tuple[Path, str | None]],
    *,
    resolution: int,
    channels: int,
    skipped: list[tuple[str, str]],
) -> Iterator[UserImage]:
    """Decode files lazily, one at a time; corrupt ones and volumes are logged and go to
    ``skipped`` as ``(path, reason)``."""
    for path, label in items:
        try:
            yield load_user_image(path, label, resolution=resolution, channels=channels)
        except BadFile as err:
            log.warning(f"[explain] skipped {err.path}: {err.reason}")
            skipped.append((err.path, err.reason))
