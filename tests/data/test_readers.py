"""Readers on files the tests write (PNG, JPEG, CSV, DICOM, npz, HDF5) and on pydicom's CT/MR samples."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch.utils.data import DataLoader

from cfexplain.data.readers import (
    BadFile,
    DataError,
    decode_image,
    fit_image,
    is_dicom,
    load_image,
    open_dataset,
)

# --------------------------------------------------------------------------------------------
# Writers


def save_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


def gray(value: int, height: int = 12, width: int = 12, dtype=np.uint8) -> np.ndarray:
    return np.full((height, width), value, dtype=dtype)


def write_dicom(
    path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", **tags
) -> Path:
    """A minimal Secondary Capture file: [H, W] gray, [H, W, 3] RGB or [F, H, W] frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "OT"
    rgb = photometric == "RGB"
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[:2] if rgb else pixels.shape[-2:]
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], then onto [-1, 1]."""
    c, w = center - 0.5, width - 1
    unit = np.where(
        values <= c - w / 2, 0.0, np.where(values > c + w / 2, 1.0, (values - c) / w + 0.5)
    )
    return unit * 2 - 1


def open_(root, split="train", **kwargs):
    kwargs.setdefault("resolution", 8)
    kwargs.setdefault("channels", 1)
    return open_dataset(root, split, **kwargs)


# --------------------------------------------------------------------------------------------
# Class folders of PNG/JPEG


def test_folder_reads_png_and_jpeg_kinds_with_exact_values(tmp_path):
    root = tmp_path / "knee"
    save_png(root / "train/0/gray8.png", gray(51, 20, 30))
    save_png(root / "train/0/gray16.png", gray(16384, 30, 20, np.uint16))
    save_png(root / "train/1/rgb.png", np.tile(np.array([255, 0, 0], np.uint8), (12, 12, 1)))
    rgba = np.tile(np.array([0, 255, 0, 0], np.uint8), (12, 12, 1))  # fully transparent green
    save_png(root / "train/1/rgba.png", rgba, mode="RGBA")
    Image.fromarray(gray(128)).save(root / "train/1/photo.jpg", quality=95)

    ds = open_(root, channels=3)
    assert (ds.num_classes, ds.class_names, ds.channels, ds.resolution) == (2, ["0", "1"], 3, 8)
    assert len(ds) == 5 and ds.skipped == []
    assert ds.source == f"PNG/JPEG/DICOM class folders at {root}, split train: 5 images, 2 classes"
    by_name = {Path(ds[i]["meta"]["path"]).name: ds[i] for i in range(len(ds))}
    for sample in by_name.values():
        assert sample["image"].shape == (3, 8, 8) and sample["image"].dtype == torch.float32
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
    assert by_name["gray8.png"]["label"] == 0 and by_name["rgb.png"]["label"] == 1
    # One 16-bit file makes the whole dataset float16 (finer than 8-bit steps); 16-bit scales by 65535.
    torch.testing.assert_close(
        by_name["gray8.png"]["image"], torch.full((3, 8, 8), 51 / 127.5 - 1), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        by_name["gray16.png"]["image"],
        torch.full((3, 8, 8), 16384 / 32767.5 - 1),
        atol=1e-3,
        rtol=0,
    )
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(by_name["rgb.png"]["image"], red)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(by_name["rgba.png"]["image"], green)  # alpha dropped, not blended
    assert by_name["photo.jpg"]["image"].sub(128 / 127.5 - 1).abs().max() < 0.02

    luma = open_(root, channels=1)
    images = {Path(luma[i]["meta"]["path"]).name: luma[i]["image"] for i in range(len(luma))}
    assert all(image.shape == (1, 8, 8) for image in images.values())
    # BT.601 luminance of pure red and pure green, within one 8-bit step
    assert images["rgb.png"].sub(0.299 * 2 - 1).abs().max() <= 1 / 127.5
    assert images["rgba.png"].sub(0.587 * 2 - 1).abs().max() <= 1 / 127.5


def test_conversion_crops_the_centre_and_resizes_with_antialiasing(tmp_path):
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255  # exactly the centre square of a 20x40 image
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[10:30] = 255
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    for name, pixels in {"wide": wide, "tall": tall, "checker": checker}.items():
        save_png(tmp_path / f"{name}.png", pixels)

    for name in ("wide", "tall"):
        for channels in (1, 3):
            image = load_image(tmp_path / f"{name}.png", resolution=10, channels=channels)
            assert image.shape == (channels, 10, 10)
            torch.testing.assert_close(image, torch.ones(channels, 10, 10))  # borders cropped off
    # Point sampling a one-pixel checkerboard would give +-1; an antialiased resize gives grey.
    shrunk = load_image(tmp_path / "checker.png", resolution=8, channels=1)
    assert shrunk.abs().max() < 0.1
    grown = load_image(tmp_path / "wide.png", resolution=64, channels=3)
    assert grown.shape == (3, 64, 64) and grown.min() >= -1 and grown.max() <= 1


def test_class_names_sort_numerically_and_follow_given_classes(tmp_path):
    for grade in ("2", "10", "1"):
        save_png(tmp_path / "train" / grade / "a.png", gray(int(grade)))
    ds = open_(tmp_path)
    assert ds.class_names == ["1", "2", "10"]
    assert {Path(ds[i]["meta"]["path"]).parent.name: ds[i]["label"] for i in range(3)} == {
        "1": 0, "2": 1, "10": 2,
    }  # fmt: skip
    given = open_(tmp_path, classes=["10", "2", "1", "3"])
    assert given.class_names == ["10", "2", "1", "3"] and given.num_classes == 4
    assert {Path(given[i]["meta"]["path"]).parent.name: given[i]["label"] for i in range(3)} == {
        "10": 0, "2": 1, "1": 2,
    }  # fmt: skip

    with pytest.raises(DataError, match="label outside the classes") as err:
        open_(tmp_path, classes=["1", "2"])
    assert str(tmp_path / "train" / "10") in str(err.value)


def test_valid_is_an_alias_of_val_and_class_indices_agree_across_splits(tmp_path):
    for cls in ("cat", "dog", "eel"):
        save_png(tmp_path / "train" / cls / "a.png", gray(10))
    save_png(tmp_path / "valid" / "eel" / "b.png", gray(10))  # val holds one class only
    ds = open_(tmp_path, "val")
    assert ds.class_names == ["cat", "dog", "eel"] and len(ds) == 1 and ds[0]["label"] == 2
    assert "split val" in ds.source
    save_png(tmp_path / "val" / "eel" / "c.png", gray(10))
    with pytest.raises(DataError, match="expected one"):
        open_(tmp_path, "val")


def test_images_in_nested_folders_are_found_and_other_files_ignored(tmp_path):
    save_png(tmp_path / "train/a/patient1/x.PNG", gray(1))
    save_png(tmp_path / "train/a/.hidden/y.png", gray(1))
    (tmp_path / "train/a/notes.txt").write_text("not an image")
    ds = open_(tmp_path)
    assert [Path(ds[0]["meta"]["path"]).name for _ in range(len(ds))] == ["x.PNG"]


def test_structural_errors_raise_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        open_(tmp_path / "nowhere", on_bad_file="skip")
    assert str(tmp_path / "nowhere") in str(err.value)

    save_png(tmp_path / "train/0/a.png", gray(1))
    with pytest.raises(DataError, match="no images for split test") as err:
        open_(tmp_path, "test", on_bad_file="skip")
    assert str(tmp_path / "test") in str(err.value)

    save_png(tmp_path / "val" / "loose.png", gray(1))
    with pytest.raises(DataError, match="directly in .*val, expected them in class subfolders"):
        open_(tmp_path, "val", on_bad_file="skip")

    with pytest.raises(DataError, match="label outside the classes"):
        open_(tmp_path, classes=["9"], on_bad_file="skip")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DataError,
        match=r"cannot tell the dataset format .*\.npz.*camelyonpatch.*manifest\.csv.*train/",
    ):
        open_(empty)


def test_argument_errors_name_the_field(tmp_path):
    save_png(tmp_path / "train/0/a.png", gray(1))
    with pytest.raises(ValueError, match="data.channels"):
        open_(tmp_path, channels=2)
    with pytest.raises(ValueError, match="data.resolution"):
        open_(tmp_path, resolution=0)
    with pytest.raises(ValueError, match="data.on_bad_file"):
        open_(tmp_path, on_bad_file="ignore")
    with pytest.raises(ValueError, match="data.format"):
        open_(tmp_path, format="tiff")
    with pytest.raises(DataError, match="^split=.*: expected one of train, val, test$"):
        open_(tmp_path, "valid")
    assert issubclass(DataError, ValueError)


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file of each kind that must be refused, and what the message says about it."""
    good = save_png(folder / "good.png", gray(10, 64, 64))
    truncated = folder / "truncated.png"
    save_png(truncated, np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:2000])
    garbage = folder / "garbage.dcm"
    garbage.write_bytes(np.random.default_rng(1).bytes(600))
    two = save_png(folder / "two_channels.png", np.zeros((8, 8, 2), np.uint8), mode="LA")
    cmyk = folder / "cmyk.jpg"
    Image.new("CMYK", (8, 8)).save(cmyk)
    assert good.exists()
    return {
        "unreadable or corrupt": truncated,
        "not a DICOM file": garbage,
        "wrong channel count 2": two,
        "wrong channel count 4": cmyk,
    }


def test_bad_files_raise_naming_the_file_or_are_skipped(tmp_path):
    bad = _bad_files(tmp_path / "all/train/0")
    for reason, path in bad.items():
        root = tmp_path / path.stem
        save_png(root / "train/0/good.png", gray(10, 64, 64))
        shutil.copy(path, root / "train/0" / path.name)
        with pytest.raises(DataError, match=reason) as err:
            open_(root)
        assert str(err.value).startswith(str(root / "train/0" / path.name))

    ds = open_(tmp_path / "all", on_bad_file="skip")
    assert len(ds) == 1 and ds[0]["meta"]["path"].endswith("good.png")
    assert sorted(path for path, _ in ds.skipped) == sorted(str(p) for p in bad.values())
    assert all(reason for _, reason in ds.skipped)
    assert ds.source.endswith("1 images, 1 classes, 4 bad files skipped")

    (tmp_path / "all/train/0/good.png").unlink()
    with pytest.raises(DataError, match="all 4 files were skipped") as err:
        open_(tmp_path / "all", on_bad_file="skip")
    assert any(str(path) in str(err.value) for path in bad.values())


def test_load_image_names_the_bad_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="unreadable or corrupt image") as err:
        load_image(path, resolution=8, channels=1)
    assert str(path) in str(err.value)


def test_decode_then_fit_is_load_image_and_bad_files_say_if_corrupt(tmp_path):
    path = save_png(tmp_path / "wide.png", np.arange(12 * 20, dtype=np.uint8).reshape(12, 20))
    pixels, eight_bit = decode_image(path)
    assert pixels.shape == (12, 20, 1) and pixels.dtype == np.float32 and eight_bit
    fitted = fit_image(pixels, resolution=8, channels=3)
    assert fitted.shape == (3, 8, 8)
    assert torch.equal(fitted, load_image(path, resolution=8, channels=3))

    # A suffix-less DICOM export is found by its magic and decoded as DICOM.
    bare = write_dicom(tmp_path / "IM0001", np.arange(16, dtype=np.uint16).reshape(4, 4))
    assert is_dicom(bare) and not is_dicom(path)
    assert decode_image(bare)[0].shape == (4, 4, 1)

    corrupt = {"unreadable or corrupt", "not a DICOM file"}
    for reason, bad in _bad_files(tmp_path / "bad").items():
        with pytest.raises(BadFile, match=reason) as err:
            decode_image(bad)
        assert err.value.path == str(bad) and err.value.corrupt == (reason in corrupt)


def test_progress_bar_shows_for_many_files(tmp_path, capsys):
    for i in range(201):
        save_png(tmp_path / f"train/0/{i:03d}.png", gray(i, 4, 4))
    ds = open_(tmp_path, resolution=4)
    assert len(ds) == 201 and "reading images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# CSV manifests


def test_csv_with_split_column_reads_names_and_indices(tmp_path):
    save_png(tmp_path / "img/a.png", gray(0))
    save_png(tmp_path / "img/b.png", gray(255))
    write_dicom(tmp_path / "img/c.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    (tmp_path / "manifest.csv").write_text(
        "path,label,split\nimg/a.png,healthy,train\nimg/b.png,1,train\nimg/c.dcm,sick,valid\n"
    )
    ds = open_(tmp_path, classes=["healthy", "sick"])  # auto: a folder holding manifest.csv
    assert [ds[i]["label"] for i in range(2)] == [0, 1]
    assert ds[0]["image"].eq(-1).all() and ds[1]["image"].eq(1).all()
    assert ds.source.startswith(
        f"CSV manifest {tmp_path / 'manifest.csv'}, split train (split column)"
    )
    val = open_(tmp_path / "manifest.csv", "val", classes=["healthy", "sick"])  # auto: a .csv file
    assert (
        len(val) == 1
        and val[0]["label"] == 1
        and val[0]["meta"]["path"] == str(tmp_path / "img/c.dcm")
    )
    # without classes the names are the sorted label cells
    assert open_(tmp_path).class_names == ["1", "healthy", "sick"]

    with pytest.raises(DataError, match=r"line 3: label '1' is outside the classes") as err:
        open_(tmp_path, classes=["healthy"])
    assert str(tmp_path / "manifest.csv") in str(err.value)
    with pytest.raises(DataError, match="no images for split test"):
        open_(tmp_path, "test", classes=["healthy", "sick"])


def test_csv_without_split_column_splits_80_10_10_by_path_hash(tmp_path):
    lines = ["path,label"]
    for i in range(100):
        save_png(tmp_path / f"{i}.png", gray(i, 2, 2))
        lines.append(f"{i}.png,{i % 3}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    splits = {s: open_(tmp_path / "list.csv", s, resolution=2) for s in ("train", "val", "test")}
    paths = {s: {ds[i]["meta"]["path"] for i in range(len(ds))} for s, ds in splits.items()}
    assert sum(map(len, paths.values())) == 100
    assert set.union(*paths.values()) == {str(tmp_path / f"{i}.png") for i in range(100)}
    assert 70 <= len(paths["train"]) <= 90 and len(paths["val"]) >= 3 and len(paths["test"]) >= 3
    assert "80/10/10 by a hash of the path" in splits["val"].source
    assert splits["train"].class_names == ["0", "1", "2"]
    again = open_(tmp_path / "list.csv", "test", resolution=2)
    assert {again[i]["meta"]["path"] for i in range(len(again))} == paths["test"]


def test_csv_errors_name_the_manifest_and_missing_files(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match="no 'path' column") as err:
        open_(manifest)
    assert str(manifest) in str(err.value)
    manifest.write_text("path,label,split\na.png,0,holdout\n")
    with pytest.raises(DataError, match="line 2: split 'holdout'"):
        open_(manifest)
    manifest.write_text("path,label,split\na.png,-1,train\n")
    with pytest.raises(DataError, match="outside the classes"):
        open_(manifest, classes=["x"])

    save_png(tmp_path / "b.png", gray(3))
    manifest.write_text("path,label,split\nmissing.png,0,train\nb.png,0,train\n")
    with pytest.raises(DataError, match="unreadable") as err:
        open_(manifest)
    assert str(tmp_path / "missing.png") in str(err.value)
    ds = open_(manifest, on_bad_file="skip")
    assert len(ds) == 1 and ds.skipped[0][0] == str(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------
# DICOM


def test_dicom_modality_lut_window_and_monochrome1_inversion(tmp_path):
    stored = np.array([[0, 50, 150, 200], [225, 250, 300, 175]] * 2, dtype=np.uint16)
    window = dict(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=201)
    write_dicom(tmp_path / "train/m2/a.dcm", stored, **window)
    write_dicom(tmp_path / "train/m1/a.dcm", stored, photometric="MONOCHROME1", **window)
    save_png(tmp_path / "train/m2/ignored.png", gray(1, 4, 4))  # "dicom" reads .dcm only

    ds = open_(tmp_path, format="dicom", resolution=4)
    assert len(ds) == 2 and ds.source.startswith("DICOM class folders")
    images = {ds.class_names[ds[i]["label"]]: ds[i]["image"][0] for i in range(2)}
    expected = torch.from_numpy(linear_window(stored[:4] * 2.0 - 100, 300, 201)).float()
    assert expected.min() == -1 and expected.max() == 1  # the window clips on both sides
    torch.testing.assert_close(images["m2"], expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(images["m1"], -expected, atol=2e-3, rtol=0)


def test_dicom_without_window_maps_min_max_and_reads_rgb(tmp_path):
    stored = (np.arange(16, dtype=np.int16) * 3 + 1000).reshape(4, 4)
    write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024)
    image = load_image(tmp_path / "ct.dcm", resolution=4, channels=1)[0]
    torch.testing.assert_close(image, torch.linspace(-1, 1, 16).view(4, 4))

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 2] = 255
    write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    image = load_image(tmp_path / "rgb.dcm", resolution=4, channels=3)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_dicom_voi_lut_sequence_sets_the_output_range(tmp_path):
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4, 10, 8])  # 4 entries, first input value 10, 8 bits
    lut.add_new(0x00283006, "US", [0, 50, 100, 200])
    stored = np.array([[9, 10, 11, 12], [13, 20, 10, 10]], dtype=np.uint16)
    write_dicom(tmp_path / "lut.dcm", np.vstack([stored, stored]), VOILUTSequence=[lut])
    image = load_image(tmp_path / "lut.dcm", resolution=4, channels=1)[0, :2]
    expected = torch.tensor([[-1.0, -1.0, -0.5, 0.0], [1.0, 1.0, -1.0, -1.0]])
    torch.testing.assert_close(image, expected)


def test_dicom_bad_inputs_name_the_file(tmp_path):
    volume = np.zeros((3, 4, 4), np.uint16)
    cases = {
        "a volume of 3 frames; expected one 2D frame": write_dicom(tmp_path / "volume.dcm", volume),
        "wrong channel count 2": write_dicom(
            tmp_path / "two.dcm", gray(1, 4, 4, np.uint16), SamplesPerPixel=2
        ),
        "PhotometricInterpretation PALETTE COLOR": write_dicom(
            tmp_path / "palette.dcm", gray(1, 4, 4, np.uint16), photometric="PALETTE COLOR"
        ),
    }
    short = write_dicom(tmp_path / "short.dcm", gray(1, 4, 4, np.uint16))
    dataset = pydicom.dcmread(short)
    dataset.PixelData = dataset.PixelData[:10]
    dataset.save_as(short)
    cases["cannot decode the pixel data"] = short
    for reason, path in cases.items():
        with pytest.raises(DataError, match=reason) as err:
            load_image(path, resolution=4, channels=1)
        assert str(err.value).startswith(str(path))


def test_real_ct_and_mr_samples_in_class_folders(tmp_path):
    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    shutil.copy(ct, tmp_path / "x.dcm")  # keep the loop below free of pydicom's cache paths
    for cls, source in (("ct", ct), ("mr", mr)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        shutil.copy(source, tmp_path / "train" / cls / Path(source).name)

    ds = open_(tmp_path, resolution=64, channels=3)  # auto: class folders
    assert ds.class_names == ["ct", "mr"] and len(ds) == 2
    samples = {ds.class_names[ds[i]["label"]]: ds[i] for i in range(2)}
    for sample in samples.values():
        assert sample["image"].shape == (3, 64, 64)
        assert -1 <= sample["image"].min() < sample["image"].max() <= 1

    # MR_small carries a window (600/1600) and is 64x64: compare pixel for pixel.
    mr_ds = pydicom.dcmread(mr)
    expected = linear_window(mr_ds.pixel_array.astype(float), 600, 1600)
    torch.testing.assert_close(
        samples["mr"]["image"][0], torch.from_numpy(expected).float(), atol=2e-3, rtol=0
    )
    # CT_small has no window: rescaled values span exactly [-1, 1].
    ct_image = load_image(ct, resolution=128, channels=1)
    assert ct_image.min() == -1 and ct_image.max() == 1
    hu = pydicom.dcmread(ct).pixel_array.astype(float) - 1024
    torch.testing.assert_close(
        ct_image[0], torch.from_numpy((hu - hu.min()) / (hu.max() - hu.min()) * 2 - 1).float()
    )


# --------------------------------------------------------------------------------------------
# MedMNIST


def _medmnist(path: Path, shape: tuple[int, ...], **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    arrays["test_labels"][0] = 4  # the highest label lives in another split
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_medmnist_gray_and_rgb(tmp_path):
    path = _medmnist(tmp_path / "pneumoniamnist.npz", (28, 28))
    ds = open_(path, resolution=28, channels=1)
    assert len(ds) == 6 and ds.num_classes == 5 and ds.class_names == ["0", "1", "2", "3", "4"]
    with np.load(path) as npz:
        pixels = npz["train_images"][4]
    torch.testing.assert_close(ds[4]["image"][0], torch.from_numpy(pixels / 127.5 - 1).float())
    assert ds[4]["label"] == 1 and ds[4]["meta"] == {"path": str(path), "index": 4}
    assert ds.source.startswith(f"MedMNIST npz {path}, split train: 6 images of 28x28, 5 classes")
    assert open_(path, "val", resolution=16, channels=3)[0]["image"].shape == (3, 16, 16)

    rgb = open_(
        _medmnist(tmp_path / "pathmnist.npz", (28, 28, 3)), "test", resolution=32, channels=3
    )
    assert len(rgb) == 2 and rgb[-1]["image"].shape == (3, 32, 32)
    assert open_(tmp_path / "pathmnist.npz", resolution=8, channels=1)[0]["image"].shape == (
        1,
        8,
        8,
    )


def test_medmnist_bad_inputs_name_file_and_key(tmp_path):
    path = _medmnist(tmp_path / "a.npz", (28, 28), val_labels=None)
    with pytest.raises(DataError, match="no key 'val_labels'") as err:
        open_(path, "val", on_bad_file="skip")
    assert str(path) in str(err.value)
    path = _medmnist(tmp_path / "b.npz", (28, 28, 2))
    with pytest.raises(DataError, match=r"\[6, 28, 28, 2\].*wrong channel count"):
        open_(path)
    with pytest.raises(DataError, match="label 4, outside the classes"):
        open_(_medmnist(tmp_path / "c.npz", (28, 28)), "test", classes=["a", "b", "c"])
    (tmp_path / "d.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable npz") as err:
        open_(tmp_path / "d.npz")
    assert str(tmp_path / "d.npz") in str(err.value)


# --------------------------------------------------------------------------------------------
# PatchCamelyon


def _pcam(folder: Path, split: str = "valid", n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    patches = np.zeros((n, 96, 96, 3), np.uint8)
    patches[:, :, :, 0] = np.arange(n, dtype=np.uint8)[:, None, None] * 40  # patch i is red i*40
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=patches, chunks=(1, 96, 96, 3))
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1))
    return folder


def test_pcam_reads_lazily_and_pickles_into_dataloader_workers(tmp_path):
    root = _pcam(tmp_path / "pcam")
    ds = open_(root, "val", resolution=32, channels=3)  # auto: camelyonpatch files
    assert (len(ds), ds.class_names, ds.num_classes) == (6, ["normal", "tumour"], 2)
    assert ds.source.endswith("split val: 6 patches, 2 classes (read lazily)")
    sample = ds[3]
    assert sample["label"] == 1 and sample["image"].shape == (3, 32, 32)
    torch.testing.assert_close(sample["image"][:, 0, 0], torch.tensor([120 / 127.5 - 1, -1, -1]))
    assert sample["meta"]["path"].endswith("camelyonpatch_level_2_split_valid_x.h5")

    clone = pickle.loads(pickle.dumps(ds))  # after a read in this process: the handle stays behind
    torch.testing.assert_close(clone[3]["image"], sample["image"])
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    labels = torch.cat([batch["label"] for batch in batches])
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.cat([batch["image"] for batch in batches]).shape == (6, 3, 32, 32)


def test_pcam_bad_inputs_name_the_file(tmp_path):
    root = _pcam(tmp_path / "pcam", "train")
    with pytest.raises(DataError, match="missing .*camelyonpatch_level_2_split_test_x.h5"):
        open_(root, "test", format="pcam", on_bad_file="skip")
    (root / "camelyonpatch_level_2_split_test_x.h5.gz").write_bytes(b"")
    with pytest.raises(DataError, match="gunzip it first"):
        open_(root, "test")
    y = root / "camelyonpatch_level_2_split_train_y.h5"
    with h5py.File(y, "w") as f:
        f.create_dataset("labels", data=np.zeros((6, 1, 1, 1), np.uint8))
    with pytest.raises(DataError, match="no dataset 'y'") as err:
        open_(root)
    assert str(y) in str(err.value)
    with h5py.File(y, "w") as f:
        f.create_dataset("y", data=np.zeros((5, 1, 1, 1), np.uint8))
    with pytest.raises(DataError, match=r"expected \[6\] or \[6, 1\]"):
        open_(root)
