"""Budgets are work, not time: every shipped preset stops its stages on kimg or steps, so the
same seed gives the same weights on any machine, however busy."""

from __future__ import annotations

from importlib import resources

import pytest

from tests.conftest import compose_config

PRESETS = sorted(
    p.name.removesuffix(".yaml")
    for p in resources.files("cfexplain.conf").joinpath("preset").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_stop_on_work_not_on_the_clock(preset):
    cfg = compose_config("+dataset=knee", f"preset={preset}")
    assert cfg.generator.max_minutes is None, f"preset={preset}: generator.max_minutes is set"
    assert cfg.encoder.max_minutes is None, f"preset={preset}: encoder.max_minutes is set"
    assert float(cfg.generator.kimg) > 0 and int(cfg.encoder.steps) > 0


def test_the_presets_are_all_checked():
    assert {"cpu_demo", "cpu_32", "gpu_256", "smoke"} <= set(PRESETS)
