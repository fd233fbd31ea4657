"""``python -m cfexplain.evaluate run=runs/<experiment>``: which explanations tell the truth.

On the phantom's test split, where every image comes with its pathology and marker masks and
its factors:

- every attribution method of ``methods`` (and the counterfactual difference map and the
  normative residual) against the pathology masks of the positive images: pointing game,
  relevance mass and rank accuracy, IoU at the mask's area; faithfulness by deletion and
  insertion AUC; the cascading model-parameter randomisation check;
- the counterfactuals factor by factor, read back by oracle CNNs: causal / nuisance change
  ratio, MNAC, flip rate, realism (classifier-feature FD of the flipping frames);
- the shortcut marker: the classifier's accuracy with the marker removed or lying, and per
  method the share of images with a marker whose explanation exposes it.

Writes ``runs/<experiment>/evaluation/`` (``out=``): ``table.csv`` and ``table.md`` (method ×
metric), ``per_image.csv``, ``summary.json``, ``index.html`` (linked from the galleries) and a
W&B table. The folder is built beside the old one and swapped in at the end: a failed
evaluation leaves the previous one as it was.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cfexplain.evaluate import pipeline as E
from cfexplain.evaluate.shortcut import marker_reliance
from cfexplain.explain.guard import evidence_note
from cfexplain.explain.pipeline import build_methods, split_counterfactual
from cfexplain.runs import TrainedRun
from cfexplain.utils.artifacts import staged_dir
from cfexplain.utils.cli import (
    POSITIVE_INT,
    SHARE,
    ConfigError,
    Number,
    check_number,
    image_count,
    run_command,
    tracked,
)

log = logging.getLogger("cfexplain")

# The evaluation's own numbers (the methods' and the engine's are checked where they are
# built), checked before the run is opened: most are read only minutes into the evaluation.
NUMBERS = (
    Number("pointing_tolerance", int, 0),
    *(Number(f"deletion.{k}", **POSITIVE_INT) for k in ("steps", "batch_size")),
    Number("deletion.baseline"),
    *(Number(f"randomisation.{k}", **POSITIVE_INT) for k in ("images", "direction_samples")),
    Number("randomisation.threshold", low=-1.0, high=1.0),  # a Spearman correlation
    *(Number(f"oracle.{k}", **POSITIVE_INT) for k in ("n_train", "n_test", "steps", "batch_size")),
    Number("mnac_threshold", low=0.0, above=True),
    Number("marker_decisive", **SHARE),
    Number("attribute_scan", int, 0),  # 0: off
    Number("cout_steps", **POSITIVE_INT),
    Number("realism.min_count", **POSITIVE_INT),
)


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate the run that ``cfg`` names; return the path of the evaluation's ``index.html``."""
    if cfg.images:
        raise ConfigError(
            "images=: the evaluation needs ground truth, so it uses the run's own phantom split"
        )
    for field in NUMBERS:
        check_number(cfg, field)
    run = TrainedRun.open(cfg)
    ds = run.dataset(str(cfg.split))
    n = image_count(cfg.limit, len(ds))
    data = E.ground_truth(ds, n, int(cfg.target))
    notes: list[str] = []
    counterfactual, methods = split_counterfactual(build_methods(cfg, run, notes))
    # Attributes are judged by the factors they move, not as a map.
    maps = [m for m in methods if m != "attributes"]
    names = (["counterfactual"] if counterfactual is not None else []) + maps
    blind_spot = evidence_note(run.guard)
    if blind_spot:  # the generator misses what f reads: no counterfactual can show it
        notes.append(blind_spot)
    if "normative" in methods:
        notes.append(
            "normative: the residual never reads the classifier, so the randomisation check "
            "fails it by construction; its localisation scores are those of an anomaly map."
        )
    out = Path(cfg.out) if cfg.out else run.output_dir("evaluation")
    out = out.expanduser().resolve()
    start = time.time()
    # Built beside the old evaluation and swapped in whole: a failed or killed evaluation
    # leaves the previous one as it was.
    with staged_dir(out) as work:
        with tracked("evaluate", work, cfg, run.name) as tracking:
            summary, per, sanity = E.evaluate_run(cfg, run, counterfactual, methods, data, notes)
            if data["knee"]:
                summary["marker_reliance"] = marker_reliance(
                    run.classifier, ds, list(range(n)), moved=float(cfg.marker_decisive)
                )
            summary |= _facts(run, per, n, int(cfg.target)) | {
                "notes": notes,
                "seconds": round(time.time() - start, 1),
                "wandb_dir": str(tracking.wandb_dir) if tracking.wandb_dir else None,
            }
            from cfexplain.evaluate.report import write_report

            write_report(work, summary, per, sanity, gallery=latest_gallery(run, out))
            columns, rows = E.table_rows(summary)
            tracking.log_table("evaluation/table", columns, rows)
            if "attributes" in summary:
                from cfexplain.evaluate.report import attribute_table

                tracking.log_table("evaluation/attributes", *attribute_table(summary["attributes"]))
            tracking.summary(E.flat(summary["table"]))
    log.info(f"[evaluate] {n} images, {len(names)} methods, {time.time() - start:.0f} s → {out}")
    _print_table(summary)
    return out / "index.html"


def _facts(run: TrainedRun, per: dict[str, Any], n: int, target: int) -> dict[str, Any]:
    """What the summary says about the run and the images."""
    art = run.artifact("classifier")
    return {
        "run": str(run.dir),
        "evidence_gap": None if run.guard is None else run.guard.evidence_gap,
        "classifier": art.info.get("model", ""),
        "classifier_test_auc": art.metrics.get("test/auc", math.nan),
        "shortcut_rate": float(run.config.data.get("shortcut_rate", 0.0) or 0.0),
        "images": n,
        "positives_with_mask": int(per["localised"].sum()),
        "target": run.classes[target],
    }


def latest_gallery(run: TrainedRun, out: Path) -> str | None:
    """Relative link from the evaluation page to the newest complete gallery of the run (one
    with its ``summary.json``; a gallery being written lives in a hidden partial folder)."""
    pages = [
        p.parent / "index.html"
        for p in run.output_dir("explain").glob("*/summary.json")
        if not p.parent.name.startswith(".") and (p.parent / "index.html").is_file()
    ]
    pages = sorted(pages, key=lambda p: p.stat().st_mtime)
    return os.path.relpath(pages[-1], out) if pages else None


def _print_table(summary: dict[str, Any]) -> None:
    columns, rows = E.table_rows(summary)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in r])
    print(buf.getvalue(), end="")
    cf = summary.get("counterfactual")
    if cf:
        keys = (
            "flip_rate",
            "causal_nuisance_ratio",
            "mnac",
            "realism_fd_flip_frames",
            "realism_fixed_fd_flip_frames",
            "realism_fixed_fd_reconstructions",
            "cout",
            "marker_exposure_decisive",
            "marker_exposure_effect",
            "marker_exposure_effect_corners",
            "marker_exposure_focused",
            "focus_sufficiency_median",
        )
        print("counterfactual: " + "  ".join(f"{k} {cf[k]:.3f}" for k in keys if k in cf))
        if "ordinal" in cf:
            o = cf["ordinal"]
            print(
                "ordinal walk: "
                + "  ".join(f"{k} {v}" for k, v in o.items() if not isinstance(v, list))
            )
    concepts = summary.get("concepts")
    if concepts:
        per = concepts.get("per_attribute", {})
        print(
            "capsules: diagnosis AUC "
            + f"{concepts['diagnosis_auc']:.3f}  "
            + "  ".join(f"{n} AUC {m['auc']:.3f} MAE {m['mae']:.3f}" for n, m in per.items())
        )
    for r in summary.get("attributes", {}).get("rows", []):
        marker = f"  marker toggled {r['marker_toggled']:.2f}" if "marker_toggled" in r else ""
        print(
            f"attribute {r['rank'] + 1} {r['attribute']}: {r['dominant']} "
            f"(specificity {r['specificity']:.2f}){marker}"
        )
    attrs = summary.get("attributes", {})
    if "marker_reconstructed" in attrs:
        print(f"marker drawn by G(s) on {attrs['marker_reconstructed']:.2f} of the images with one")
    if "marker_by_corner" in attrs:
        from cfexplain.evaluate.report import marker_corner_line

        for r in attrs["marker_by_corner"]["corners"]:
            print(f"marker in the {marker_corner_line(r)}")
        together = attrs["marker_by_corner"]["toggled"]
        print(f"the corners' attributes toggle the marker in {together:.2f} of the images with one")
    if attrs.get("best_coordinates"):
        from cfexplain.evaluate.report import coordinate_line

        for r in attrs["best_coordinates"]:
            print(f"best coordinate for {r['factor']}: {coordinate_line(r)}")


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command("evaluate", evaluate, cfg, "evaluation")


if __name__ == "__main__":
    main()
