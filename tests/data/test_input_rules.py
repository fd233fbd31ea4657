"""Input rules with no silent wrong results: transparency, 16-bit depth, small images, empty
class folders, labels outside the declared classes (issue #16, section 4)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cfexplain.data.readers import DataError, decode_image, open_dataset, sample_bits
from tests.data.test_readers import gray, save_png


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere ...
    rgba[:2, ..., 3] = 255  # ... opaque in the top half, transparent below
    path = save_png(tmp_path / "cut.png", rgba, mode="RGBA")
    pixels, eight_bit = decode_image(path)
    assert eight_bit and pixels.shape == (4, 4, 3)
    np.testing.assert_allclose(pixels[:2, :, 0], 200 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(pixels[2:], -1.0)  # transparent: black, not red


def test_half_transparent_gray_alpha_is_blended_on_black(tmp_path):
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 200
    la[..., 1] = 255
    la[0, 0, 1] = 51  # one pixel at 20 % opacity
    path = save_png(tmp_path / "la.png", la, mode="LA")
    pixels, _ = decode_image(path)
    assert pixels.shape == (4, 4, 1)
    assert pixels[0, 0, 0] == pytest.approx(40 / 127.5 - 1, abs=1e-6)  # 200 * 0.2
    assert pixels[1, 1, 0] == pytest.approx(200 / 127.5 - 1, abs=1e-6)


def test_a_uniform_alpha_draws_no_shape_and_is_dropped(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[..., 3] = 128  # the same everywhere
    pixels, _ = decode_image(save_png(tmp_path / "flat.png", rgba, mode="RGBA"))
    np.testing.assert_allclose(pixels[..., 1], 1.0)


def test_a_palette_with_a_transparent_entry_is_composited(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.info["transparency"] = 1  # the white entry is transparent
    path = tmp_path / "palette.png"
    im.save(path, transparency=1)
    pixels, _ = decode_image(path)
    np.testing.assert_allclose(pixels, -1.0)  # transparent white on black, and a black pixel


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_12_bit_image_in_16_bits_uses_its_own_depth(tmp_path, suffix):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 65).clip(0, 4095)
    ramp[-1, -1] = 4095  # a 12-bit detector's white
    path = tmp_path / f"detector{suffix}"
    Image.fromarray(ramp).save(path)
    pixels, eight_bit = decode_image(path)
    assert not eight_bit
    assert pixels.max() == pytest.approx(1.0)  # white, not 4095 / 65535 (almost black)
    assert pixels[0, 0, 0] == pytest.approx(-1.0)
    assert sample_bits(ramp) == 12


def test_sample_bits_picks_the_smallest_usual_depth():
    depths = [sample_bits(np.array([v])) for v in (0, 255, 256, 1023, 1024, 4095, 16383, 16384)]
    assert depths == [8, 8, 10, 10, 12, 12, 14, 16]


def test_images_far_smaller_than_the_resolution_are_warned_about(tmp_path, caplog):
    save_png(tmp_path / "train/0/tiny.png", gray(10, 6, 6))
    save_png(tmp_path / "train/0/fine.png", gray(10, 40, 40))
    with caplog.at_level(logging.WARNING, logger="cfexplain"):
        ds = open_dataset(tmp_path, "train", resolution=32, channels=1)
    assert len(ds) == 2  # read, not dropped
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 of 2 images" in warned[0]
    assert str(tmp_path / "train/0/tiny.png") in warned[0] and "fine.png" not in warned[0]
    assert "data.resolution=32" in warned[0]


def test_an_empty_class_folder_is_named(tmp_path):
    save_png(tmp_path / "train/healthy/a.png", gray(10))
    (tmp_path / "train/sick").mkdir()
    (tmp_path / "train/sick/readme.txt").write_text("images to come")
    with pytest.raises(DataError, match="empty class folder") as err:
        open_dataset(tmp_path, "train", resolution=8, channels=1)
    assert str(err.value).startswith(str(tmp_path / "train/sick"))


def test_a_csv_label_outside_the_declared_classes_is_named(tmp_path):
    save_png(tmp_path / "a.png", gray(10))
    save_png(tmp_path / "b.png", gray(20))
    (tmp_path / "manifest.csv").write_text(
        "path,label,split\na.png,healthy,train\nb.png,unknown,train\n"
    )
    with pytest.raises(DataError, match=r"line 3: label 'unknown' is outside the classes") as err:
        open_dataset(tmp_path, "train", resolution=8, channels=1, classes=["healthy", "sick"])
    assert str(tmp_path / "manifest.csv") in str(err.value)
    ds = open_dataset(tmp_path, "train", resolution=8, channels=1, classes=["healthy", "unknown"])
    assert ds.class_names == ["healthy", "unknown"] and ds.labels.tolist() == [0, 1]


def test_classes_declared_in_the_config_reach_the_reader(tmp_path):
    from cfexplain.data import build_dataset
    from tests.conftest import compose_config

    save_png(tmp_path / "train/b/x.png", gray(10))
    save_png(tmp_path / "train/a/y.png", gray(10))
    cfg = compose_config(
        "+dataset=folder", f"data.root={tmp_path}", "preset=smoke", "data.classes=[b,a]"
    )
    ds = build_dataset(cfg.data, "train")
    assert ds.class_names == ["b", "a"]
    torch.testing.assert_close(torch.tensor(ds.labels), torch.tensor([1, 0]))
