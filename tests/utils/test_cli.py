"""The commands' check of the user's values against the types of their defaults."""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from cfexplain.utils.cli import ConfigError, check_types
from tests.conftest import run_cli


def _composed(name: str, *overrides: str):
    with initialize_config_module(config_module="cfexplain.conf", version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("inspect", "class_max.lr=abc", "class_max.lr='abc': expected a number"),
        ("sensitivity", "resolution=[64]", "resolution=[64]: expected a number"),
        (
            "explain",
            "methods=gradcam",
            "methods='gradcam': expected a list, e.g. methods=[gradcam]",
        ),
        ("explain", "params=abc", "params='abc': expected a mapping"),
        ("inspect", "layers=stem", "layers='stem': expected a list, e.g. layers=[stem]"),
        ("evaluate", "randomisation.layers=fc", "randomisation.layers='fc': expected a list"),
        (
            "config",
            "generator.metrics.fixed_features=yes",
            "fixed_features='yes': expected true or false",
        ),
        (
            "config",
            "generator.ada.fixed_p=0.2 generator.glr=true",
            "generator.glr=true: expected a number",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_what_the_field_takes(name, override, message):
    overrides = override.split()
    extra = ["+dataset=knee"] if name == "config" else []
    cfg = _composed(name, *extra, *overrides)
    keys = [o.split("=")[0] for o in overrides]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_types(cfg, keys, _composed(name, *extra))


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "generator.kimg=0.5",
            "generator.glr=1",
            "generator.ada.fixed_p=0.3",
        ],  # int for a float, a float for an int
        ["classifier.epochs=null", "stages=[classifier]", "experiment=123", "seed=7"],
        ["generator.metrics.fixed_features=false", "data.task=kl"],
    ],
)
def test_values_a_field_takes_pass(overrides):
    cfg = _composed("config", "+dataset=knee", "preset=smoke", *overrides)
    check_types(
        cfg,
        [o.split("=")[0] for o in overrides],
        _composed("config", "+dataset=knee", "preset=smoke"),
    )


def test_target_takes_a_name_and_a_null_default_takes_anything():
    cfg = _composed("explain", "target=KL3", "limit=abc", "lambdas=[0,1]")
    check_types(cfg, ["target", "lambdas"], _composed("explain"))  # limit: its own check
    sens = _composed("sensitivity", "target=KL3", "classes=[a,b]", "out=x")
    check_types(sens, ["target", "classes", "out"], _composed("sensitivity"))


@pytest.mark.parametrize(
    ("command", "args", "line"),
    [
        (
            "cfexplain.train",
            ["+dataset=knee", "stages=classifier", "runs_dir=RUNS"],
            "cfexplain.train: stages='classifier': expected a list, e.g. stages=[classifier]",
        ),
        (
            "cfexplain.inspect",
            ["run=RUN", "class_max.lr=abc"],
            "cfexplain.inspect: class_max.lr='abc': expected a number",
        ),
        (
            "cfexplain.sensitivity",
            ["run=RUN", "transforms=rotation"],
            "cfexplain.sensitivity: transforms='rotation': expected a list, e.g. transforms=[rotation]",
        ),
        (
            "cfexplain.study",
            ["make", "RUN", "n_real=[3]"],
            "cfexplain.study: n_real=[3]: expected a number",
        ),
    ],
)
def test_the_commands_print_one_line_and_write_nothing(tmp_path, command, args, line):
    args = [
        a.replace("RUNS", str(tmp_path / "runs")).replace("RUN", str(tmp_path / "x")) for a in args
    ]
    r = run_cli(command, *args, "logger=none", cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == line
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert written == []  # train's Hydra log of the attempt (runs/knee/logs/) aside


def test_group_choices_and_values_of_the_right_type_reach_the_command(tmp_path):
    """The check composes the defaults with the same config groups (a preset, a dataset): a
    field only the dataset has is checked, and values of the right type pass on to the
    command, which then names the unknown stage itself."""
    common = ("+dataset=knee", "preset=smoke", f"runs_dir={tmp_path / 'runs'}", "logger=none")
    bad = run_cli("cfexplain.train", *common, "data.shortcut_rate=often", cwd=tmp_path, timeout=120)
    assert bad.stderr.strip() == "cfexplain.train: data.shortcut_rate='often': expected a number"
    good = run_cli(
        "cfexplain.train",
        *common,
        "generator.kimg=0.5",
        "seed=3",
        "stages=[nope]",
        cwd=tmp_path,
        timeout=120,
    )
    assert good.returncode == 2, good.stderr
    assert good.stderr.strip().startswith("cfexplain.train: stages: unknown ['nope']")


def _documented_command_lines() -> list[tuple[str, list[str]]]:
    """``(config name, key=value overrides)`` of every ``python -m cfexplain.<command>`` line in
    the README whose values are written out (lines with placeholders such as ``<s>`` skipped)."""
    configs = {"train": "config", "study": "study"}
    configs |= {c: c for c in ("explain", "evaluate", "inspect", "sensitivity", "attributes")}
    text = (Path(__file__).parents[2] / "README.md").read_text()
    lines = []
    for command, rest in re.findall(
        r"python -m cfexplain\.(\w+)([^`\n]*(?:\n(?!\n)[^`\n]*)*)", text
    ):
        if command not in configs:
            continue
        try:
            words = shlex.split(rest.split("#")[0].replace("\n", " "))
        except ValueError:
            continue
        args = [w for w in words if "=" in w and not re.search(r"[<>$|]|\.\.\.", w)]
        lines.append((configs[command], [a for a in args if not a.startswith("-")]))
    return lines


def test_the_readme_command_lines_pass_the_type_check():
    """What the README tells users to type is never refused by the check."""
    groups = {p.name for p in resources.files("cfexplain.conf").iterdir() if p.is_dir()}
    checked = 0
    for name, args in _documented_command_lines():
        try:
            cfg = _composed(name, *args)
        except Exception:  # a line that is not a whole command (a fragment of prose)
            continue
        parsed = OverridesParser.create().parse_overrides(args)
        structural = [o.input_line for o in parsed if o.key_or_group in groups or o.is_delete()]
        keys = [o.key_or_group for o in parsed if o.input_line not in structural]
        check_types(cfg, keys, _composed(name, *structural))
        checked += 1
    assert checked >= 40  # the README's command lines were found and composed
