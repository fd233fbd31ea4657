"""``python -m cfexplain.inspect run=runs/<experiment>``: the model structure of a trained run.

Sections (``what=``): first-layer ``filters``; ``feature_maps`` of chosen layers for chosen
images with the share of dead maps per layer; ``embeddings`` of the classifier's penultimate
features (and of E(x) when the run has an encoder) by PCA, t-SNE and UMAP, with k-NN outliers;
``class_max`` in input space and through G; ``units``, the DeepMiner-style unit report with its
editable ``runs/<experiment>/inspect/units.csv``. Written into
``runs/<experiment>/inspect/<timestamp>/`` (or ``out=``) as ``index.html`` with PNGs beside it
and ``summary.json``, and to W&B (offline by default).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cfexplain.inspect.page import fmt, page_html
from cfexplain.inspect.sections import SECTIONS, WHAT, Context
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import write_json, write_text
from cfexplain.utils.cli import ConfigError, image_limit, run_command, tracked, whole_number

__all__ = ["ConfigError", "inspect", "main"]

log = logging.getLogger("cfexplain")


# ----------------------------------------------------------------------------- command

# The config's counts and their least values, checked before a folder is made (batch_size:
# by TrainedRun.open).
COUNTS = {
    "max_maps": 1,
    "image_px": 8,
    "embeddings.k": 1,
    "embeddings.outliers": 0,
    "class_max.starts": 1,
    "class_max.steps": 1,
    "class_max.jitter": 0,
    "class_max.blur_every": 0,
    "units.top": 1,
    "units.patches": 1,
}


def _check_counts(cfg: DictConfig) -> None:
    """A one-line ConfigError naming the first count of ``cfg`` that is not a whole number
    at least its least value (``limit`` and ``units.patch_px`` may also be null)."""
    image_limit(cfg.limit)
    for field, low in COUNTS.items():
        whole_number(field, OmegaConf.select(cfg, field), low)
    if cfg.units.patch_px is not None:
        whole_number("units.patch_px", cfg.units.patch_px)


def inspect(cfg: DictConfig) -> Path:
    """Write the page that ``cfg`` describes; return the path of its ``index.html``."""
    trained = TrainedRun.open(cfg)
    run_dir = trained.dir
    what = [str(w) for w in cfg.what]
    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise ConfigError(f"what={what}: choose from {list(WHAT)}")
    _check_counts(cfg)
    out = Path(cfg.out) if cfg.out else trained.output_dir("inspect", stamped=True)
    out = out.expanduser().resolve()
    for sub in ("maps", "embeddings", "class_max", "units"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tracked("inspect", out, cfg, run_dir.name) as run:
        ctx = Context(cfg, trained, out, run)
        header: dict[str, Any] = {
            "run": str(run_dir),
            "classifier": ctx.art.info.get("model", ""),
            "classifier test AUC": fmt(ctx.art.metrics.get("test/auc", float("nan"))),
            "images": f"{len(ctx.x)} of the {cfg.split} split",
            "target": ctx.label(ctx.target),
        }
        summary: dict[str, Any] = {"run": str(run_dir), "out": str(out), "what": what}
        sections = []
        for key in what:
            t = time.time()
            sections.append(SECTIONS[key](ctx, summary))
            log.info(f"[inspect] {key}: {time.time() - t:.1f} s")
        title = f"cfexplain inspect · {run_dir.name}"
        index = write_text(out / "index.html", page_html(title, header, sections))
        summary["seconds"] = round(time.time() - start, 2)
        summary["wandb_dir"] = str(run.wandb_dir) if run.wandb_dir else None
        write_json(out / "summary.json", summary)
        run.log_artifact(out, name=f"{run_dir.name}-inspect", type="inspect")
    log.info(f"[inspect] {', '.join(what)} in {summary['seconds']:.1f} s → {index}")
    return index


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="inspect")
def main(cfg: DictConfig) -> None:
    run_command("inspect", inspect, cfg, "page")


if __name__ == "__main__":
    main()
