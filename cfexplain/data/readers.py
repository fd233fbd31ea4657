"""Readers of image datasets on disk: class folders, CSV manifests, DICOM, MedMNIST, PCam.

``open_dataset`` is the one entry point. Every dataset it returns yields samples
``{"image": float32 [C, R, R] in [-1, 1], "label": int, "meta": {"path": str, "index": int}}``
and carries ``num_classes``, ``class_names``, ``channels``, ``resolution``, ``labels``
(int64 [N]), ``skipped`` (``(path, reason)`` pairs) and ``source`` (one line for humans).

Images are fitted the same way everywhere: centre square crop, antialiased resize to R x R,
then gray <-> RGB to the configured channel count. ``load_image`` reads one file;
``decode_image`` and ``fit_image`` are its two steps, for callers that want the file's own size.

Rules that decide values (no silent guesses): transparency is composited on black
(:func:`composite_alpha`); 16-bit gray is scaled by its own sample depth (:func:`sample_bits`);
an image less than half the resolution on its shorter side is read with a warning
(:func:`far_smaller`); an empty class folder, or a label outside ``classes``, is an error.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from cfexplain.data import ImageDataset

log = logging.getLogger("cfexplain")

SPLITS = ("train", "val", "test")
FORMATS = ("auto", "folder", "csv", "dicom", "medmnist", "pcam")
BAD_FILE_POLICIES = ("error", "skip")

# Folder names accepted for each split; public datasets disagree on "val" vs "valid".
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
_DICOM_SUFFIXES = (".dcm",)
_PCAM_SPLIT = {"train": "train", "val": "valid", "test": "test"}
_PCAM_CLASSES = ["normal", "tumour"]
_PROGRESS_MIN_FILES = 200
# ITU-R BT.601 weights, the ones PIL's convert("L") uses, so an RGB file and its "L" save agree.
_LUMA = (0.299, 0.587, 0.114)


class DataError(ValueError):
    """A dataset path, file or field is missing, unreadable or not what was expected."""


class BadFile(DataError):
    """One image file that cannot be used; ``on_bad_file="skip"`` may pass over it.

    ``corrupt`` is True when the file cannot be decoded at all, False when it decodes into
    something without a rule to become an image [C, R, R] (a volume, 4 channels, ...);
    ``volume`` is True for a multi-frame file (a series, not one image: skipped in explain).
    """

    def __init__(
        self, path: str | Path, reason: str, *, corrupt: bool = False, volume: bool = False
    ) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.corrupt = corrupt
        self.volume = volume


def check_split(split: str) -> str:
    """``split`` when it is one of :data:`SPLITS`; a DataError naming the field otherwise."""
    if split not in SPLITS:
        raise DataError(f"split={split}: expected one of {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------------------------
# Entry points


def open_dataset(
    root: str | Path,
    split: str,
    *,
    format: str = "auto",
    resolution: int,
    channels: int,
    classes: list[str] | None = None,
    on_bad_file: str = "error",
    attributes: Sequence[str] | None = None,
    attributes_file: str | Path | None = None,
    reports: str | None = None,
) -> ImageDataset:
    """The ``split`` of the dataset at ``root`` as samples with images [channels, R, R] in [-1, 1].

    ``format="auto"`` detects: a ``.npz`` file (medmnist), a folder with
    ``camelyonpatch_level_2_split_*_x.h5`` (pcam), a ``.csv`` file or a folder with
    ``manifest.csv`` (csv), a folder with ``<split>/<class>/`` subfolders (folder).
    ``classes`` fixes the class names and their order; ``on_bad_file="skip"`` records corrupt
    files in ``dataset.skipped`` instead of raising ``DataError``. ``attributes`` (CSV
    manifests only) names columns of numbers in [0, 1], of the manifest or of
    ``attributes_file`` (a CSV with a ``path`` column, paths as in the manifest), that every
    sample then carries as ``meta["concepts"]`` (see :func:`read_attributes`). ``reports`` names a
    CSV manifest's column of report texts (``meta["report"]``; csv only).
    """
    check_split(split)
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(
            f"data.on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}"
        )
    _check_geometry(resolution, channels)
    if classes is not None:
        classes = [str(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(
                f"data.classes must be a non-empty list of distinct names, got {classes}"
            )
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist (data.root)")

    kind = _detect_format(root) if format == "auto" else format
    if reports and kind != "csv":
        raise DataError(f"data.reports={reports!r}: only a CSV manifest has a reports column")
    fit: dict[str, Any] = dict(resolution=resolution, channels=channels)
    if attributes and kind != "csv":
        raise DataError(f"data.attributes: only CSV manifests carry attributes, {root} is {kind}")
    if kind in ("folder", "dicom"):
        items, names, described = _folder_items(root, split, classes, dicom_only=kind == "dicom")
        return _EagerDataset(items, names, described, on_bad_file=on_bad_file, **fit)
    if kind == "csv":
        items, names, described, texts = _manifest_items(root, split, classes, reports)
        ds = _EagerDataset(items, names, described, on_bad_file=on_bad_file, reports=texts, **fit)
        if attributes:
            manifest = root if root.is_file() else root / "manifest.csv"
            table = read_attributes(Path(attributes_file or manifest).expanduser(), attributes)
            ds.concepts = _concepts_of(ds, table, attributes_file or manifest)
            ds.source += f", attributes {list(attributes)}"
        return ds
    if kind == "medmnist":
        return _MedMNISTDataset(root, split, classes, **fit)
    return _PCamDataset(root, split, classes, **fit)


def class_counts(
    root: str | Path, split: str, *, format: str = "auto", classes: list[str] | None = None
) -> tuple[dict[str, int], str] | None:
    """Files per class of a folder, DICOM or CSV dataset's ``split``, listed but not decoded,
    and where they were found; None for the formats held in one file (medmnist, pcam)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist (data.root)")
    kind = _detect_format(root) if format == "auto" else format
    if kind in ("folder", "dicom"):
        items, names, _ = _folder_items(root, split, classes, dicom_only=kind == "dicom")
        where = " or ".join(str(root / name) for name in _SPLIT_DIRS[split])
    elif kind == "csv":
        items, names, _, _ = _manifest_items(root, split, classes)
        where = f"{root} (split {split})"
    else:
        return None
    labels = np.bincount([label for _, label in items], minlength=len(names))
    return {name: int(n) for name, n in zip(names, labels)}, where


def load_image(path: str | Path, *, resolution: int, channels: int) -> torch.Tensor:
    """One PNG/JPEG/DICOM file as float32 [channels, R, R] in [-1, 1] (e.g. a user's own image)."""
    _check_geometry(resolution, channels)
    pixels, _ = decode_image(path)
    return fit_image(pixels, resolution=resolution, channels=channels)


def _check_geometry(resolution: int, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, numbers.Integral)
        or resolution < 1
    ):
        raise ValueError(f"data.resolution must be a positive int, got {resolution!r}")


def _detect_format(root: Path) -> str:
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return "medmnist"
        if root.suffix.lower() == ".csv":
            return "csv"
    else:
        if any(root.glob("camelyonpatch_level_2_split_*_x.h5")):
            return "pcam"
        if (root / "manifest.csv").is_file():
            return "csv"
        # Any split folder is enough: the folder reader then says what is missing inside it.
        if any((root / name).is_dir() for names in _SPLIT_DIRS.values() for name in names):
            return "folder"
    raise DataError(
        f"cannot tell the dataset format of {root}: looked for a .npz file (medmnist), "
        "camelyonpatch_level_2_split_*_x.h5 files (pcam), a .csv file or a folder holding "
        "manifest.csv (csv), and train/, val/ (or valid/), test/ folders of class subfolders "
        "(folder); set data.format to say which it is"
    )


# --------------------------------------------------------------------------------------------
# Listing files: class folders and CSV manifests -> [(path, label)], class names, description


def _folder_items(
    root: Path, split: str, classes: list[str] | None, *, dicom_only: bool
) -> tuple[list[tuple[Path, int]], list[str], str]:
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder holding <split>/<class>/ image folders")
    split_dirs = _existing_split_dirs(root, split)
    if len(split_dirs) > 1:
        raise DataError(
            f"{root}: found {', '.join(d.name for d in split_dirs)} for split {split}; expected one"
        )
    # Class indices must agree across splits, so names come from every split's folders even when
    # one split lacks a class.
    every_split = [d for s in SPLITS for d in _existing_split_dirs(root, s)]
    names = classes or _sort_names({c.name for d in every_split for c in _subdirs(d)})
    suffixes = _DICOM_SUFFIXES if dicom_only else _FOLDER_SUFFIXES

    items: list[tuple[Path, int]] = []
    for split_dir in split_dirs:
        for class_dir in _subdirs(split_dir):
            if class_dir.name not in names:
                raise DataError(
                    f"{class_dir}: class folder {class_dir.name!r} is a label outside the classes "
                    f"{names} (data.classes)"
                )
            label = names.index(class_dir.name)
            files = _files_under(class_dir, suffixes)
            if not files:
                raise DataError(
                    f"{class_dir}: empty class folder (no {'/'.join(suffixes)} files); remove it "
                    "or fill it, and list the classes in data.classes"
                )
            items += [(path, label) for path in files]
    if not items:
        looked = " or ".join(str(root / name) for name in _SPLIT_DIRS[split])
        hint = ""
        if split_dirs and any(p.suffix.lower() in suffixes for p in split_dirs[0].iterdir()):
            hint = f"; images lie directly in {split_dirs[0]}, expected them in class subfolders"
        raise DataError(
            f"no images for split {split} under {root}: looked for {'/'.join(suffixes)} files in "
            f"{looked}/<class>/{hint}"
        )
    kind = "DICOM" if dicom_only else "PNG/JPEG/DICOM"
    return items, names, f"{kind} class folders at {root}, split {split}"


def _existing_split_dirs(root: Path, split: str) -> list[Path]:
    return [root / name for name in _SPLIT_DIRS[split] if (root / name).is_dir()]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Image files anywhere below ``folder`` (DICOM exports nest patient/series folders)."""
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(found)


def _sort_names(names: set[str] | Sequence[str]) -> list[str]:
    """Numeric names ("0".."10", e.g. KL grades) in numeric order, the rest alphabetically."""
    names = list(names)
    if names and all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _manifest_items(
    root: Path, split: str, classes: list[str] | None, reports: str | None = None
) -> tuple[list[tuple[Path, int]], list[str], str, list[str] | None]:
    """Items, class names, a description and, with a ``reports`` column, each item's report."""
    manifest = root if root.is_file() else root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{root}: expected a CSV manifest file or a folder holding manifest.csv")
    rows, has_split = _read_manifest(manifest)
    names, label_of = _manifest_classes(manifest, rows, classes)
    texts = _manifest_reports(manifest, reports) if reports else None

    items, kept = [], []
    for line, path, label, row_split in rows:
        if (row_split if has_split else _hash_split(path)) == split:
            items.append((manifest.parent / path, label_of(label, line)))
            kept.append(line)
    if not items:
        raise DataError(f"no images for split {split} in {manifest} ({len(rows)} rows in all)")
    how = "split column" if has_split else "no split column: 80/10/10 by a hash of the path"
    described = f"CSV manifest {manifest}, split {split} ({how})"
    return items, names, described, [texts[line] for line in kept] if texts else None


def _manifest_reports(manifest: Path, column: str) -> dict[int, str]:
    """``{line: report text}`` of the manifest's ``column``; every row needs a non-empty text."""
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        table = list(csv.reader(f))
    header = [name.strip().lower() for name in table[0]]
    if column.strip().lower() not in header:
        raise DataError(f"{manifest}: no {column!r} column (data.reports) in the header {table[0]}")
    k = header.index(column.strip().lower())
    out = {}
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if not cells[k].strip():
            raise DataError(f"{manifest} line {line}: empty {column!r} cell (data.reports)")
        out[line] = cells[k].strip()
    return out


def _read_manifest(manifest: Path) -> tuple[list[tuple[int, str, str, str]], bool]:
    """Rows ``(line, path, label, split)`` of a ``path,label[,split]`` CSV with a header."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{manifest}: unreadable CSV manifest ({err})") from err
    if not table:
        raise DataError(f"{manifest}: empty file; expected a header path,label[,split]")
    column = {name.strip().lower(): i for i, name in enumerate(table[0])}
    for needed in ("path", "label"):
        if needed not in column:
            raise DataError(
                f"{manifest}: no {needed!r} column in the header {table[0]}; "
                "expected columns path,label[,split]"
            )
    has_split = "split" in column
    aliases = {alias: split for split, names in _SPLIT_DIRS.items() for alias in names}

    rows = []
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) < len(table[0]):
            raise DataError(f"{manifest} line {line}: {len(cells)} cells; expected {len(table[0])}")
        path, label = cells[column["path"]].strip(), cells[column["label"]].strip()
        if not path or not label:
            raise DataError(f"{manifest} line {line}: empty path or label")
        row_split = ""
        if has_split:
            row_split = aliases.get(cells[column["split"]].strip().lower(), "")
            if not row_split:
                raise DataError(
                    f"{manifest} line {line}: split {cells[column['split']]!r}; expected one of "
                    f"{sorted(aliases)}"
                )
        rows.append((line, path, label, row_split))
    return rows, has_split


def _manifest_classes(
    manifest: Path, rows: list[tuple[int, str, str, str]], classes: list[str] | None
):
    """Class names, and ``label_of(label, line) -> index`` for the manifest's label cells."""
    labels = {row[2] for row in rows}
    if classes is None and labels and all(_is_int(label) for label in labels):
        names = [str(i) for i in range(max(int(label) for label in labels) + 1)]
    else:
        names = classes or _sort_names(labels)
    index = {name: i for i, name in enumerate(names)}

    def label_of(label: str, line: int) -> int:
        # A cell equal to a class name is that class; otherwise it must be an index.
        if label in index:
            return index[label]
        if _is_int(label) and 0 <= int(label) < len(names):
            return int(label)
        raise DataError(
            f"{manifest} line {line}: label {label!r} is outside the classes {names}; expected a "
            f"class name or an index in [0, {len(names)})"
        )

    return names, label_of


def read_attributes(path: Path, columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{image path: {column: value}}`` from a CSV with a header holding ``path`` and
    ``columns``, each cell a number in [0, 1]; image paths are resolved against the CSV's folder.
    A missing file or column, or a bad cell, is a DataError naming the file (line) and field."""
    columns = [str(c) for c in columns]
    if not path.is_file():
        raise DataError(f"{path}: no such attributes file (data.attributes_file)")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: unreadable attributes CSV ({err})") from err
    header = [h.strip() for h in table[0]] if table else []
    index = {name.lower(): i for i, name in enumerate(header)}
    for needed in ["path", *columns]:
        if needed.lower() not in index:
            raise DataError(
                f"{path}: no column {needed!r} in the header {header} (data.attributes)"
            )
    out: dict[str, dict[str, float]] = {}
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) < len(header):
            raise DataError(f"{path} line {line}: {len(cells)} cells; expected {len(header)}")
        values = {}
        for col in columns:
            cell = cells[index[col.lower()]].strip()
            try:
                value = float(cell)
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise DataError(
                    f"{path} line {line}: attribute {col}={cell!r}; expected a number in [0, 1]"
                )
            values[col] = value
        out[os.path.normpath(path.parent / cells[index["path"]].strip())] = values
    return out


def _concepts_of(
    ds: _EagerDataset, table: dict[str, dict[str, float]], where: str | Path
) -> list[dict[str, float]]:
    """The attributes of every image of ``ds``, in order; a DataError names the first image
    ``where`` has no row for."""
    out = []
    for p in ds._paths:
        row = table.get(os.path.normpath(p))
        if row is None:
            raise DataError(f"{where}: no attributes row for the image {p} (data.attributes)")
        out.append(row)
    return out


def _hash_split(path: str) -> str:
    """A split from the manifest's own path text, so it is the same on every machine and run."""
    bucket = (
        int.from_bytes(hashlib.sha256(path.replace("\\", "/").encode()).digest()[:8], "big") % 10
    )
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


# --------------------------------------------------------------------------------------------
# Decoding one file -> float32 [H, W, c] in [-1, 1] with c in {1, 3}


def decode_image(path: str | Path) -> tuple[np.ndarray, bool]:
    """Pixels [H, W, 1 or 3] float32 in [-1, 1], and whether the file held 8-bit samples.

    A ``.dcm`` file, or a suffix-less one that ``is_dicom``, is read as DICOM; the rest with PIL.
    Raises ``BadFile`` for a file that cannot be used.
    """
    path = Path(path)
    if path.suffix.lower() in _DICOM_SUFFIXES or is_dicom(path):
        return _decode_dicom(path), False
    return _decode_pil(path)


def is_dicom(path: str | Path) -> bool:
    """Whether a suffix-less file is DICOM (exports often have no suffix): 'DICM' at byte 128."""
    path = Path(path)
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _decode_pil(path: Path) -> tuple[np.ndarray, bool]:
    try:
        with Image.open(path) as im:
            im.load()
            # Phone or viewer exports of radiographs keep their rotation in EXIF.
            im = ImageOps.exif_transpose(im)
            pixels, bits = _pil_pixels(path, im)
    except BadFile:
        raise
    # Corrupt files surface as whatever the decoder trips on (OSError, SyntaxError, zlib.error,
    # struct.error, DecompressionBombError...), so every failure here means "unreadable file".
    except Exception as err:
        raise BadFile(
            path,
            f"unreadable or corrupt image ({type(err).__name__}: {err}); expected a PNG or JPEG file",
            corrupt=True,
        ) from err
    return _unit_from_int(pixels, bits), bits == 8


def _pil_pixels(path: Path, im: Image.Image) -> tuple[np.ndarray, int]:
    """``(pixels [H, W, c], bits per sample)`` for the PIL modes that hold gray or RGB.

    Transparency (RGBA, LA, PA, a palette's tRNS) follows :func:`composite_alpha`; 16-bit
    samples follow :func:`sample_bits`.
    """
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"))[..., None], 8
    if mode in ("RGB", "YCbCr", "P"):
        return np.asarray(im.convert("RGB")), 8
    if mode in ("LA", "La"):
        pixels = np.asarray(im.convert("LA"))
        if not pixels[..., 1].any():
            # Gray + alpha exists to cut a shape out; with none visible there is no image.
            raise BadFile(
                path, "wrong channel count 2 (gray + alpha) and alpha 0 everywhere: nothing visible"
            )
        return composite_alpha(pixels), 8
    if mode in ("RGBA", "PA", "RGBa"):
        return composite_alpha(np.asarray(im.convert("RGBA"))), 8
    if mode == "RGBX":
        return np.asarray(im)[..., :3], 8
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(im).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadFile(path, f"{mode} samples outside 0..65535; expected 8- or 16-bit unsigned")
        return pixels[..., None], sample_bits(pixels)
    channels = len(im.getbands())
    if channels in (2, 4) or channels > 4:
        raise BadFile(
            path,
            f"wrong channel count {channels} (mode {mode}); expected 1 (gray), 3 (RGB), "
            "gray + alpha or RGBA",
        )
    raise BadFile(path, f"unsupported image mode {mode}; expected gray, RGB or RGBA")


def composite_alpha(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, c + 1] with alpha last -> uint8 [H, W, c], composited on black.

    The rule: a pixel becomes ``colour * alpha / 255`` (a transparent background turns black,
    the background of radiographs). An alpha that is the same everywhere draws no shape (many
    exporters write 0 or 255 throughout without meaning it), so it is dropped rather than
    letting a blank alpha turn a whole image black.
    """
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    if alpha.min() == alpha.max():
        return np.ascontiguousarray(colour)
    blended = colour.astype(np.float32) * (alpha.astype(np.float32) / 255)
    return np.round(blended).astype(np.uint8)


# Sample depths that detectors and scanners write into 16-bit containers.
_SAMPLE_DEPTHS = (8, 10, 12, 14, 16)


def sample_bits(pixels: np.ndarray) -> int:
    """The bit depth that scales a 16-bit gray image: the smallest of 8, 10, 12, 14 and 16 bits
    that holds its maximum (a 12-bit detector image stored in 16 bits is scaled by 4095, not
    left almost black by 65535). PNG and TIFF do not say how many of their 16 bits are used,
    so the image's own maximum decides; a 16-bit image brighter than 2**14 - 1 keeps 65535."""
    highest = int(pixels.max(initial=0))
    return next(bits for bits in _SAMPLE_DEPTHS if highest < 2**bits)


def far_smaller(height: int, width: int, resolution: int) -> str | None:
    """A warning when an image of ``height`` x ``width`` has to be enlarged more than twice to
    fill ``resolution`` (its detail would be invented by the resize), else None."""
    side = min(height, width)
    if 2 * side >= resolution:
        return None
    return (
        f"{width}x{height} is far smaller than data.resolution={resolution}: "
        f"enlarged {resolution / side:.1f}x, its fine detail is interpolated"
    )


def _unit_from_int(pixels: np.ndarray, bits: int) -> np.ndarray:
    return (pixels.astype(np.float32) / ((2**bits - 1) / 2) - 1).astype(np.float32)


def _decode_dicom(path: Path) -> np.ndarray:
    """DICOM pixels after the modality LUT, the VOI LUT/window and MONOCHROME1 inversion."""
    import pydicom  # imported here so `import cfexplain.data` stays light
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        # Old ACR-NEMA style files lack the 128-byte preamble but are otherwise readable.
        try:
            ds = pydicom.dcmread(path, force=True)
            readable = "PixelData" in ds
        except Exception:
            readable = False
        if not readable:
            raise BadFile(
                path, f"not a DICOM file ({err}); expected a DICOM image", corrupt=True
            ) from err
    except Exception as err:
        raise BadFile(
            path, f"unreadable DICOM file ({type(err).__name__}: {err})", corrupt=True
        ) from err
    if "PixelData" not in ds:
        raise BadFile(path, "no PixelData element; expected a DICOM image", corrupt=True)

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise BadFile(path, f"a volume of {frames} frames; expected one 2D frame", volume=True)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples not in (1, 3):
        raise BadFile(path, f"wrong channel count {samples} (SamplesPerPixel); expected 1 or 3")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    gray = samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2")
    rgb = samples == 3 and (photometric == "RGB" or photometric.startswith("YBR"))
    if not (gray or rgb):
        raise BadFile(
            path,
            f"PhotometricInterpretation {photometric or 'missing'} with {samples} sample(s); "
            "expected MONOCHROME1/MONOCHROME2 or RGB/YBR",
        )
    try:
        pixels = ds.pixel_array  # pydicom >= 2 turns YBR into RGB here
        if gray and pixels.ndim != 2 or rgb and pixels.shape[-1:] != (3,):
            raise ValueError(f"pixel array of shape {pixels.shape}")
        if rgb:
            return _unit_from_int(pixels, int(ds.get("BitsStored") or 8))
        return _dicom_gray(ds, pixels, invert=photometric == "MONOCHROME1")[..., None]
    except Exception as err:
        raise BadFile(
            path,
            f"cannot decode the pixel data ({type(err).__name__}: {err}); expected one 2D frame",
            corrupt=True,
        ) from err


def _dicom_gray(ds: Any, pixels: np.ndarray, *, invert: bool) -> np.ndarray:
    """[H, W] float32 in [-1, 1]: the VOI output range (else min..max) mapped onto [-1, 1]."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (  # type: ignore[no-redef]
            apply_modality_lut,
            apply_voi_lut,
        )

    values = apply_modality_lut(pixels, ds)
    voi_lut = _has_voi_lut(ds)
    if voi_lut or ("WindowCenter" in ds and "WindowWidth" in ds):
        if (
            voi_lut
            and np.issubdtype(values.dtype, np.floating)
            and np.all(values == np.round(values))
        ):
            values = values.astype(np.int64)  # a VOI LUT indexes by integer value
        values = apply_voi_lut(values, ds)
        # The range the VOI transform can output, found by running it on the extremes of its
        # input, so the window maps onto [-1, 1] however pydicom scales its output.
        if voi_lut:
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            first, entries = int(descriptor[1]), int(descriptor[0]) or 2**16
            probe = np.arange(first, first + entries, dtype=np.int64)
        else:
            probe = np.array([-np.inf, np.inf])
        outputs = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
        low, high = float(outputs.min()), float(outputs.max())
    else:
        low, high = float(values.min()), float(values.max())
    values = np.asarray(values, dtype=np.float64)
    if high > low:
        unit = np.clip((values - low) / (high - low) * 2 - 1, -1, 1)
    else:
        unit = np.full(values.shape, -1.0)  # a constant image carries no contrast: black
    return (-unit if invert else unit).astype(np.float32)


def _has_voi_lut(ds: Any) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


# --------------------------------------------------------------------------------------------
# Fitting pixels to [C, R, R]


def _as_batch(pixels: np.ndarray) -> torch.Tensor:
    """[H, W, c] -> [1, c, H, W] float32."""
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1)[None]


def _fit(images: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """[N, c, H, W] in [-1, 1] -> [N, c', R, R]; c' is 1 when ``channels`` is 1, else c.

    Cropping the centred square first and resizing it to R x R is the same as resizing the
    shorter side to R and centre-cropping, without resizing pixels that the crop drops.
    """
    if channels == 1 and images.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype).view(1, 3, 1, 1)
        images = (images * weights).sum(dim=1, keepdim=True)
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side != resolution:
        images = F.interpolate(
            images,
            size=(resolution, resolution),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(-1, 1)
    return images.contiguous()


def fit_image(pixels: np.ndarray, *, resolution: int, channels: int) -> torch.Tensor:
    """Decoded pixels [H, W, c] in [-1, 1] -> float32 [channels, R, R]: centre square crop,
    antialiased resize, gray <-> RGB (the fitting every dataset here applies)."""
    return _with_channels(_fit(_as_batch(pixels), resolution, channels)[0], channels)


def _with_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """[c, R, R] -> [channels, R, R]: gray is repeated into RGB (a copy, safe to edit in place)."""
    return image.repeat(channels, 1, 1) if image.shape[0] != channels else image


# --------------------------------------------------------------------------------------------
# Datasets


class _Readable(ImageDataset):
    """Attributes every reader's dataset carries beyond an ``ImageDataset``'s; see the module
    docstring."""

    labels: np.ndarray
    skipped: list[tuple[str, str]]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.source}>"


class _EagerDataset(_Readable):
    """Files decoded, checked and fitted once at construction, kept as uint8 or float16 [N, c, R, R]."""

    def __init__(
        self,
        items: list[tuple[Path, int]],
        class_names: list[str],
        described: str,
        *,
        resolution: int,
        channels: int,
        on_bad_file: str,
        reports: list[str] | None = None,
    ) -> None:
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.channels, self.resolution = channels, resolution
        self.skipped = []
        fitted, labels, self._paths = [], [], []
        self._reports: list[str] | None = [] if reports is not None else None
        small: list[str] = []
        progress = tqdm(
            items, desc="reading images", unit="img", disable=len(items) <= _PROGRESS_MIN_FILES
        )
        for n, (path, label) in enumerate(progress):
            try:
                pixels, eight_bit = decode_image(path)
            except BadFile as err:
                if on_bad_file == "error":
                    raise
                self.skipped.append((err.path, err.reason))
                continue
            if far_smaller(pixels.shape[0], pixels.shape[1], resolution):
                small.append(str(path))
            fitted.append((_fit(_as_batch(pixels), resolution, channels)[0], eight_bit))
            labels.append(label)
            self._paths.append(str(path))
            if self._reports is not None and reports is not None:
                self._reports.append(reports[n])
        if not fitted:
            first_path, first_reason = self.skipped[0]
            raise DataError(
                f"no readable images for {described}: all {len(items)} files were skipped "
                f"(first: {first_path}: {first_reason})"
            )
        if small:
            log.warning(
                f"{len(small)} of {len(items)} images of {described} are less than half "
                f"data.resolution={resolution} on their shorter side, so enlarging them invents "
                f"their fine detail (first: {', '.join(small[:3])})"
            )
        self._images = _pack(fitted)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.concepts: list[dict[str, float]] | None = None  # set when the CSV has attributes
        skipped = f", {len(self.skipped)} bad files skipped" if self.skipped else ""
        self.source = f"{described}: {len(labels)} images, {self.num_classes} classes{skipped}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        stored = torch.from_numpy(self._images[index])
        image = stored.float() / 127.5 - 1 if stored.dtype == torch.uint8 else stored.float()
        meta: dict[str, Any] = {"path": self._paths[index], "index": index}
        if self.concepts is not None:
            meta["concepts"] = dict(self.concepts[index])
        if self._reports is not None:
            meta["report"] = self._reports[index]
        return {
            "image": _with_channels(image, self.channels),
            "label": int(self.labels[index]),
            "meta": meta,
        }


def _pack(fitted: list[tuple[torch.Tensor, bool]]) -> np.ndarray:
    """One array [N, c, R, R]: uint8 when every file was 8-bit (no loss), float16 otherwise.

    Gray images are kept with one channel unless RGB files are mixed in, and expanded on read.
    """
    channels = max(image.shape[0] for image, _ in fitted)
    images = torch.stack([image.expand(channels, -1, -1) for image, _ in fitted])
    if all(eight_bit for _, eight_bit in fitted):
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return images.to(torch.float16).numpy()


class _MedMNISTDataset(_Readable):
    """A MedMNIST ``.npz``: the split's uint8 images stay in memory at their own size, fitted per read."""

    def __init__(
        self, path: Path, split: str, classes: list[str] | None, *, resolution: int, channels: int
    ) -> None:
        self.channels, self.resolution, self.skipped = channels, resolution, []
        self._path = str(path)
        if not path.is_file():
            raise DataError(f"{path}: expected a MedMNIST .npz file")
        keys = (f"{split}_images", f"{split}_labels")
        try:
            with np.load(path, allow_pickle=False) as npz:
                for key in keys:
                    if key not in npz.files:
                        raise DataError(
                            f"{path}: no key {key!r}; expected a MedMNIST npz with "
                            f"{keys[0]} and {keys[1]} (found {sorted(npz.files)})"
                        )
                images, labels = npz[keys[0]], npz[keys[1]]
                every_split = {k: npz[k] for s in SPLITS if (k := f"{s}_labels") in npz.files}
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{path}: unreadable npz file ({type(err).__name__}: {err})") from err

        if images.dtype != np.uint8:
            raise DataError(f"{path}: {keys[0]} has dtype {images.dtype}; expected uint8")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(
                f"{path}: {keys[0]} has shape {list(images.shape)}; expected [N, H, W] (gray) or "
                "[N, H, W, 3] (RGB): wrong channel count, or a 3D volume"
            )
        self._images = images
        self.labels = _single_labels(path, keys[1], labels, len(images))
        highest = max(
            int(_single_labels(path, key, y).max(initial=0)) for key, y in every_split.items()
        )
        self.class_names = classes or [str(i) for i in range(highest + 1)]
        self.num_classes = len(self.class_names)
        _check_label_range(path, keys[1], self.labels, self.class_names)
        height, width = images.shape[1:3]
        self.source = (
            f"MedMNIST npz {path}, split {split}: {len(images)} images of {height}x{width}, "
            f"{self.num_classes} classes"
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        pixels = _unit_from_int(self._images[index], 8)
        return {
            "image": fit_image(pixels, resolution=self.resolution, channels=self.channels),
            "label": int(self.labels[index]),
            "meta": {"path": self._path, "index": index},
        }


def _single_labels(
    path: Path | str, key: str, labels: np.ndarray, count: int | None = None
) -> np.ndarray:
    """[N] or [N, 1, ...] integer class indices -> int64 [N]; ``count`` is the expected N."""
    if count is None:
        count = len(labels) if labels.ndim else 1
    if labels.ndim == 0 or len(labels) != count or labels.size != count:
        raise DataError(
            f"{path}: {key} has shape {list(labels.shape)}; expected [{count}] or [{count}, 1] "
            "(one class index per image)"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise DataError(f"{path}: {key} must hold non-negative integer class indices")
    return labels.reshape(count).astype(np.int64)


def _check_label_range(path: Path | str, key: str, labels: np.ndarray, names: list[str]) -> None:
    outside = labels[labels >= len(names)]
    if outside.size:
        raise DataError(
            f"{path}: {key} holds label {int(outside[0])}, outside the classes {names} (data.classes)"
        )


class _PCamDataset(_Readable):
    """PatchCamelyon HDF5 files, read lazily; each process opens its own handle on first read."""

    def __init__(
        self, root: Path, split: str, classes: list[str] | None, *, resolution: int, channels: int
    ) -> None:
        import h5py

        self.channels, self.resolution, self.skipped = channels, resolution, []
        folder = root.parent if root.is_file() else root
        stem = f"camelyonpatch_level_2_split_{_PCAM_SPLIT[split]}"
        self._x_path = str(folder / f"{stem}_x.h5")
        y_path = folder / f"{stem}_y.h5"
        for path in (Path(self._x_path), y_path):
            if not path.is_file():
                gz = path.with_name(path.name + ".gz")
                hint = f" ({gz.name} is there: gunzip it first)" if gz.is_file() else ""
                raise DataError(
                    f"missing {path}: expected the PatchCamelyon file for split {split}{hint}"
                )

        x_shape = _h5_shape(h5py, Path(self._x_path), "x")
        if len(x_shape) != 4 or x_shape[-1] not in (1, 3):
            raise DataError(
                f"{self._x_path}: dataset 'x' has shape {list(x_shape)}; expected [N, 96, 96, 3]"
            )
        try:
            with h5py.File(y_path, "r") as f:
                if "y" not in f:
                    raise DataError(
                        f"{y_path}: no dataset 'y'; expected labels [N, 1, 1, 1] (found {list(f)})"
                    )
                labels = f["y"][()]
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{y_path}: unreadable HDF5 file ({type(err).__name__}: {err})"
            ) from err
        self.labels = _single_labels(y_path, "dataset 'y'", labels, x_shape[0])
        self.class_names = classes or list(_PCAM_CLASSES)
        self.num_classes = len(self.class_names)
        _check_label_range(y_path, "dataset 'y'", self.labels, self.class_names)
        self._file: Any = None
        self._pid: int | None = None
        self.source = (
            f"PatchCamelyon HDF5 at {folder}, split {split}: {len(self.labels)} patches, "
            f"{self.num_classes} classes (read lazily)"
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = range(len(self))[index]
        try:
            pixels = self._patches()[index]
        except Exception as err:
            raise DataError(
                f"{self._x_path}: cannot read patch {index} of dataset 'x' ({type(err).__name__}: {err})"
            ) from err
        image = fit_image(
            _unit_from_int(pixels, 8), resolution=self.resolution, channels=self.channels
        )
        return {
            "image": image,
            "label": int(self.labels[index]),
            "meta": {"path": self._x_path, "index": index},
        }

    def _patches(self) -> Any:
        # An HDF5 handle must not cross a fork: a DataLoader worker opens its own.
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file, self._pid = h5py.File(self._x_path, "r"), os.getpid()
        return self._file["x"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state


def _h5_shape(h5py: Any, path: Path, key: str) -> tuple[int, ...]:
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(
                    f"{path}: no dataset {key!r}; expected PatchCamelyon patches (found {list(f)})"
                )
            dataset = f[key]
            if dataset.dtype != np.uint8:
                raise DataError(
                    f"{path}: dataset {key!r} has dtype {dataset.dtype}; expected uint8"
                )
            return tuple(dataset.shape)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: unreadable HDF5 file ({type(err).__name__}: {err})") from err
