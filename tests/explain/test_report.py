"""Per-image report: escaping, self-contained, the five sections, optional parts, PDF."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cfexplain.explain import report as report_mod
from cfexplain.explain.attribution import get_method
from cfexplain.explain.report import write_report
from cfexplain.nn.classifier import ResNetClassifier

EVIL = "<img src=x onerror=alert(1)>"
SECTIONS = (
    "What the model said",
    "Where it looked",
    "What would change its mind",
    "How unusual the image is",
    "Where this came from",
)
SIZE = 16


@pytest.fixture(scope="module")
def parts():
    """A real image, a real guided grad-CAM of a tiny classifier, frames and their probabilities."""
    torch.manual_seed(0)
    model = ResNetClassifier(1, 2, width=4, blocks=(1, 1), stem_stride=1).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, SIZE, SIZE, generator=g) * 2 - 1
    gg = get_method("guided_gradcam")(model).attribute(x, 1)[0]
    frames = torch.stack([x[0] * (1 - t) + t for t in torch.linspace(0, 1, 5)])  # brighten
    with torch.no_grad():
        probs = torch.softmax(model(frames), 1)[:, 1]
        p = float(torch.softmax(model(x), 1)[0, 1])
    return dict(image=x[0], guided_gradcam=gg, frames=frames, probs=probs, p=p)


def _write(tmp_path, parts, **kw):
    args = dict(
        name=EVIL,
        image=parts["image"],
        prediction=1,
        probability=0.83,
        class_names=["healthy", "<b>lesion</b>"],
        guided_gradcam=parts["guided_gradcam"],
        provenance={"run": "runs/<script>alert(2)</script>", EVIL: {"lr": 0.003}},
        pdf="none",
    )
    path = write_report(tmp_path / "r" / "report.html", **{**args, **kw})
    return path, path.read_text(encoding="utf-8")


def test_user_strings_are_escaped_and_the_page_is_self_contained(tmp_path, parts):
    path, page = _write(
        tmp_path,
        parts,
        counterfactual_frames=parts["frames"],
        frame_probs=parts["probs"],
        normative_residual=parts["guided_gradcam"].abs(),
    )
    assert EVIL not in page and "<script" not in page and "<b>lesion" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # shown as text
    assert "&lt;b&gt;lesion&lt;/b&gt;" in page and "&lt;script&gt;alert(2)" in page
    assert 'src="http' not in page and "url(" not in page and "<link" not in page
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 2 + 5 + 1 + 1  # image, evidence, 5 steps, animation, residual
    assert all(s.startswith(("data:image/png;base64,", "data:image/gif;base64,")) for s in srcs)
    first = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert first.size[0] >= SIZE and first.mode == "RGB"
    positions = [page.index(f"<h2>{s}</h2>") for s in SECTIONS]
    assert positions == sorted(positions)  # all five, in reading order
    assert "83%" in page
    assert "Not available" not in page
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # atomic: no temp file left


def test_flipping_steps_are_marked(tmp_path, parts):
    probs = torch.tensor([0.9, 0.7, 0.55, 0.4, 0.1])  # probability of the predicted class
    _, page = _write(tmp_path, parts, counterfactual_frames=parts["frames"], frame_probs=probs)
    assert page.count('<figure class="flip">') == 2  # the two steps below 50%
    # the same steps read as the other class's probability: the marks follow the answer
    _, other = _write(
        tmp_path,
        parts,
        counterfactual_frames=parts["frames"],
        frame_probs=1 - probs,
        frame_target=0,
    )
    assert other.count('<figure class="flip">') == 2


def test_missing_parts_say_so_in_plain_words(tmp_path, parts):
    _, page = _write(tmp_path, parts)
    assert page.count("Not available for this run") == 2
    assert all(f"<h2>{s}</h2>" in page for s in SECTIONS)


def test_inputs_are_validated_by_name(tmp_path, parts):
    with pytest.raises(ValueError, match="frame_probs"):
        _write(tmp_path, parts, counterfactual_frames=parts["frames"], frame_probs=[0.5, 0.4])
    with pytest.raises(ValueError, match="guided_gradcam"):
        _write(tmp_path, parts, guided_gradcam=torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="prediction"):
        _write(tmp_path, parts, prediction=2)
    with pytest.raises(ValueError, match="pdf"):
        _write(tmp_path, parts, pdf="word")


def test_pdf_with_matplotlib_when_no_browser(tmp_path, parts, monkeypatch):
    monkeypatch.setattr(report_mod.shutil, "which", lambda name: None)
    path, _ = _write(
        tmp_path,
        parts,
        pdf="auto",
        name="knee $x$ #1",  # "$" must not be read as maths
        counterfactual_frames=parts["frames"],
        frame_probs=parts["probs"],
    )
    pdf = path.with_suffix(".pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    with pytest.raises(FileNotFoundError, match="chromium"):
        _write(tmp_path, parts, pdf="chromium")


def test_pdf_auto_uses_what_is_installed(tmp_path, parts):
    path, _ = _write(tmp_path, parts, pdf="auto")
    assert path.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html", "report.pdf"]


def test_ordinal_walk_shows_expected_and_most_likely_grade_per_step(tmp_path, parts):
    names = ["KL0", "KL1", "KL2", "KL3", "KL4"]
    grades, argmax = [0.31, 1.2, 2.05, 2.9, 3.7], [0, 1, 2, 3, 4]
    _, page = _write(
        tmp_path,
        parts,
        class_names=names,
        prediction=2,
        counterfactual_frames=parts["frames"],
        frame_probs=parts["probs"],
        frame_grades=grades,
        frame_argmax=argmax,
        pdf="matplotlib",
    )
    caps = re.findall(r"<figcaption>(step \d[^<]*)</figcaption>", page)
    assert caps == [
        f"step {i + 1}: grade {g:.1f} (most likely KL{a})"
        for i, (g, a) in enumerate(zip(grades, argmax))
    ]
    assert "Grade at every step" in page and "from the lowest grade (KL0)" in page
    assert '<figure class="flip">' not in page  # an ordinal walk marks no flips
    assert (tmp_path / "r" / "report.pdf").stat().st_size > 1000
    walk = dict(
        class_names=names,
        prediction=2,
        counterfactual_frames=parts["frames"],
        frame_probs=parts["probs"],
        frame_grades=grades,
    )
    with pytest.raises(ValueError, match="frame_grades and frame_argmax"):
        _write(tmp_path, parts, **walk)
    with pytest.raises(ValueError, match="frame_argmax"):
        _write(tmp_path, parts, **walk, frame_argmax=[0, 1, 2, 3, 7])


def _looked_picture(page: str) -> np.ndarray:
    """The first picture of "Where it looked" (the image itself), decoded to RGB."""
    section = page.split("<h2>Where it looked</h2>", 1)[1]
    b64 = re.search(r'src="data:image/png;base64,([^"]+)"', section).group(1)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_the_region_the_generator_does_not_redraw_is_outlined(tmp_path, parts):
    from cfexplain.explain.guard import READ_DIFFERENTLY, Verdict

    def red(img: np.ndarray) -> np.ndarray:
        return (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)

    _, plain = _write(tmp_path / "a", parts)
    assert not red(_looked_picture(plain)).any() and "red box" not in plain
    verdict = Verdict(READ_DIFFERENTLY, {"evidence_loss": 9.0}, ["evidence_loss 9 > 5"], cell=0)
    _, page = _write(tmp_path / "b", parts, guard=verdict)
    marked = red(_looked_picture(page))
    ys, xs = np.nonzero(marked)  # cell 0 of 4x4: the top-left quarter of each side
    side = marked.shape[0]
    assert ys.min() == 0 and xs.min() == 0
    assert (
        side // 4 - side // 16 <= ys.max() < side // 4
        and side // 4 - side // 16 <= xs.max() < side // 4
    )
    assert "red box: a region the generator does not redraw" in page


def test_attribute_strips_say_in_words_whether_the_answer_changes(tmp_path, parts):
    from cfexplain.explain.gallery import AttributeStrip

    frames, steps = parts["frames"][:3], [-1.0, 0.0, 1.0]
    strips = [
        AttributeStrip("b8.conv0[3] -", frames, steps, [0.2, 0.4, 0.7]),  # crosses 50%
        AttributeStrip("b8.conv0[5] +", frames, steps, [0.90, 0.91, 0.93]),  # barely moves
        AttributeStrip("b4.conv1[9] +", frames, steps, [0.55, 0.75, 0.95]),  # moves, stays above
        AttributeStrip("b4.conv1[2] -", frames, steps, [0.05, 0.2, 0.45]),  # moves, stays below
    ]
    _, page = _write(tmp_path, parts, attributes=strips, frame_target=1)
    notes = re.findall(r'<h3 class="attribute">[^<]*</h3><p class="note">([^<]*)</p>', page)
    assert len(notes) == 4
    assert notes[0].startswith("The model changes its answer") and "20% → 70%" in notes[0]
    assert notes[1].startswith("The model barely reacts") and "90% → 93%" in notes[1]
    assert "stays above 50%" in notes[2] and "does not take the model off" in notes[2]
    assert "stays below 50%" in notes[3] and "does not bring the model to" in notes[3]
    assert all("&lt;b&gt;lesion" in n for n in notes)  # the class name, escaped
