"""The wheel ships conf/ as cfexplain.conf: a non-editable install composes from anywhere, built
without a setuptools warning."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_non_editable_install_composes_config_elsewhere(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--verbose",  # the build backend's warnings
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # setuptools warns before it refuses: a deprecated field (the license table, refused from
    # 2027-02-18) or a config folder it would not ship as a package.
    warned = [line.strip() for line in built.stderr.splitlines() if "BuildBackendWarning" in line]
    assert not warned, warned
    conf = target / "cfexplain" / "conf"
    shipped = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}
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
