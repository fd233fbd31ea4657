"""The user's own images for ``explain``: a folder, a glob, a CSV manifest or a DICOM folder.

Files are decoded and fitted by the dataset readers (``cfexplain.data.readers``: centre crop,
antialiased resize, gray <-> RGB, DICOM LUTs), so an explained image is exactly what the model
was trained on. A corrupt file is reported and skipped; a file that cannot become the model's
input (e.g. 4 channels where the model wants 1, no rule) stops with an error naming it.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cfexplain.data.readers import BadFile, DataError, decode_image, fit_image, is_dicom

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


@dataclass
class UserImage:
    """One decoded file: ``image [C, R, R]`` in [-1, 1]; ``label`` a class name or None."""

    path: Path
    image: torch.Tensor
    label: str | None
    note: str


def list_images(spec: str | Path, class_names: Sequence[str] = ()) -> list[tuple[Path, str | None]]:
    """``(path, label)`` for ``spec``: a folder (searched recursively; a parent folder named like
    one of ``class_names`` gives the label), a glob pattern, or a CSV with a ``path`` column and
    an optional ``label`` column (paths relative to the CSV)."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _manifest(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (p.suffix.lower() in SUFFIXES or is_dicom(p))
        )
        if not files:
            raise DataError(f"images={spec_str}: no {'/'.join(SUFFIXES)} files in that folder")
        names = set(class_names)
        return [(p, p.parent.name if p.parent.name in names else None) for p in files]
    if path.is_file():
        return [(path, None)]
    if any(ch in spec_str for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec_str, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"images={spec_str}: the pattern matches no files")
        return [(p, None) for p in files]
    raise DataError(
        f"images={spec_str}: no such file or folder (expected a folder, a glob or a .csv)"
    )


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
        if err.corrupt:
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
    return UserImage(Path(path), image, label, note)


def iter_user_images(
    items: Sequence[tuple[Path, str | None]],
    *,
    resolution: int,
    channels: int,
    skipped: list[tuple[str, str]],
) -> Iterator[UserImage]:
    """Decode files lazily, one at a time; corrupt ones go to ``skipped`` as ``(path, reason)``."""
    for path, label in items:
        try:
            yield load_user_image(path, label, resolution=resolution, channels=channels)
        except BadFile as err:
            skipped.append((err.path, err.reason))
