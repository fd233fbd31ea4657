"""Atomic writes, self-describing weights, and stage folders that a failure cannot corrupt."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

import cfexplain.utils.artifacts as artifacts
from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.utils.artifacts import (
    Artifact,
    ArtifactError,
    atomic_write,
    clean_temp_files,
    commit_stage,
    fingerprint,
    load_model,
    load_state,
    recover_commit,
    save_model,
    save_tensors,
    staged_dir,
    torch_load,
    torch_save,
    write_json,
)


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.pt"
    torch_save({"x": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        torch_save({"x": Boom()}, path)
    assert torch.equal(torch_load(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_state_loads_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch_load(tmp_path / "evil.pt")


def test_save_model_rebuilds_without_hydra(tmp_path):
    m = ResNetClassifier(in_channels=3, num_classes=5, width=4, blocks=[1, 1]).eval()
    kwargs = {"in_channels": 3, "num_classes": 5, "width": 4, "blocks": [1, 1]}
    save_model(tmp_path / "m.safetensors", m, "cfexplain.nn.classifier.ResNetClassifier", kwargs)
    m2 = load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(m(x), m2(x))


def test_commit_replaces_finished_stage_only_when_complete(tmp_path):
    final, partial = tmp_path / "classifier", tmp_path / ".classifier.partial"
    Artifact("classifier", final, "old", metrics={"auc": 0.9}).write()
    partial.mkdir()
    with pytest.raises(ArtifactError, match="unfinished"):
        commit_stage(partial, final)
    assert Artifact.load(final).fingerprint == "old"
    Artifact("classifier", partial, "new").write()
    commit_stage(partial, final)
    assert Artifact.load(final).fingerprint == "new" and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier"]


def test_artifact_load_errors_name_the_file(tmp_path):
    with pytest.raises(ArtifactError, match=str(tmp_path)):
        Artifact.load(tmp_path)
    write_json(tmp_path / "artifact.json", {"status": "running"})
    with pytest.raises(ArtifactError, match="running"):
        Artifact.load(tmp_path)
    (tmp_path / "artifact.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="artifact.json"):
        Artifact.load(tmp_path)
    a = Artifact("x", tmp_path, "f", files={"w": "w.bin"})
    a.write()
    assert json.loads((tmp_path / "artifact.json").read_text())["files"] == {"w": "w.bin"}
    with pytest.raises(ArtifactError, match="no file 'v'"):
        Artifact.load(tmp_path).path("v")


# ----------------------------------------------------------------------------- safetensors


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_save_tensors_is_deterministic_loadable_and_readable(tmp_path):
    tensors = {
        "w": torch.randn(3, 5),
        "b": torch.arange(7),
        "h": torch.ones(3, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    meta = {f"key{i}": str(i) for i in range(12)}  # many keys: an unsorted header shows
    a = save_tensors(tmp_path / "a.safetensors", tensors, meta)
    b = save_tensors(tmp_path / "b.safetensors", dict(reversed(tensors.items())), meta)
    assert a.read_bytes() == b.read_bytes()
    loaded = load_file(str(a))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == meta
    assert stat.S_IMODE(a.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_a_writer_that_replaces_our_temp_file_still_gets_the_normal_mode(tmp_path):
    def own_temp(tmp: str) -> None:  # what safetensors.save_file does: its own 0600 file
        mine = Path(tmp).with_name(".tmpabc")
        mine.write_bytes(b"x")
        os.chmod(mine, 0o600)
        os.replace(mine, tmp)

    path = atomic_write(tmp_path / "w.safetensors", own_temp)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


# ----------------------------------------------------------------------------- temp files


def test_clean_temp_files_removes_only_what_killed_writes_left(tmp_path):
    keep = ["state.pt", ".fingerprint", "log.jsonl", "sub/w.safetensors", ".tmpdir/keep.txt"]
    stale = [".state.pt.x1y2.tmp", ".artifact.json.abc.tmp", ".tmpq9z8", "sub/.w.safetensors.k.tmp"]
    for rel in keep + stale:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    removed = clean_temp_files(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted(stale)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(keep)


def test_commit_drops_temp_files(tmp_path):
    final, partial = tmp_path / "classifier", tmp_path / ".classifier.partial"
    Artifact("classifier", partial, "new").write()
    (partial / ".state.pt.abc.tmp").write_bytes(b"half")
    (partial / ".tmpxyz").write_bytes(b"half")
    commit_stage(partial, final)
    assert sorted(p.name for p in final.iterdir()) == ["artifact.json"]


# ----------------------------------------------------------------------------- checksums


def _stage_with_weights(folder: Path) -> Path:
    m = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1])
    kwargs = {"in_channels": 1, "num_classes": 2, "width": 4, "blocks": [1]}
    path = save_model(
        folder / "w.safetensors", m, "cfexplain.nn.classifier.ResNetClassifier", kwargs
    )
    Artifact("classifier", folder, "f", files={"weights": "w.safetensors"}).write()
    return path


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_artifact_records_size_and_sha256_of_its_files(tmp_path):
    path = _stage_with_weights(tmp_path)
    record = json.loads((tmp_path / "artifact.json").read_text())["checksums"]
    assert record == {
        "w.safetensors": {
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    }
    Artifact.load(tmp_path).verify()
    load_model(path)


def test_a_flipped_byte_is_a_one_line_error_naming_the_file(tmp_path):
    path = _stage_with_weights(tmp_path)
    _flip_byte(path, path.stat().st_size - 3)
    with pytest.raises(ArtifactError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "sha256" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ArtifactError, match="w.safetensors"):
        Artifact.load(tmp_path).verify()
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="bytes"):
        load_model(path)
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Artifact.load(tmp_path).verify()


def test_weights_replaced_through_save_model_keep_their_record_true(tmp_path):
    path = _stage_with_weights(tmp_path)
    other = ResNetClassifier(in_channels=1, num_classes=2, width=8, blocks=[1])
    kwargs = {"in_channels": 1, "num_classes": 2, "width": 8, "blocks": [1]}
    save_model(path, other, "cfexplain.nn.classifier.ResNetClassifier", kwargs)
    Artifact.load(tmp_path).verify()
    assert load_model(path).stem[0].out_channels == 8
    _flip_byte(path, path.stat().st_size - 3)  # by hand, not through save_model: caught
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(path)


def test_weights_without_a_record_load_as_before(tmp_path):
    m = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1])
    path = save_model(
        tmp_path / "m.safetensors",
        m,
        "cfexplain.nn.classifier.ResNetClassifier",
        {"in_channels": 1, "num_classes": 2, "width": 4, "blocks": [1]},
    )
    load_model(path)  # no artifact.json beside it
    write_json(tmp_path / "artifact.json", {"stage": "x", "files": {}})  # an older record
    load_model(path)


def test_unreadable_artifact_records_are_artifact_errors(tmp_path):
    for text in (
        "[1, 2]",
        '{"status": "complete", "stage": "x"}',
        '{"status": "complete", "extra": 1}',
    ):
        (tmp_path / "artifact.json").write_text(text)
        with pytest.raises(ArtifactError, match="artifact.json"):
            Artifact.load(tmp_path)
    (tmp_path / "artifact.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="artifact.json"):
        Artifact.load(tmp_path)


# ----------------------------------------------------------------------------- state files


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_state_is_moved_aside(tmp_path, caplog, damage):
    path = torch_save({"x": torch.ones(1000)}, tmp_path / "state.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with caplog.at_level("WARNING", logger="cfexplain"):
        assert load_state(path) is None
    assert not path.exists() and (tmp_path / "state.pt.corrupt").is_file()
    (line,) = [r.getMessage() for r in caplog.records]
    assert str(path) in line and "\n" not in line
    assert load_state(path) is None  # none there: start over, quietly
    torch_save({"x": torch.ones(3)}, path)
    assert torch.equal(load_state(path)["x"], torch.ones(3))


# ----------------------------------------------------------------------------- full disk


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 375296 vs 375184"),
        RuntimeError(
            "[enforce fail at inline_container.cc:605] . PytorchStreamWriter failed writing file data/0: file write failed"
        ),
    ],
)
def test_full_disk_is_named_and_the_old_file_kept(tmp_path, monkeypatch, error):
    path = torch_save({"x": torch.ones(2)}, tmp_path / "state.pt")

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"PK half")
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ArtifactError) as e:
        torch_save({"x": torch.zeros(2)}, path)
    assert str(e.value) == f"no space left on device while writing {path}"
    monkeypatch.undo()
    assert torch.equal(torch_load(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_other_write_errors_stay_as_they_are(tmp_path):
    def fails(tmp: str) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(tmp_path / "x", fails)


SMALL_DISK = 256 * 1024


class _SmallDiskOs:
    """``os`` as ``cfexplain.utils.artifacts`` sees it on a disk of ``SMALL_DISK`` bytes: once a
    writer has filled the temporary file, a folder over that size fails with ENOSPC, as the
    kernel's write would have."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __getattr__(self, name: str):
        return getattr(os, name)

    def chmod(self, path, mode) -> None:
        used = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        if used > SMALL_DISK:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        os.chmod(path, mode)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 256 KiB disk: a real tmpfs where this process may mount one (root, as in CI), else the
    same limit enforced in our writer (``_SmallDiskOs``)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mnt)],
            capture_output=True,
        )
        mounted = r.returncode == 0
    if not mounted:
        monkeypatch.setattr(artifacts, "os", _SmallDiskOs(mnt))
    try:
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


def test_the_emulated_small_disk_fails_as_a_full_tmpfs(tmp_path, monkeypatch):
    """The fallback of ``small_disk`` on machines that cannot mount: the same error, the old
    file kept (checked here whether or not the real tmpfs is available)."""
    monkeypatch.setattr(artifacts, "os", _SmallDiskOs(tmp_path))
    state = torch_save({"x": torch.ones(10)}, tmp_path / "state.pt")
    with pytest.raises(ArtifactError, match=f"^no space left on device while writing {state}$"):
        torch_save({"x": torch.zeros(200_000)}, state)
    assert torch.equal(torch_load(state)["x"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_full_tmpfs_is_named_and_the_old_files_kept(small_disk):
    state = torch_save({"x": torch.ones(10)}, small_disk / "state.pt")
    weights = save_tensors(small_disk / "w.safetensors", {"x": torch.ones(10)})
    big = torch.zeros(200_000)  # 800 kB: more than the disk holds
    with pytest.raises(ArtifactError, match=f"^no space left on device while writing {state}$"):
        torch_save({"x": big}, state)
    with pytest.raises(ArtifactError, match=f"^no space left on device while writing {weights}$"):
        save_tensors(weights, {"x": big})
    with pytest.raises(ArtifactError, match="no space left on device while writing .*big.json"):
        write_json(small_disk / "big.json", {"x": "y" * 400_000})
    assert torch.equal(torch_load(state)["x"], torch.ones(10))
    assert torch.equal(load_file(str(weights))["x"], torch.ones(10))
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.pt", "w.safetensors"]


# ----------------------------------------------------------------------------- repairs


def _interrupted_commit(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A commit killed between its renames: ``.classifier.old`` and a complete partial."""
    final, partial = tmp_path / "classifier", tmp_path / ".classifier.partial"
    Artifact("classifier", final, "old").write()
    _stage_with_weights(partial)
    final.rename(tmp_path / ".classifier.old")
    return final, partial, tmp_path / ".classifier.old"


def test_recover_commit_finishes_a_complete_partial(tmp_path):
    final, partial, old = _interrupted_commit(tmp_path)
    (partial / ".w.safetensors.abc.tmp").write_bytes(b"x")
    assert "finished" in recover_commit(final, partial)
    assert Artifact.load(final).fingerprint == "f" and not old.exists() and not partial.exists()
    assert not list(final.glob(".*tmp"))
    assert recover_commit(final, partial) is None


@pytest.mark.parametrize("damage", ["no artifact.json", "flipped byte"])
def test_recover_commit_rolls_back_to_the_old_stage(tmp_path, damage):
    final, partial, old = _interrupted_commit(tmp_path)
    if damage == "no artifact.json":
        (partial / "artifact.json").unlink()
    else:
        _flip_byte(partial / "w.safetensors", 100)
    assert "rolled back" in recover_commit(final, partial)
    assert Artifact.load(final).fingerprint == "old" and not old.exists() and partial.exists()


def test_recover_commit_deletes_an_old_folder_beside_a_finished_stage(tmp_path):
    final, partial = tmp_path / "classifier", tmp_path / ".classifier.partial"
    Artifact("classifier", final, "new").write()
    (tmp_path / ".classifier.old").mkdir()
    assert "deleted" in recover_commit(final, partial)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier"]


# ----------------------------------------------------------------------------- staged_dir


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()
    }


def test_staged_dir_swaps_in_whole_and_replaces_an_older_folder_whole(tmp_path):
    out = tmp_path / "gallery"
    (out / "img_7").mkdir(parents=True)
    (out / "img_7" / "a.png").write_text("old")
    (tmp_path / "neighbour.txt").write_text("n")
    with staged_dir(out) as work:
        assert work == tmp_path / ".gallery.partial" and work.is_dir() and not any(work.iterdir())
        assert _tree(out) == {"img_7/a.png": "old"}  # untouched while the block runs
        (work / "img_0").mkdir()
        (work / "img_0" / "a.png").write_text("new")
        write_json(work / "summary.json", {"n": 1})
    assert _tree(out) == {"img_0/a.png": "new", "summary.json": '{\n  "n": 1\n}\n'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "neighbour.txt"]


def test_staged_dir_error_leaves_the_old_folder_and_removes_nothing_else(tmp_path):
    out = tmp_path / "gallery"
    out.mkdir()
    (out / "summary.json").write_text("old")
    (tmp_path / "neighbour.txt").write_text("n")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as work:
            (work / "half.png").write_text("x")
            raise KeyboardInterrupt
    assert _tree(out) == {"summary.json": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "neighbour.txt"]
    with staged_dir(tmp_path / "fresh") as work:  # no older folder: just moved in
        (work / "a").write_text("a")
    assert _tree(tmp_path / "fresh") == {"a": "a"}


def test_staged_dir_recovers_what_a_kill_left(tmp_path):
    out = tmp_path / "gallery"
    # killed inside the block: a stale partial beside the old folder
    out.mkdir()
    (out / "summary.json").write_text("old")
    (tmp_path / ".gallery.partial").mkdir()
    (tmp_path / ".gallery.partial" / "stale.png").write_text("x")
    with staged_dir(out) as work:
        assert not any(work.iterdir())
        (work / "summary.json").write_text("new")
    assert _tree(out) == {"summary.json": "new"}
    # killed between the swap's renames: the partial was complete, so it goes in
    out.rename(tmp_path / ".gallery.partial")
    (tmp_path / ".gallery.old").mkdir()
    with pytest.raises(RuntimeError, match="after the repair"):
        with staged_dir(out):
            raise RuntimeError("stop after the repair")
    assert _tree(out) == {"summary.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery"]
    # killed between them with no partial left: the old folder goes back
    out.rename(tmp_path / ".gallery.old")
    with pytest.raises(RuntimeError, match="after the repair"):
        with staged_dir(out):
            raise RuntimeError("stop after the repair")
    assert _tree(out) == {"summary.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery"]


def test_staged_dir_refuses_a_file(tmp_path):
    (tmp_path / "out.html").write_text("f")
    with pytest.raises(ArtifactError, match="not a folder"):
        with staged_dir(tmp_path / "out.html"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html"]


def test_artifact_records_what_its_weights_depend_on(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Artifact("classifier", tmp_path, "f").write()
    finally:
        torch.set_num_threads(threads)
    v = Artifact.load(tmp_path).versions
    assert v["threads"] == "1"
    assert v["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert v["torch"] == torch.__version__
