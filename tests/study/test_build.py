"""Building a study: the same seed gives the same folder byte for byte; nothing in a reader's
folder names a truth; a failed build leaves nothing; the command line of make and score."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from cfexplain.study import build
from cfexplain.study.__main__ import hydra_argv
from cfexplain.study.build import KEY_FILE, png_chunks
from cfexplain.utils.cli import ConfigError
from tests.conftest import run_cli
from tests.study.conftest import make_study, simulated_answers

NEUTRAL = re.compile(r"^[0-9a-f]{12}\.png$")


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def study(study_run, tmp_path_factory) -> Path:
    return make_study(study_run, tmp_path_factory.mktemp("b") / "study")


def test_same_seed_same_study_byte_for_byte(study, study_run, tmp_path):
    again = make_study(study_run, tmp_path / "again")
    assert files(again) == files(study)
    other = make_study(study_run, tmp_path / "other", seed=4)
    key, key4 = (json.loads((s / KEY_FILE).read_text()) for s in (study, other))
    assert key["study_id"] != key4["study_id"]
    orders = [[e["item"] for e in r["turing"]] for r in key["readers"]]
    assert orders[0] != orders[1] or orders[0] != [e["item"] for e in key4["readers"][0]["turing"]]
    assert sorted(orders[0]) == list(range(8))


def test_reader_folders_hold_no_truth(study):
    key = json.loads((study / KEY_FILE).read_text())
    assert sorted(p.name for p in study.iterdir()) == [KEY_FILE, "reader-1", "reader-2"]
    assert {i["truth"] for i in key["items"]} == {"real", "generated"}
    for reader in ("reader-1", "reader-2"):
        names = sorted(files(study / reader))
        names.remove("index.html")
        assert len(names) == 8 + sum(1 + len(c["probs"]) for c in key["counterfactuals"])
        assert all(n.startswith("images/") and NEUTRAL.match(n[7:]) for n in names), names
        for n in names:
            chunks = [t for t, _ in png_chunks((study / reader / n).read_bytes())]
            assert set(chunks) <= {b"IHDR", b"PLTE", b"IDAT", b"IEND"}, (n, chunks)
        page = (study / reader / "index.html").read_text()
        for word in ("truth", "z_seed", "test_index", "realism", key["study_id"][::-1]):
            assert word not in page
        spec = json.loads(re.search(r'id="study">(.*?)</script>', page, re.S).group(1))
        assert set(spec["turing"][0]) == {"id", "src"}
        assert spec["study"] == key["study_id"] and spec["reader"] == reader
    # the Turing reals and the counterfactual inputs are different test images
    reals = {i["source"]["test_index"] for i in key["items"] if i["truth"] == "real"}
    assert not reals & {c["source"]["test_index"] for c in key["counterfactuals"]}


def test_a_failed_build_leaves_nothing(study_run, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_reader", boom)
    with pytest.raises(KeyboardInterrupt):
        make_study(study_run, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_and_bad_counts_are_refused(study, study_run, tmp_path):
    with pytest.raises(ConfigError, match="exists already"):
        make_study(study_run, study)
    with pytest.raises(ConfigError, match="^n_fake=0: expected an integer >= 1$"):
        make_study(study_run, tmp_path / "s", n_fake=0)
    with pytest.raises(ConfigError, match="^readers='abc': expected an integer >= 1$"):
        make_study(study_run, tmp_path / "s", readers="abc")
    with pytest.raises(ConfigError, match="^batch_size=0: expected an integer >= 1$"):
        make_study(study_run, tmp_path / "s", batch_size=0)
    with pytest.raises(ConfigError, match="^time_limit_s='5s': expected a number of seconds >= 0$"):
        make_study(study_run, tmp_path / "s", time_limit_s="5s")
    with pytest.raises(ConfigError, match=r"^target=KL3: expected a class index \(0 to 1\)"):
        make_study(study_run, tmp_path / "s", target="KL3")
    with pytest.raises(ConfigError, match="test split has only"):
        make_study(study_run, tmp_path / "s", n_real=10_000)


def test_subcommand_words_become_overrides():
    assert hydra_argv(["make", "runs/knee", "readers=2"]) == [
        "command=make",
        "run='runs/knee'",
        "readers=2",
    ]
    assert hydra_argv(["score", "st", "a.json", "b's.json", "logger=none"]) == [
        "command=score",
        "study='st'",
        "answers=['a.json','b\\'s.json']",
        "logger=none",
    ]
    assert hydra_argv(["command=score", "study=x"]) == ["command=score", "study=x"]


def test_make_and_score_commands(study_run, tmp_path):
    out = tmp_path / "study"
    r = run_cli(
        "cfexplain.study",
        "make",
        f"run={study_run}",
        "readers=2",
        "n_real=3",
        "n_fake=3",
        "n_cf=0",
        f"out={out}",
        "device=cpu",
        "logger=none",
    )
    assert r.returncode == 0, r.stderr
    assert f"study: {out}" in r.stdout
    key = json.loads((out / KEY_FILE).read_text())
    answers = tmp_path / "answers"
    answers.mkdir()
    for reader, right in ((0, 4), (1, 6)):
        (answers / f"{reader}.json").write_text(json.dumps(simulated_answers(key, reader, right)))
    r = run_cli(
        "cfexplain.study", "score", str(out), str(answers / "0.json"), str(answers / "1.json")
    )
    assert r.returncode == 0, r.stderr
    assert (out / "report" / "index.html").is_file() and (out / "report" / "readers.csv").is_file()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["pooled"]["correct"] == 10 and summary["pooled"]["n"] == 12
    assert (out / "wandb").is_dir()  # W&B offline by default, beside the report
    bad = simulated_answers(key, 0, 1)
    bad["study"] = "feedfacefeedface"
    (answers / "other.json").write_text(json.dumps(bad))
    r = run_cli(
        "cfexplain.study", "score", f"study={out}", f"answers={answers}/other.json", "logger=none"
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("cfexplain.study: ") and "other.json" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("cfexplain.study", "logger=none")
    assert r.returncode == 2 and "make run=" in r.stderr
    r = run_cli(
        "cfexplain.study", "score", str(out), str(answers / "0.json"), "realism_bins=0",
        "logger=none",
    )  # fmt: skip
    assert r.stderr.strip() == "cfexplain.study: realism_bins=0: expected an integer >= 1"


def test_strip_png_drops_text_and_keeps_pixels():
    info = PngImagePlugin.PngInfo()
    info.add_text("label", "generated")
    info.add_itxt("Comment", "real, test #3")
    buf = io.BytesIO()
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info, dpi=(72, 72))
    assert b"generated" in buf.getvalue()
    stripped = build.strip_png(buf.getvalue())
    assert [t for t, _ in png_chunks(stripped)] == [b"IHDR", b"IDAT", b"IEND"]
    assert b"generated" not in stripped and b"real" not in stripped
    assert (np.array(Image.open(io.BytesIO(stripped))) == pixels).all()
    # what the study writes has no metadata to begin with, and decodes to the image
    x = torch.linspace(-1, 1, 64).view(1, 8, 8)
    png = build.png_bytes(x)
    assert [t for t, _ in png_chunks(png)] == [b"IHDR", b"IDAT", b"IEND"]
    assert np.array(Image.open(io.BytesIO(png))).shape == (8, 8)


def test_realism_score_inside_and_outside_the_real_manifold():
    ref = torch.tensor([[float(i), 0.0] for i in range(10)], dtype=torch.float64)
    # radii (3rd neighbour): 3 at the ends, 2 inside; a point near a reference point scores
    # far above 1, one at distance 10 from the nearest scores 3/10 at best
    scores = build.realism_scores(
        ref, torch.tensor([[4.0, 0.1], [-10.0, 0.0]], dtype=torch.float64)
    )
    assert scores[0] > 1 and scores[0] == pytest.approx(2 / 0.1)
    assert scores[1] == pytest.approx(3 / 10)
