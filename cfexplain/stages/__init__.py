"""The stage chain. Each stage is a module ``cfexplain.stages.<name>`` with ``fit(cfg, run) -> Artifact``.

A stage is available once its module exists; the chain runs the available ones in order and
says which it passed over. ``keys`` are the config sections whose values (with the artifacts
of ``inputs``) decide whether a finished stage can be reused.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    keys: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    # Read when the run has them finished; their fingerprints join the stage's when present.
    optional: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"

    @property
    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    @property
    def fit(self) -> Callable:
        return importlib.import_module(self.module).fit


CHAIN: tuple[Stage, ...] = (
    Stage("classifier", keys=("data", "classifier", "seed")),
    Stage("generator", keys=("data", "generator", "seed"), inputs=("classifier",)),
    Stage("encoder", keys=("data", "encoder", "seed"), inputs=("classifier", "generator")),
    Stage("normative", keys=("data", "normative", "seed")),
    Stage(
        "direction",
        keys=("data", "direction", "seed"),
        inputs=("classifier", "generator", "encoder"),
    ),
    Stage(
        "guard",
        keys=("data", "guard", "seed"),
        inputs=("classifier", "generator", "encoder"),
        optional=("normative",),
    ),
    # Not in the default `stages`: the built-in segmentation model for sensitivity analysis.
    Stage("segmentation", keys=("data", "segmentation", "seed")),
    # Not in the default `stages`: the report writer (explain methods=[...,report]).
    Stage("reporter", keys=("data", "reporter", "seed")),
)
STAGES = {s.name: s for s in CHAIN}
