"""``python -m cfexplain.attributes run=runs/<experiment>``: StyleSpace attributes of a trained run.

AttFind (Lang et al. 2021) on the run's G and classifier, without retraining either: every style
coordinate of ``limit`` images (the ``split`` encoded through E, or G samples) is moved by ±``shift``
of its std and the classifier's change is recorded; per class the ``k`` coordinates that raise
the class most, each over the images the ones before it did not flip. Writes
``runs/<experiment>/attributes/`` (or ``out=``), swapped in whole: ``attributes.safetensors``,
``attributes.csv`` and ``attributes.md`` (layer, channel, sign, effect, share flipped alone),
``summary.json`` and ``artifact.json``; ``explain methods=[...,attributes]`` and ``evaluate`` read it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cfexplain.explain.attributes import TABLE_COLUMNS, find_for_run, table_markdown
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import Artifact, staged_dir, write_json, write_text
from cfexplain.utils.cli import (
    POSITIVE_INT,
    ConfigError,
    Number,
    check_number,
    run_command,
    tracked,
)

__all__ = ["ConfigError", "attributes", "main"]

log = logging.getLogger("cfexplain")


# The config's numbers, checked before anything is written (batch_size: by TrainedRun.open).
NUMBERS = (
    *(Number(k, **POSITIVE_INT) for k in ("limit", "k", "std_samples")),
    Number("screen", null=True, **POSITIVE_INT),  # null: every coordinate scored exactly
    Number("refine_steps", int, 0),
    Number("shift", low=0.0, above=True),  # in stds of each coordinate
)


def attributes(cfg: DictConfig) -> Path:
    """Find the attributes ``cfg`` describes; return the path of their table."""
    run = TrainedRun.open(cfg)
    needs = ["generator"] + (["encoder"] if str(cfg.source) == "encoded" else [])
    for stage in needs:
        run.stage_dir(stage)  # a ConfigError naming the run and the missing stage
    for field in NUMBERS:
        check_number(cfg, field)
    out = Path(cfg.out) if cfg.out else run.output_dir("attributes")
    out = out.expanduser().resolve()
    start = time.time()
    with staged_dir(out) as work:
        with tracked("attributes", work, cfg, run.name) as tracking:
            found, effects = find_for_run(
                run,
                source=str(cfg.source),
                split=str(cfg.split),
                limit=int(cfg.limit),
                k=int(cfg.k),
                shift=float(cfg.shift),
                layers=str(cfg.layers),
                std_samples=int(cfg.std_samples),
                batch=int(cfg.batch_size),
                seed=int(cfg.seed),
                screen=None if cfg.screen is None else int(cfg.screen),
                refine_steps=int(cfg.refine_steps),
            )
            found.info["seconds"] = round(time.time() - start, 1)
            found.save(work)
            write_text(work / "attributes.md", table_markdown(found.attributes, run.classes))
            summary = {
                "run": str(run.dir),
                **found.info,
                "style_coordinates": found.layout.size,
                "attributes": [
                    a.__dict__ | {"label": a.label(run.classes)} for a in found.attributes
                ],
            }
            write_json(work / "summary.json", summary)
            Artifact(
                "attributes",
                work,
                fingerprint=f"{run.artifact('generator').fingerprint}-{run.artifact('classifier').fingerprint}",
                metrics={
                    f"class{a.cls}/rank{a.rank}/flip_share": a.flip_share for a in found.attributes
                },
                files={"attributes": "attributes.safetensors", "table": "attributes.csv"},
                inputs={s: run.artifact(s).fingerprint for s in ("classifier", *needs)},
                info=found.info,
            ).write()
            rows = [
                [getattr(a, c) if c != "class" else run.classes[a.cls] for c in TABLE_COLUMNS]
                for a in found.attributes
            ]
            tracking.log_table("attributes/table", list(TABLE_COLUMNS), rows)
    log.info(
        f"[attributes] {found.info['images']} images x {found.info['coordinates_scored']} "
        f"coordinates in {time.time() - start:.0f} s → {out}"
    )
    print(table_markdown(found.attributes, run.classes), end="")
    return out / "attributes.csv"


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="attributes")
def main(cfg: DictConfig) -> None:
    run_command("attributes", attributes, cfg, "attributes")


if __name__ == "__main__":
    main()
