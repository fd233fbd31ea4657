"""Gallery drawing: colours, strip, GIF, plot, HTML escaping and the streaming writer."""

from __future__ import annotations

import csv
import io
import json

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image

from cfexplain.explain.gallery import (
    ROWS_FILE,
    GalleryWriter,
    Row,
    colorize,
    gif_bytes,
    page_html,
    plot_png,
    row_html,
    strip_image,
    write_row_files,
)

EVIL = "<img src=x onerror=alert(1)>.png"


def make_row(name: str = "a.png", counterfactual: bool = True, k: int = 5, true: str = "0") -> Row:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 16, 16, generator=g) * 2 - 1
    row = Row(
        name=name,
        image=x,
        prob=0.3,
        pred="healthy",
        true=true,
        maps={
            "saliency": (torch.randn(1, 16, 16, generator=g), True),
            "normative": (torch.rand(1, 16, 16, generator=g), False),
        },
        metrics={"monotonicity": 0.9},
    )
    if counterfactual:
        row.reconstruction = x * 0.9
        row.frames = torch.rand(k, 1, 16, 16, generator=g) * 2 - 1
        row.lambdas = [float(v) for v in torch.linspace(-2, 2, k)]
        row.frame_probs = [float(v) for v in torch.linspace(0.1, 0.9, k)]
        row.flip = 3
        row.difference = row.frames[3, :1] - row.reconstruction
    return row


def test_the_region_the_generator_does_not_redraw_is_outlined_on_the_input(tmp_path):
    from cfexplain.explain.guard import READ_DIFFERENTLY, Verdict

    def red(img: np.ndarray) -> np.ndarray:
        return (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)

    row = make_row()  # 16 px: the 4x4 grid's cells are 4 px
    plain = np.asarray(
        Image.open(tmp_path / write_row_files(row, tmp_path / "i" / "0", "t")["input"])
    )
    assert not red(plain).any()  # gray input, nothing outlined without a named cell
    row.guard = Verdict(READ_DIFFERENTLY, {"evidence_loss": 9.0}, ["evidence_loss ..."], cell=7)
    files = write_row_files(row, tmp_path / "i" / "1", "t", size=32)
    marked = red(np.asarray(Image.open(tmp_path / files["input"]).convert("RGB")))
    ys, xs = np.nonzero(marked)  # cell 7: row 2, column 4 -> pixels 4-7 x 12-15, upscaled 2x
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (8, 15, 24, 31)
    assert not marked[10:14, 26:30].any()  # an outline, not a filled box
    strip = np.asarray(strip_image(row, size=32).convert("RGB"))
    assert red(strip[:, :34]).any() and not red(strip[:, 34:]).any()  # the input tile alone


def test_colours_diverge_around_zero_and_unsigned_starts_black():
    m = torch.tensor([[[[-2.0, 0.0, 2.0]]]])
    rgb = colorize(m, signed=True)[0, 0]
    neg, zero, pos = rgb.astype(int)
    assert neg[2] > neg[0] and pos[0] > pos[2], "blue for negative, red for positive"
    assert abs(zero[0] - zero[2]) < 10 and zero.min() > 200, "zero is near white"
    u = colorize(torch.tensor([[[[0.0, 1.0]]]]), signed=False)[0, 0]
    assert u[0].max() < 10 and u[1].sum() > u[0].sum()


def test_strip_gif_and_plot_are_real_images():
    row = make_row(k=5)
    strip = strip_image(row, size=32)
    # input, reconstruction, 5 frames, difference, 2 maps
    assert strip.size[0] == 10 * (32 + 2)
    assert strip_image(make_row(counterfactual=False), size=32).size[0] == 3 * (32 + 2)
    frames = iio.imread(io.BytesIO(gif_bytes(row.frames, size=32)), index=None, extension=".gif")
    assert frames.shape[0] == 2 * 5 - 2  # forward then back without repeating the ends
    assert frames.shape[1:3] == (32, 32)
    # the first GIF frame is the first counterfactual frame (upscaled 2x, gray)
    first = frames[0] if frames.ndim == 3 else frames[0][..., 0]
    expected = ((row.frames[0, 0].numpy() + 1) * 127.5).round()
    assert np.abs(first[::2, ::2].astype(float) - expected).max() <= 1
    png = Image.open(io.BytesIO(plot_png(row.lambdas, row.frame_probs, row.flip, "sick")))
    assert png.format == "PNG" and png.size[0] > 100


def test_every_string_from_files_and_config_is_escaped(tmp_path):
    row = make_row(name=EVIL, true="<b>x</b>")
    files = write_row_files(row, tmp_path / "images" / "00000", target="t", size=16)
    html_row = row_html(row, files, 0)
    assert "<img src=x" not in html_row
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html_row
    assert "<b>x</b>" not in html_row and "&lt;b&gt;x&lt;/b&gt;" in html_row
    page = page_html({"run": "<script>alert(2)</script>"}, html_row, {"true": ["<b>x</b>"]})
    assert "<script>alert(2)" not in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the page's own inline script
    for src in files["frames"] + [files["input"], files["gif"], files["plot"], files["difference"]]:
        assert (tmp_path / src).is_file(), src


def test_writer_streams_rows_csv_and_summary(tmp_path):
    w = GalleryWriter(tmp_path / "g", target="sick", size=16)
    w.add_batch([make_row("a.png"), make_row("b.png", true="1")], {"run": "r"})
    # after the first batch the page already holds its rows
    page = (tmp_path / "g" / "index.html").read_text()
    assert page.count('<section class="row"') == 2
    w.add_batch([make_row("c.png", counterfactual=False)], {"run": "r"}, notes=["a note"])
    index = w.close({"run": "r"}, {"flip_rate": 0.5}, notes=["a note"])
    page = index.read_text()
    assert page.count('<section class="row"') == 3
    assert 'data-flip="yes"' in page and 'data-flip="n/a"' in page and "a note" in page
    assert not (tmp_path / "g" / ROWS_FILE).exists()
    with open(tmp_path / "g" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert rows[0]["flip_index"] == "3" and rows[0]["flip_lambda"] == "1.0"
    assert rows[2]["flip_index"] == "" and rows[0]["monotonicity"] == "0.9"
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary == {"flip_rate": 0.5, "images": 3}
    # no reference to anything outside the gallery folder, nothing from the network
    assert "http://" not in page and "https://" not in page
    columns, table = w.table()
    assert columns[:6] == ["name", "true", "pred", "prob", "input", "strip"]
    assert {"frame_0", "frame_4", "flip_index", "saliency", "monotonicity"} <= set(columns)
    assert [r[0] for r in table] == ["a.png", "b.png", "c.png"]
    assert table[2][columns.index("frame_0")] is None  # no counterfactual for c.png
    assert table[0][columns.index("saliency")] == tmp_path / "g" / "images/00000/map_saliency.png"


def attribute_row(name: str = "a.png") -> Row:
    """A counterfactual row with three attribute strips of five frames."""
    from cfexplain.explain.gallery import AttributeStrip

    g = torch.Generator().manual_seed(1)
    row = make_row(name)
    row.attributes = [
        AttributeStrip(
            label=f"b8.conv0[{k}]+ -> sick",
            frames=torch.rand(5, 1, 16, 16, generator=g) * 2 - 1,
            steps=[-1.0, -0.5, 0.0, 0.5, 1.0],
            probs=[0.1 * k, 0.2, 0.3, 0.4, 0.45 + 0.1 * k],  # k = 0 stays under 0.5
        )
        for k in range(3)
    ]
    return row


def test_attribute_strips_in_files_page_csv_and_table(tmp_path):
    from cfexplain.explain.gallery import attribute_strip_image

    row = attribute_row()
    assert attribute_strip_image(row.attributes[0], size=32).size[0] == 5 * (32 + 2)
    w = GalleryWriter(tmp_path / "g", target="sick", size=16)
    w.add_batch([row, make_row("b.png", counterfactual=False)], {"run": "r"})
    w.close({"run": "r"}, {})
    folder = tmp_path / "g" / "images" / "00000"
    for k in range(3):
        with Image.open(folder / f"attribute_{k}.png") as im:
            assert im.size == (5 * (16 + 2), 16 + 26)
    assert not (tmp_path / "g" / "images" / "00001" / "attribute_0.png").exists()
    page = (tmp_path / "g" / "index.html").read_text()
    assert page.count('class="attribute"') == 3
    assert 'data-attribute="b8.conv0[2]+ -&gt; sick"' in page and "p 0.20 → 0.65" in page
    # the decision changes where a frame crosses 0.5 from the reconstruction's side
    assert page.count('data-flips="1"') == 2 and page.count('data-flips="0"') == 1
    assert page.count("flips the decision") == 2
    with open(tmp_path / "g" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["attribute_1_name"] == "b8.conv0[1]+ -> sick"
    assert json.loads(rows[0]["attribute_2_probs"]) == [0.2, 0.2, 0.3, 0.4, 0.65]
    assert rows[1]["attribute_0_name"] == ""
    columns, table = w.table()
    assert {"attribute_0", "attribute_0_name", "attribute_0_probs"} <= set(columns)
    assert table[0][columns.index("attribute_2")] == folder / "attribute_2.png"
    assert table[1][columns.index("attribute_0")] is None


def make_ordinal_row(name: str = "kl.png", k: int = 5) -> Row:
    row = make_row(name, k=k)
    row.frame_grades = [0.3, 1.1, 2.0, 2.9, 3.7][:k]
    row.frame_argmax = [0, 1, 2, 3, 4][:k]
    row.grade_names = ["KL0", "KL1", "KL2", "KL3", "KL4"]
    row.recon_grade = 1.4
    row.metrics = {"grade_rises": 1.0, "grade_monotonicity": 1.0}
    return row


def test_ordinal_row_shows_grades_plot_and_table_columns(tmp_path):
    w = GalleryWriter(tmp_path / "g", target="KL4", size=16)
    w.add_batch([make_ordinal_row(), make_row("binary.png")], {"run": "r"})
    w.close({"run": "r"}, {})
    page = (tmp_path / "g" / "index.html").read_text()
    first = page[page.index('data-name="kl.png"') : page.index('data-name="binary.png"')]
    caps = [c for c in first.split("<figcaption>")[1:] if c.startswith("λ=")]
    assert [c.split("</figcaption>")[0] for c in caps] == [
        "λ=-2.0 E=0.30 KL0",
        "λ=-1.0 E=1.10 KL1",
        "λ=+0.0 E=2.00 KL2",
        "λ=+1.0 E=2.90 KL3",
        "λ=+2.0 E=3.70 KL4",
    ]
    assert (
        "grade vs λ" in first and "grade vs λ" not in page[page.index('data-name="binary.png"') :]
    )
    plot = Image.open(tmp_path / "g" / "images" / "00000" / "grade_plot.png")
    assert plot.format == "PNG" and plot.size[0] > 100
    assert not (tmp_path / "g" / "images" / "00001" / "grade_plot.png").exists()
    # The strip says the same under every frame (ASCII).
    strip = strip_image(make_ordinal_row(), size=32)
    assert strip.size[0] == 10 * (32 + 2)
    # W&B table read back: grades and argmax as JSON lists, the plot as an image path.
    columns, table = w.table()
    assert {"frame_grades", "frame_argmax", "grade_plot", "grade_rises"} <= set(columns)
    kl = dict(zip(columns, table[0]))
    assert json.loads(kl["frame_grades"]) == [0.3, 1.1, 2.0, 2.9, 3.7]
    assert json.loads(kl["frame_argmax"]) == [0, 1, 2, 3, 4]
    assert kl["grade_plot"] == tmp_path / "g" / "images/00000/grade_plot.png"
    assert kl["grade_plot"].is_file()
    binary = dict(zip(columns, table[1]))
    assert binary["frame_grades"] is None and binary["grade_plot"] is None
    with open(tmp_path / "g" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["grade_rises"] == "1.0"
