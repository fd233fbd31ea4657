"""Atomic writes, self-describing weights, and stage folders that a failure cannot corrupt."""

from __future__ import annotations

import json

import pytest
import torch

from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.utils.artifacts import (
    Artifact,
    ArtifactError,
    commit_stage,
    fingerprint,
    load_model,
    save_model,
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
