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
from omegaconf import DictConfig

from cfexplain.inspect.page import fmt, page_html
from cfexplain.inspect.sections import SECTIONS, WHAT, Context
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import write_json, write_text
from cfexplain.utils.cli import (
    POSITIVE_INT,
    ConfigError,
    Number,
    check_number,
    image_limit,
    run_command,
    tracked,
)

__all__ = ["ConfigError", "inspect", "main"]

log = logging.getLogger("cfexplain")


# ----------------------------------------------------------------------------- command

# Every number of the config, checked before the page's folder is made (batch_size: by
# TrainedRun.open).
NUMBERS = (
    Number("max_maps", **POSITIVE_INT),
    Number("image_px", int, 8),
    Number("dead_eps", low=0.0),
    *(Number(f"embeddings.{k}", int, low) for k, low in (("k", 1), ("outliers", 0))),
    *(Number(f"class_max.{k}", **POSITIVE_INT) for k in ("starts", "steps")),
    *(Number(f"class_max.{k}", int, 0) for k in ("jitter", "blur_every")),  # 0: none
    *(Number(f"class_max.{k}", low=0.0, above=True) for k in ("lr", "latent_lr")),
    *(Number(f"class_max.{k}", low=0.0) for k in ("l2", "latent_l2", "blur_sigma")),
    *(Number(f"units.{k}", **POSITIVE_INT) for k in ("top", "patches")),
    Number("units.patch_px", null=True, **POSITIVE_INT),
)


def _check_numbers(cfg: DictConfig) -> None:
    """A one-line ConfigError naming the first number of ``cfg`` out of its kind or range
    (``limit`` may be null: every image)."""
    image_limit(cfg.limit)
    for field in NUMBERS:
        check_number(cfg, field)


def inspect(cfg: DictConfig) -> Path:
    """Write the page that ``cfg`` describes; return the path of its ``index.html``."""
    trained = TrainedRun.open(cfg)
    run_dir = trained.dir
    what = [str(w) for w in cfg.what]
    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise ConfigError(f"what={what}: choose from {list(WHAT)}")
    _check_numbers(cfg)
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
