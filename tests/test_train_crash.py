"""The training chain after crashes: kills inside writes, killed commits, damaged files.

A kill is injected where it matters (a wrapper around ``artifacts.atomic_write``), never left
to timing. A kill that must leave a temporary file runs in a fresh interpreter and SIGKILLs
itself inside the write (``python -m tests.test_train_crash``); one that lands between writes
is an exception raised in this process, which leaves the same folders behind.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cfexplain.utils.artifacts as artifacts
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact, load_model
from cfexplain.utils.cli import ConfigError
from tests.conftest import ROOT, compose_config

CLASSIFIER = "stages=[classifier]"
WEIGHTS = "classifier.safetensors"


class Killed(BaseException):
    """Stands for SIGKILL in this process: nothing catches it on the way out."""


def _config(runs: Path, *overrides: str):
    return compose_config(
        "+dataset=knee", "preset=smoke", "logger=none", f"runs_dir={runs}", "device=cpu", *overrides
    )


def _temp_files(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")
    )


def _kill_after(monkeypatch, name: str, when: int = 1) -> None:
    """Raise :class:`Killed` right after the ``when``-th write of a file called ``name``."""
    real, seen = artifacts.atomic_write, []

    def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
        out = real(path, write)
        if Path(path).name == name:
            seen.append(path)
            if len(seen) == when:
                raise Killed(f"after writing {path}")
        return out

    monkeypatch.setattr(artifacts, "atomic_write", atomic_write)


def _killed_run(runs: Path, *overrides: str, kill: Callable[[pytest.MonkeyPatch], None]) -> None:
    """Run the classifier stage until ``kill`` is set off; then stop injecting."""
    with pytest.MonkeyPatch.context() as mp:
        kill(mp)
        with pytest.raises(Killed):
            run_chain(_config(runs, CLASSIFIER, *overrides))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- kills in writes


def _sigkill_inside_write(target: str, mode: str, runs: str) -> None:
    """Run the classifier stage and SIGKILL this process inside the first write of ``target``,
    after the temporary file is written and before it is renamed. ``mode=own-temp`` also leaves
    a ``.tmp*`` file, as safetensors' writer does when it is killed."""
    real = artifacts.atomic_write

    def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
        if Path(path).name != target:
            return real(path, write)

        def killed(tmp: str) -> None:
            write(tmp)
            if mode == "own-temp":
                Path(tmp).with_name(".tmpk1ll3d").write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)

        return real(path, killed)

    artifacts.atomic_write = atomic_write
    run_chain(_config(Path(runs), CLASSIFIER))


@pytest.mark.parametrize(
    "target, mode",
    [
        ("config.yaml", "ours"),
        ("state.pt", "ours"),
        (WEIGHTS, "ours"),
        (WEIGHTS, "own-temp"),
        ("artifact.json", "ours"),
    ],
)
def test_a_kill_inside_any_write_leaves_no_temp_file_in_the_finished_stage(
    tmp_path, caplog, target, mode
):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.test_train_crash", target, mode, str(runs)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    partial = runs / "knee" / ".classifier.partial"
    left = _temp_files(partial)
    assert left and all(target in n or n.startswith(".tmp") for n in left), left
    with caplog.at_level("INFO", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER))["classifier"]
    assert "left by an interrupted write" in caplog.text
    assert _temp_files(runs) == [] and not partial.exists()
    art.verify()
    # byte for byte what an uninterrupted run writes
    ref = run_chain(_config(tmp_path / "ref", CLASSIFIER))["classifier"]
    assert art.path("weights").read_bytes() == ref.path("weights").read_bytes()


# ----------------------------------------------------------------------------- weights files


def test_two_identical_trainings_write_identical_weight_files(tmp_path):
    a, b = (
        run_chain(_config(tmp_path / "runs", CLASSIFIER, f"experiment={e}"))["classifier"]
        for e in ("a", "b")
    )
    assert a.path("weights").read_bytes() == b.path("weights").read_bytes()
    mode = stat.S_IMODE(a.path("weights").stat().st_mode)
    assert mode == stat.S_IMODE((a.dir / "config.yaml").stat().st_mode)  # as any other file


def test_weights_are_0644_under_umask_022(tmp_path):
    code = (
        "import stat, sys, torch; from cfexplain.utils.artifacts import save_model;"
        "p = save_model(sys.argv[1], torch.nn.Linear(2, 2), 'torch.nn.Linear', {});"
        "print(oct(stat.S_IMODE(p.stat().st_mode)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "w.safetensors")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
        check=True,
    )
    assert r.stdout.strip() == "0o644"


# ----------------------------------------------------------------------------- force=true


def test_a_killed_force_run_resumes_its_own_partial_only(tmp_path, caplog):
    runs = tmp_path / "runs"
    _killed_run(runs, "force=true", kill=lambda mp: _kill_after(mp, "state.pt"))
    with caplog.at_level("INFO", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER, "force=true"))["classifier"]
    assert art.info["resumed_from_step"] > 0
    ref = run_chain(_config(tmp_path / "ref", CLASSIFIER))["classifier"]
    a, b = load_file(str(art.path("weights"))), load_file(str(ref.path("weights")))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a partial of another fingerprint is not resumed, and the log says so
    _killed_run(runs, "force=true", kill=lambda mp: _kill_after(mp, "state.pt"))
    caplog.clear()
    with caplog.at_level("INFO", logger="cfexplain"):
        other = run_chain(_config(runs, CLASSIFIER, "force=true", "classifier.optimizer.lr=0.01"))
    assert "resumed_from_step" not in other["classifier"].info
    assert "starting afresh" in caplog.text and art.fingerprint in caplog.text


# ----------------------------------------------------------------------------- commits


def _interrupt_commit(monkeypatch, final: Path) -> None:
    """Raise :class:`Killed` once ``final`` is renamed aside, before the new stage is moved in."""
    real = os.replace

    def replace(src, dst) -> None:
        real(src, dst)
        if Path(dst) == final.with_name(f".{final.name}.old"):
            raise Killed("between the renames of the commit")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("partial_state", ["complete", "damaged"])
def test_a_commit_killed_between_its_renames_is_repaired_at_start_up(
    tmp_path, caplog, partial_state
):
    runs = tmp_path / "runs"
    first = run_chain(_config(runs, CLASSIFIER))["classifier"]
    final, partial = first.dir, first.dir.with_name(".classifier.partial")
    _killed_run(runs, "force=true", kill=lambda mp: _interrupt_commit(mp, final))
    assert not final.exists() and final.with_name(".classifier.old").is_dir()
    second = Artifact.load(partial)
    if partial_state == "damaged":
        _flip_byte(partial / WEIGHTS)
    with caplog.at_level("INFO", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER))["classifier"]
    if partial_state == "complete":
        assert "finished an interrupted commit" in caplog.text
        assert art.created == second.created
    else:
        assert "rolled back an interrupted commit" in caplog.text and WEIGHTS in caplog.text
        assert art.created == first.created
    assert "up to date" in caplog.text  # then the chain goes on as usual
    assert not final.with_name(".classifier.old").exists()


# ----------------------------------------------------------------------------- damaged files


def test_a_flipped_byte_in_finished_weights_is_caught_and_retrained(tmp_path, caplog):
    runs = tmp_path / "runs"
    first = run_chain(_config(runs, CLASSIFIER))["classifier"]
    weights = first.path("weights")
    _flip_byte(weights)
    with pytest.raises(artifacts.ArtifactError, match=f"^{weights}: sha256"):
        load_model(weights)
    # a stage that reads it stops with one line, before it starts a partial folder
    with pytest.raises(ConfigError, match=f"needs the 'classifier' stage first.*{WEIGHTS}"):
        run_chain(_config(runs, "stages=[generator]"))
    assert not (runs / "knee" / ".generator.partial").exists()
    time.sleep(1.1)  # `created` has one-second resolution: a retrained record must differ
    with caplog.at_level("INFO", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER))["classifier"]
    assert "damaged files" in caplog.text and WEIGHTS in caplog.text
    assert WEIGHTS in art.info["retrained_because"]
    assert art.created != first.created
    art.verify()
    load_model(art.path("weights"))


def test_an_unreadable_artifact_record_is_named_and_retrained(tmp_path, caplog):
    runs = tmp_path / "runs"
    first = run_chain(_config(runs, CLASSIFIER))["classifier"]
    record = first.dir / "artifact.json"
    record.write_bytes(record.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER))["classifier"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(record) in line and "retraining" in line
    assert "artifact.json" in art.info["retrained_because"]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_state_is_moved_aside_and_the_stage_starts_over(tmp_path, caplog, damage):
    runs = tmp_path / "runs"
    _killed_run(runs, kill=lambda mp: _kill_after(mp, "state.pt", when=2))
    state = runs / "knee" / ".classifier.partial" / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    with caplog.at_level("INFO", logger="cfexplain"):
        art = run_chain(_config(runs, CLASSIFIER))["classifier"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(state) in warnings[0] and "state.pt.corrupt" in warnings[0]
    assert "resumed_from_step" not in art.info
    ref = run_chain(_config(tmp_path / "ref", CLASSIFIER))["classifier"]
    a, b = load_file(str(art.path("weights"))), load_file(str(ref.path("weights")))
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    _sigkill_inside_write(*sys.argv[1:])
