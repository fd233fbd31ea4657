"""The wheel ships conf/ as cfexplain.conf: a non-editable install composes from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_non_editable_install_composes_config_elsewhere(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "cfexplain" / "conf" / "config.yaml").is_file()
    assert (target / "cfexplain" / "conf" / "dataset" / "knee.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import cfexplain, pathlib;"
        "from hydra import compose, initialize_config_module;"
        "initialize_config_module(config_module='cfexplain.conf', version_base='1.3').__enter__();"
        "cfg = compose(config_name='config', overrides=['+dataset=knee']);"
        "print(pathlib.Path(cfexplain.__file__).parent);"
        "print(cfg.data.name, cfg.data.resolution, cfg.classifier.model._target_)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    assert out[0].startswith(str(target)), (
        f"imported cfexplain from {out[0]}, not the installed copy"
    )
    assert out[1] == "knee 64 cfexplain.nn.classifier.ResNetClassifier"
