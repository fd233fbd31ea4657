"""W&B offline runs hold what was logged (read back from the run's own files); wandb stays lazy."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from wandb.proto import wandb_internal_pb2 as pb

from cfexplain.utils.tracking import Run, resolve_mode

BLOCK = 32 * 1024


def read_wandb_records(path: Path) -> list[pb.Record]:
    """Records of a ``run-*.wandb`` file: a 7-byte W&B header, then LevelDB-log framed protobufs."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records


def finished_run_records(wandb_dir: Path) -> list[pb.Record]:
    """Records of the one ``run-*.wandb`` in ``wandb_dir``, once its exit record is there: wandb's
    service process writes the log behind the client."""
    (log,) = wandb_dir.glob("run-*.wandb")
    records: list = []
    for _ in range(120):
        records = read_wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.25)
    return records


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_offline_run_holds_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = Run(
        "classifier",
        tmp_path / "stage",
        logger={"name": "wandb", "mode": "offline", "project": "t", "dir": str(tmp_path)},
        config={"lr": 0.1},
        experiment="exp",
    )
    for step in range(1, 4):
        run.log({"train/loss": 1.0 / step}, step=step)
    run.log_images("examples", torch.rand(2, 1, 8, 8) * 2 - 1, ["a", "b"], step=3)
    run.summary({"test/auc": 0.97})
    wandb_dir = run.wandb_dir
    run.finish()
    assert run.notes["wandb_mode"] == "offline"
    files = list(wandb_dir.glob("run-*.wandb"))
    assert len(files) == 1, list(wandb_dir.iterdir())
    records = finished_run_records(wandb_dir)  # wandb's service writes behind the client
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses == pytest.approx([1.0, 0.5, 1 / 3])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= _items(r.summary.update)
    assert summary["test/auc"] == pytest.approx(0.97)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (header.run_group, header.job_type) == ("exp", "classifier")
    assert _items(header.config.update)["lr"] == 0.1
    assert len(list((wandb_dir / "files" / "media" / "images").glob("examples_*.png"))) == 2
    # the stage folder keeps its own copy of the scalars
    lines = [json.loads(x) for x in (tmp_path / "stage" / "log.jsonl").read_text().splitlines()]
    assert [x["train/loss"] for x in lines] == pytest.approx([1.0, 0.5, 1 / 3])


def test_logger_none_writes_jsonl_only(tmp_path):
    run = Run("classifier", tmp_path / "s", logger={"name": "none"})
    run.log({"a": torch.tensor(2.0)}, step=1)
    run.finish()
    assert run.wandb_dir is None
    assert json.loads((tmp_path / "s" / "log.jsonl").read_text()) == {"step": 1, "a": 2.0}
    assert not (tmp_path / "wandb").exists()


def test_non_main_rank_logs_nothing(tmp_path):
    run = Run(
        "classifier", tmp_path / "s", logger={"name": "wandb", "mode": "offline"}, is_main=False
    )
    run.log({"a": 1.0}, step=1)
    run.finish()
    assert not (tmp_path / "s").exists()


def test_online_without_login_falls_back_offline_loudly(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    mode, why = resolve_mode("online")
    assert mode == "offline" and "login" in why
    assert resolve_mode("offline") == ("offline", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("online") == ("online", None)
    with pytest.raises(ValueError, match="logger.mode"):
        monkeypatch.delenv("WANDB_API_KEY")
        resolve_mode("sometimes")


def test_import_cfexplain_does_not_import_wandb():
    code = "import sys, cfexplain, cfexplain.train, cfexplain.stages.classifier, cfexplain.utils.tracking; print('wandb' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"


def test_rewind_drops_the_rows_after_the_checkpoint_step(tmp_path):
    run = Run("classifier", tmp_path / "s", logger={"name": "none"})
    run.log({"info": 1.0})  # no step: kept, it comes before any step
    for step in range(1, 7):
        run.log({"loss": float(step)}, step=step)
    run.rewind(4)
    rows = [json.loads(x) for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert rows == [{"step": None, "info": 1.0}] + [
        {"step": s, "loss": float(s)} for s in range(1, 5)
    ]
    run.log({"loss": 5.5}, step=5)  # the resumed run logs on
    rows = [json.loads(x) for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [None, 1, 2, 3, 4, 5]
    run.rewind(100)  # nothing after it: unchanged
    assert len((tmp_path / "s" / "log.jsonl").read_text().splitlines()) == 6
    Run("x", tmp_path / "empty", logger={"name": "none"}).rewind(3)  # no log yet: nothing to do
    assert not (tmp_path / "empty" / "log.jsonl").exists()


def test_rewind_is_atomic(tmp_path, monkeypatch):
    run = Run("classifier", tmp_path / "s", logger={"name": "none"})
    for step in range(1, 5):
        run.log({"loss": float(step)}, step=step)
    before = (tmp_path / "s" / "log.jsonl").read_bytes()

    def killed(fd: int) -> None:  # the rewritten log is complete but not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        run.rewind(2)
    monkeypatch.undo()
    assert (tmp_path / "s" / "log.jsonl").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["log.jsonl"]
