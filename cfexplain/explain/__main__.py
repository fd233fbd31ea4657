"""``python -m cfexplain.explain run=runs/<experiment>``: galleries of a trained run.

For every image (the run's test split, or ``images=`` the user's own files): the counterfactual
sequence with f's probability under each frame (when the run has generator, encoder and
direction stages), the attribution maps of ``methods``, the normative residual (when the run has
a normative stage), per-image metrics; written batch by batch into
``runs/<experiment>/explain/<timestamp>/`` (or ``out=``) as ``index.html``, PNG strips, GIFs,
``metrics.csv``, ``summary.json``, and as a W&B table (offline by default).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cfexplain.explain.pipeline import build_methods, guard_notes, method_notes, write_gallery
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import staged_dir
from cfexplain.utils.cli import ConfigError, run_command, tracked, whole_number

__all__ = ["ConfigError", "explain", "main"]

log = logging.getLogger("cfexplain")


def explain(cfg: DictConfig) -> Path:
    """Render the gallery that ``cfg`` describes; return the path of its ``index.html``."""
    whole_number("image_px", cfg.image_px, 8)
    run = TrainedRun.open(cfg)
    notes: list[str] = []
    methods = build_methods(cfg, run, notes)
    notes += method_notes(methods, run.classes) + guard_notes(cfg, run)
    for n in notes:
        log.info(f"[explain] {n}")
    out = Path(cfg.out) if cfg.out else run.output_dir("explain", stamped=True)
    out = out.expanduser().resolve()
    # Written into a hidden partial folder and swapped in whole: a killed run leaves no
    # half gallery, and a rerun into the same out= replaces the old gallery entirely.
    with staged_dir(out) as work:
        with tracked("explain", work, cfg, run.name) as tracking:
            facts = {"out": str(out), "wandb_dir": str(tracking.wandb_dir or "") or None}
            writer, summary = write_gallery(cfg, run, methods, work, notes, facts)
            tracking.log_table("explain/gallery", *writer.table())
            tracking.summary({f"explain/{k}": v for k, v in summary["metrics"].items()})
            tracking.log_artifact(work, name=f"{run.name}-explain", type="gallery")
    skipped, seconds = len(summary["skipped"]), summary["seconds"]
    index = out / "index.html"
    log.info(f"[explain] {writer.count} images, {skipped} skipped, {seconds:.1f} s → {index}")
    return index


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run_command("explain", explain, cfg, "gallery")


if __name__ == "__main__":
    main()
