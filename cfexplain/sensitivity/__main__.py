"""``python -m cfexplain.sensitivity run=runs/<experiment>``: sensitivity analysis of a model.

Sweeps each of ``transforms`` over its parameter range on the run's images and plots the
model's output against the parameter: the probability of ``target`` for the run's classifier
(or the user's, ``model.target``/``model.torchscript``), the Dice per class for a segmentation
model (``task=segmentation``: the run's ``segmentation`` stage or the user's model, against the
phantom's masks). Written into ``runs/<experiment>/sensitivity/<timestamp>/`` (or ``out=``) as
``index.html``, per-transform plot, strip and GIF, ``sensitivity.csv``, ``summary.json``, and to
W&B (offline by default).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from cfexplain.runs import TrainedRun
from cfexplain.sensitivity import plan as S
from cfexplain.sensitivity.analysis import TASKS, SweepResult, result_rows, sweep
from cfexplain.utils import distributed
from cfexplain.utils.cli import ConfigError, run_command, tracked, whole_number
from cfexplain.utils.seeding import seed_everything
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


def sensitivity(cfg: DictConfig) -> Path:
    """Run the sweeps that ``cfg`` describes; return the path of the page's ``index.html``."""
    from cfexplain.sensitivity.page import write_report

    task = str(cfg.task)
    if task not in TASKS:
        raise ConfigError(f"task={task}: expected one of {list(TASKS)}")
    for field in ("batch_size", "examples", "image_px"):
        whole_number(field, cfg[field])
    plan = S.sweep_plan(cfg)
    seed_everything(int(cfg.seed), False)
    device = distributed.setup(str(cfg.device)).device
    # Without run=, the images come from +dataset= and the model from model.target.
    trained = TrainedRun(str(cfg.run), device, require=None) if cfg.run else None
    run_dir = trained.dir if trained is not None else None
    data_cfg = S.data_config(cfg, trained)
    ds, x, metas, described = S.load_images(cfg, data_cfg)
    model, source, outputs, masks, facts = S.model_and_outputs(cfg, trained, ds, x, metas, device)
    if cfg.out:
        out = Path(str(cfg.out))
    elif trained is not None:
        out = trained.output_dir("sensitivity", stamped=True)
    else:
        raise ConfigError("set out=<folder> (there is no run= to write under)")
    out = out.expanduser().resolve()
    header: dict[str, Any] = {
        "run": str(run_dir) if run_dir else "",
        "model": source,
        "task": task,
        "images": described,
        **facts,
        "transforms": ", ".join(n for n, _ in plan),
    }
    start = time.time()
    with tracked("sensitivity", out, cfg, run_dir.name if run_dir else "sensitivity") as run:
        results: list[SweepResult] = []
        for name, values in tqdm(plan, desc="sensitivity", unit="transform"):
            results.append(
                sweep(
                    model,
                    x,
                    name,
                    values,
                    task=task,
                    target=int(cfg.target),
                    masks=masks,
                    outputs=outputs,
                    activation=str(cfg.activation),
                    threshold=float(cfg.threshold),
                    batch_size=int(cfg.batch_size),
                    examples=int(cfg.examples),
                )
            )
        seconds = time.time() - start
        ranges = {
            f"{r.transform}/{o}/range": s["range"] for r in results for o, s in r.summary().items()
        }
        summary = {
            "run": str(run_dir) if run_dir else None,
            "out": str(out),
            "model": source,
            "task": task,
            "outputs": outputs,
            "images": int(len(x)),
            "seconds": round(seconds, 2),
            "wandb_dir": str(run.wandb_dir) if run.wandb_dir else None,
        }
        index, files = write_report(out, results, header, summary, size=int(cfg.image_px))
        _log(run, results, files, out)
        run.summary({f"sensitivity/{k}": v for k, v in ranges.items()})
        run.log_artifact(
            out, name=f"{run_dir.name if run_dir else 'model'}-sensitivity", type="report"
        )
    log.info(
        f"[sensitivity] {len(results)} transforms × {len(x)} images, {seconds:.1f} s → {index}"
    )
    return index


def _log(run: Run, results: list[SweepResult], files: dict, out: Path) -> None:
    """W&B: the curves as a table, the plot/strip/GIF per transform, the first image's sweep."""
    rows = [list(r.values()) for res in results for r in result_rows(res)]
    run.log_table(
        "sensitivity/curves", ["transform", "param", "output", "mean", "std", "images"], rows
    )
    media = [
        [res.transform, out / files[res.transform]["plot"], out / files[res.transform]["strip"]]
        for res in results
    ]
    run.log_table("sensitivity/plots", ["transform", "plot", "strip"], media)
    for res in results:
        first = res.examples[:, 0]
        caps = [f"{res.transform}={p:g}" for p in res.params]
        run.log_images(
            f"sensitivity/{res.transform}",
            first if first.shape[1] in (1, 3) else first[:, :1],
            caps,
        )


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    run_command("sensitivity", sensitivity, cfg, "page")


if __name__ == "__main__":
    main()
