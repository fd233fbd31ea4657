"""Train the stage chain: ``python -m cfexplain.train +dataset=knee``.

Stages run in order (classifier → generator → encoder → normative → direction); a stage whose
config and inputs match a finished artifact is skipped, ``force=true`` reruns, ``stages=[...]``
selects. Works alone or under ``torchrun`` (DDP; rank 0 writes).
"""

from __future__ import annotations

import logging
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cfexplain.stages import CHAIN, STAGES, Stage
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import (
    ARTIFACT_FILE,
    STATE_FILE,
    Artifact,
    ArtifactError,
    clean_temp_files,
    commit_stage,
    fingerprint,
    load_state,
    partial_dir,
    recover_commit,
    write_text,
)
from cfexplain.utils.cli import ConfigError, user_errors
from cfexplain.utils.seeding import seed_everything
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

# Keys that change speed, not results: they never force a stage to rerun.
RUNTIME_KEYS = frozenset({"num_workers", "eval_batch_size"})


def dataset_choices() -> list[str]:
    """Names of the dataset configs shipped in ``cfexplain.conf/dataset``."""
    folder = resources.files("cfexplain.conf").joinpath("dataset")
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def validate(cfg: DictConfig) -> list[Stage]:
    """Check the edges of the config; return the selected stages in chain order."""
    if "name" not in cfg.get("data", {}):
        raise ConfigError(
            "no dataset chosen: add +dataset=NAME, where NAME is one of: "
            + ", ".join(dataset_choices())
        )
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ConfigError(f"dataset '{cfg.data.name}' reads files: set data.root=/path/to/data")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; the chain is {[s.name for s in CHAIN]}")
    return [s for s in CHAIN if s.name in cfg.stages]


def stage_fingerprint(cfg: DictConfig, stage: Stage, inputs: dict[str, Artifact]) -> str:
    """Hash of what decides a stage's result: its config sections and its inputs' fingerprints."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in RUNTIME_KEYS}
        return node

    sections = {k: strip(OmegaConf.to_container(cfg, resolve=True).get(k)) for k in stage.keys}
    return fingerprint(
        {
            "stage": stage.name,
            "config": sections,
            "inputs": {k: a.fingerprint for k, a in inputs.items()},
        }
    )


def _finished(final: Path, fp: str) -> tuple[Artifact | None, str | None]:
    """The finished artifact in ``final`` when it belongs to ``fp`` and its files verify, else
    None and, when something there is wrong (not merely out of date), a line saying what."""
    if not final.exists():
        return None, None
    try:
        art = Artifact.load(final)
    except ArtifactError as e:
        return None, f"unreadable {ARTIFACT_FILE} ({e})"
    if art.fingerprint != fp:
        return None, None
    try:
        art.verify()
    except ArtifactError as e:
        return None, f"damaged files ({e})"
    return art, None


def _load_input(stage: Stage, name: str, exp_dir: Path) -> Artifact:
    """The finished ``name`` stage that ``stage`` reads, its files checked."""
    try:
        art = Artifact.load(exp_dir / name)
        art.verify()
    except ArtifactError as e:
        raise ConfigError(f"stage '{stage.name}' needs the '{name}' stage first ({e})") from e
    return art


def _optional_inputs(stage: Stage, exp_dir: Path, done: dict[str, Artifact]) -> dict[str, Artifact]:
    """The optional inputs of ``stage`` that the run has finished (with intact files)."""
    found = {}
    for name in stage.optional:
        if name in done:
            found[name] = done[name]
            continue
        try:
            art = Artifact.load(exp_dir / name)
            art.verify()
        except ArtifactError:
            continue
        found[name] = art
    return found


def _recover_commits(exp_dir: Path) -> None:
    """Finish or roll back each stage's commit that a kill interrupted between its renames."""
    for stage in CHAIN:
        what = recover_commit(exp_dir / stage.name, partial_dir(exp_dir, stage.name))
        if what:
            log.warning(f"[{stage.name}] {what}")


def _prepare_partial(stage: str, partial: Path, fp: str) -> None:
    """Resume a partial folder of the same fingerprint (``force=true`` too), cleaned of what
    killed writes left; start afresh, and say so, when it belongs to another fingerprint."""
    stamp = partial / ".fingerprint"
    if partial.exists():
        theirs = stamp.read_text(errors="replace").strip() if stamp.is_file() else "none"
        if theirs != fp:
            log.info(
                f"[{stage}] {partial} was left by fingerprint {theirs}, not {fp}: starting afresh"
            )
            shutil.rmtree(partial)
        else:
            for p in clean_temp_files(partial):
                log.info(f"[{stage}] deleted {p.name}, left by an interrupted write")
            # Read once here so that an unreadable state.pt is moved aside, with a warning,
            # before the stage's loop would stop on it.
            load_state(partial / STATE_FILE)
    partial.mkdir(parents=True, exist_ok=True)
    write_text(stamp, fp)


def run_chain(cfg: DictConfig) -> dict[str, Artifact]:
    """Run the selected stages; return the finished artifact of each stage it touched."""
    selected = validate(cfg)
    d = distributed.setup(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.deterministic))
    exp_dir = Path(cfg.runs_dir).resolve() / str(cfg.experiment)
    done: dict[str, Artifact] = {}
    try:
        if d.is_main:
            _recover_commits(exp_dir)
        d.barrier()
        for stage in selected:
            if not stage.available:
                log.info(f"[{stage.name}] not part of this version yet: passed over")
                continue
            inputs = {n: done.get(n) or _load_input(stage, n, exp_dir) for n in stage.inputs}
            inputs |= _optional_inputs(stage, exp_dir, done)
            fp = stage_fingerprint(cfg, stage, inputs)
            final = exp_dir / stage.name
            art, wrong = (None, None) if cfg.force else _finished(final, fp)
            if art is not None:
                log.info(
                    f"[{stage.name}] up to date ({final}, fingerprint {fp}): skipped; force=true reruns it"
                )
                done[stage.name] = art
                continue
            if wrong:
                log.warning(f"[{stage.name}] {final}: {wrong}; retraining the stage")
            done[stage.name] = _run_stage(cfg, stage, d, exp_dir, inputs, fp, wrong)
    finally:
        distributed.teardown()
    return done


def _run_stage(
    cfg: DictConfig,
    stage: Stage,
    d: distributed.Dist,
    exp_dir: Path,
    inputs: dict,
    fp: str,
    retrained_because: str | None = None,
) -> Artifact:
    partial, final = partial_dir(exp_dir, stage.name), exp_dir / stage.name
    if d.is_main:
        _prepare_partial(stage.name, partial, fp)
        write_text(partial / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    d.barrier()
    log.info(f"[{stage.name}] running → {final}")
    run = Run(
        stage.name,
        partial,
        logger=OmegaConf.to_container(cfg.logger, resolve=True),
        config=OmegaConf.to_container(cfg, resolve=True),
        experiment=str(cfg.experiment),
        inputs=inputs,
        fingerprint=fp,
        is_main=d.is_main,
    )
    if retrained_because:
        run.notes["retrained_because"] = retrained_because
    start = time.time()
    try:
        artifact = stage.fit(cfg, run)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    if d.is_main:
        assert artifact.dir == partial and (partial / ARTIFACT_FILE).is_file(), (
            f"{stage.name}.fit must write its artifact into run.dir"
        )
        commit_stage(partial, final)
        artifact = Artifact.load(final)
        log.info(summary(artifact, time.time() - start))
    d.barrier()
    return artifact if d.is_main else Artifact.load(final)


def summary(art: Artifact, seconds: float) -> str:
    """One screen: what the stage trained on, its metrics and where the artifacts are."""
    lines = [f"── {art.stage} finished in {seconds:.0f} s ──"]
    for k, v in art.info.items():
        lines.append(f"  {k:<22} {v}")
    for k, v in art.metrics.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        lines.append(f"  {k:<22} {v}")
    lines.append(f"  {'artifacts':<22} {art.dir}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors("train"):
        run_chain(cfg)


if __name__ == "__main__":
    main()
