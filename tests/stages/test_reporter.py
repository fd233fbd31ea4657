"""Reporter stage: smoke run and loading, a dataset without reports, redrawn factors, kill then
resume."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict

from cfexplain.data import build_dataset
from cfexplain.nn.reporter import ReporterNet, load_reporter
from cfexplain.stages import reporter as stage
from cfexplain.train import run_chain
from tests.conftest import killed_and_resumed

SMOKE = ("stages=[reporter]",)


def test_smoke_run_writes_weights_vocab_and_metrics(smoke_cfg):
    cfg = smoke_cfg(*SMOKE)
    art = run_chain(cfg)["reporter"]
    assert art.dir.name == "reporter" and art.metrics["steps"] == 6
    vocab = json.loads(art.path("vocab").read_text())
    assert vocab[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and "osteophytes" in vocab
    assert art.info["vocab_size"] == len(vocab)
    for key in ("test/bleu4", "test/finding_accuracy", "test/accuracy/marker"):
        assert 0.0 <= art.metrics[key] <= 1.0
    assert "reference: " in art.path("examples").read_text()
    model = load_reporter(art.dir)
    assert isinstance(model, ReporterNet) and not model.training and model.vocab == vocab
    x = torch.stack([build_dataset(cfg.data, "test")[i]["image"] for i in range(2)])
    dec = model.greedy(x, max_len=5)
    assert len(dec) == 2 and all(d.attention.shape[1:] == (8, 8) for d in dec)  # 32 px / 4


def test_missing_reports_and_config_are_named(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*SMOKE)
    with open_dict(cfg):
        del cfg["reporter"]
    with pytest.raises(ValueError, match=r"reporter=lstm"):
        run_chain(cfg)
    ds = build_dataset(smoke_cfg().data, "train")
    monkeypatch.setattr(type(ds), "__getitem__", lambda self, i: {"meta": {}})
    with pytest.raises(ValueError, match=r"split train: 96 images.* sample 0 has no report"):
        stage._reports(ds)


def test_redrawn_factors_are_uniform_or_from_the_marginal_and_named_when_wrong(smoke_cfg):
    ds = build_dataset(smoke_cfg().data, "train")
    drawn = stage._Redrawn(ds, {"osteophyte": [0.01, 0.02], "jsw_lateral": "marginal"}, 0)
    own = [ds.params(i)[0] for i in range(len(ds))]
    marginal = {f["jsw_lateral"] for f in own}
    got = [drawn[i]["meta"]["factors"] for i in range(12)]
    assert all(0.01 <= f["osteophyte"] <= 0.02 for f in got)
    # Another sample's value (its own distribution), not this sample's, and the same each time.
    assert all(f["jsw_lateral"] in marginal for f in got)
    assert sum(f["jsw_lateral"] != o["jsw_lateral"] for f, o in zip(got, own)) >= 10
    again = stage._Redrawn(ds, {"osteophyte": [0.01, 0.02], "jsw_lateral": "marginal"}, 0)
    assert again[3]["meta"]["factors"] == got[3]
    for bad in ({"jsw_lateral": "shuffle"}, {"nope": [0, 1]}, {"osteophyte": [0.1]}):
        with pytest.raises(ValueError, match=r"reporter\.redraw\.\w+=.*'marginal'"):
            stage._Redrawn(ds, bad, 0)


def test_every_file_of_the_stage_is_written_atomically(smoke_cfg, monkeypatch):
    from cfexplain.utils import artifacts

    real, written = artifacts.atomic_write, set()

    def recording(path, write):
        written.add(str(path))
        return real(path, write)

    monkeypatch.setattr(artifacts, "atomic_write", recording)
    art = run_chain(smoke_cfg(*SMOKE))["reporter"]
    # log.jsonl is the run's append-only log; everything else went through a temp file.
    files = {p.name for p in art.dir.iterdir() if p.is_file() and p.name != "log.jsonl"}
    assert {"reporter.safetensors", "vocab.json", "examples.txt", "artifact.json"} <= files
    partial = art.dir.parent / ".reporter.partial"
    assert {str(partial / name) for name in files} <= written


@pytest.mark.slow
def test_kill_then_resume_gives_the_same_weights(tmp_path):
    ref, art = killed_and_resumed(tmp_path, "reporter", 16)
    assert art.metrics["test/bleu4"] == ref.metrics["test/bleu4"]
    assert art.path("vocab").read_text() == ref.path("vocab").read_text()
