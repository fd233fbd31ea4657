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
from cfexplain.utils.cli import (
    POSITIVE_INT,
    SHARE,
    ConfigError,
    Number,
    check_number,
    check_overrides,
    numbers_under,
    user_errors,
)
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


# Every numeric value that a stage reads, checked before the first stage starts. A path absent
# from the composed config (e.g. ``classifier=external`` has no ``epochs``) is not checked.
NUMBERS: dict[str, tuple[Number, ...]] = {
    "data": numbers_under(
        "data",
        Number("resolution", **POSITIVE_INT),
        Number("channels", int, 1, 3),
        Number("seed", int, 0),
        Number("num_workers", int, 0),
        *(Number(f"n_{split}", **POSITIVE_INT) for split in ("train", "val", "test")),
        Number("shortcut_rate", **SHARE),
        Number("decorrelate", **SHARE),
        Number("positive_from", int, 1, null=True),
    ),
    "classifier": numbers_under(
        "classifier",
        *(Number(k, **POSITIVE_INT) for k in ("epochs", "batch_size", "eval_batch_size")),
        Number("patience", int, 1),
        Number("warmup_steps", int, 0),
        Number("min_lr_ratio", **SHARE),
        Number("label_smoothing", **SHARE),
        Number("optimizer.lr", low=0.0, above=True),
        Number("optimizer.weight_decay", low=0.0),
    ),
    "generator": numbers_under(
        "generator",
        Number("kimg", low=0.0, above=True),
        Number("max_minutes", low=0.0, above=True, null=True),
        *(Number(k, **POSITIVE_INT) for k in ("batch_size", "r1_interval", "pl_interval")),
        *(Number(k, low=0.0, above=True) for k in ("glr", "dlr", "snapshot_kimg")),
        *(Number(k, low=0.0) for k in ("r1_gamma", "pl_weight", "ema_kimg")),
        Number("ema_rampup", low=0.0, null=True),
        Number("style_mixing", **SHARE),
        Number("grid_size", **POSITIVE_INT),
        Number("ada.target", **SHARE),
        Number("ada.interval", **POSITIVE_INT),
        Number("ada.kimg", low=0.0, above=True),
        Number("ada.fixed_p", null=True, **SHARE),
        Number("metrics.num_images", int, 4),  # precision/recall with k=3 need more than 3
        Number("metrics.fixed_size", int, 16),
        Number("collapse.class_gap", **SHARE),
        Number("collapse.fd_ratio", low=1.0, above=True),
        Number("collapse.recall_ratio", **SHARE),
        Number("collapse.start_kimg", low=0.0),
        Number("collapse.patience", **POSITIVE_INT),
        Number("collapse.lr_factor", low=0.0, above=True, high=1.0),
        Number("collapse.max_rollbacks", int, 0),
        Number("metrics.truncation_psi", low=0.0),
        *(
            Number(f"{m}.{k}", **POSITIVE_INT)
            for m in "GD"
            for k in ("channel_base", "channel_max")
        ),
        *(Number(f"G.{k}", **POSITIVE_INT) for k in ("z_dim", "w_dim", "mapping_layers")),
        *(Number(f"{m}.conv_clamp", low=0.0, above=True, null=True) for m in "GD"),
        *(Number(f"D.mbstd_{k}", int, 0) for k in ("group_size", "channels")),  # 0: no mbstd
    ),
    "encoder": numbers_under(
        "encoder",
        *(Number(k, int, 0) for k in ("steps", "real_steps", "image_samples", "pool_size")),
        *(Number(k, **POSITIVE_INT) for k in ("batch_size", "real_batch_size", "stats_samples")),
        *(Number(k, **POSITIVE_INT) for k in ("eval_images", "eval_batch_size")),
        Number("lr", low=0.0, above=True),
        Number("warmup_steps", int, 0),
        Number("min_lr_ratio", **SHARE),
        *(Number(f"{k}_weight", low=0.0) for k in ("latent", "l1", "lpips", "prior", "decision")),
        Number("max_minutes", low=0.0, above=True, null=True),
        *(Number(f"model.{k}", **POSITIVE_INT) for k in ("width", "channel_max")),
    ),
    "normative": numbers_under(
        "normative",
        *(Number(k, **POSITIVE_INT) for k in ("steps", "batch_size", "eval_batch_size")),
        Number("lr", low=0.0, above=True),
        Number("warmup_steps", int, 0),
        Number("min_lr_ratio", **SHARE),
        Number("residual_sigma", low=0.0),
        Number("lpips_weight", low=0.0),
        Number("pixel_samples", **POSITIVE_INT),
        *(Number(f"net.{k}", **POSITIVE_INT) for k in ("latent_channels", "width", "width_max")),
        Number("net.levels", **POSITIVE_INT),
        Number("net.blocks", int, 0),
        Number("vae.beta", low=0.0),
        Number("aae.adv_weight", low=0.0),
        Number("aae.d_hidden", **POSITIVE_INT),
        *(Number(f"aae.{k}", low=0.0, above=True) for k in ("d_lr", "g_lr")),
    ),
    "direction": numbers_under(
        "direction",
        Number("n_samples", int, 10),
        *(Number(k, **POSITIVE_INT) for k in ("batch_size", "max_iter", "eval_images")),
        Number("holdout", low=0.0, high=1.0, above=True),
        Number("cv", int, 2),
        Number("keep_confident", **SHARE),
        Number("num_frames", int, 2),
        Number("lambda_scale", low=0.0, above=True),
    ),
    "guard": numbers_under(
        "guard",
        *(Number(k, **POSITIVE_INT) for k in ("images", "feature_images", "batch_size")),
        Number("quantile", low=0.0, high=1.0, above=True),
        Number("margin", low=0.0),
        Number("evidence_gap", low=0.0, above=True),
    ),
    "segmentation": numbers_under(
        "segmentation",
        *(Number(k, **POSITIVE_INT) for k in ("steps", "batch_size", "eval_batch_size")),
        Number("lr", low=0.0, above=True),
        Number("weight_decay", low=0.0),
        Number("warmup_steps", int, 0),
        Number("min_lr_ratio", **SHARE),
        Number("dice_weight", low=0.0),
        Number("threshold", low=0.0, high=1.0, above=True),
        *(Number(f"model.{k}", **POSITIVE_INT) for k in ("width", "levels", "width_max")),
    ),
    "reporter": numbers_under(
        "reporter",
        *(Number(k, **POSITIVE_INT) for k in ("steps", "batch_size", "eval_batch_size")),
        *(Number(k, **POSITIVE_INT) for k in ("eval_images", "beam_size", "min_count")),
        Number("lr", low=0.0, above=True),
        Number("weight_decay", low=0.0),
        Number("warmup_steps", int, 0),
        Number("min_lr_ratio", **SHARE),
        Number("grad_clip", low=0.0, above=True),
        Number("attention_weight", low=0.0),
        Number("pointing_tolerance", int, 0),
        *(Number(f"model.{k}", **POSITIVE_INT) for k in ("width", "embed", "hidden")),
        *(Number(f"model.{k}", **POSITIVE_INT) for k in ("attention", "max_len", "stem_stride")),
        Number("model.blocks", **POSITIVE_INT),
        Number("model.levels", int, 0),
        Number("model.dropout", low=0.0, high=1.0),
    ),
    "chain": (
        Number("seed", int, 0),
        Number("checkpoint_every", **POSITIVE_INT),
    ),
}


def validate(cfg: DictConfig) -> list[Stage]:
    """Check the edges of the config; return the selected stages in chain order.

    Every numeric value the selected stages read (``NUMBERS``), the resolution their models
    need, and the training images per class are checked here, before any stage starts.
    """
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
    selected = [s for s in CHAIN if s.name in cfg.stages]
    sections = ["chain", "data", *(s.name for s in selected)]
    for section in sections:
        for field in NUMBERS.get(section, ()):
            check_number(cfg, field)
    _check_resolution(cfg, [s.name for s in selected])
    if "generator" in cfg.stages:
        _check_keep_metric(cfg)
    if "classifier" in cfg.stages and cfg.data.root and "batch_size" in cfg.classifier:
        _check_class_sizes(cfg)
    return selected


def _check_keep_metric(cfg: DictConfig) -> None:
    """``generator.keep_metric`` names a snapshot metric that this run computes."""
    from cfexplain.stages._snapshots import KEEP_METRICS

    metric = OmegaConf.select(cfg, "generator.keep_metric")
    if metric is None:
        return
    if metric not in KEEP_METRICS:
        raise ConfigError(f"generator.keep_metric={metric!r}: expected one of {list(KEEP_METRICS)}")
    if metric == "fd_fixed_val" and not OmegaConf.select(cfg, "generator.metrics.fixed_features"):
        raise ConfigError(
            "generator.keep_metric=fd_fixed_val needs generator.metrics.fixed_features=true"
        )


def _check_resolution(cfg: DictConfig, stages: list[str]) -> None:
    """The sizes the models are built for: StyleGAN2 and the encoder grow from 4 px by doubling
    (a power of two >= 8, within channel_base); the U-Nets halve ``levels`` times; the
    classifier's stem and stages halve it too (>= 8). A missing section is its stage's to name."""
    r = int(cfg.data.resolution)
    needs = []
    if {"generator", "encoder", "direction", "guard"} & set(stages) and (r < 8 or r & (r - 1)):
        needs.append("a power of two >= 8 (generator, encoder)")
    elif r < 8:
        needs.append(">= 8 (the classifier's stem and stages halve it)")
    for stage, net in (("normative", "net"), ("segmentation", "model")):
        levels = OmegaConf.select(cfg, f"{stage}.{net}.levels")
        if (
            stage in stages
            and levels is not None
            and (r % 2 ** int(levels) or r < 2 ** int(levels))
        ):
            needs.append(f"divisible by 2**{stage}.{net}.levels = {2 ** int(levels)}")
    if needs:
        raise ConfigError(f"data.resolution={r}: must be " + " and ".join(needs))
    if "generator" in stages:
        for net in ("G", "D"):
            base = OmegaConf.select(cfg, f"generator.{net}.channel_base")
            if base is not None and r > int(base):
                raise ConfigError(
                    f"data.resolution={r} exceeds generator.{net}.channel_base={base} (the "
                    "channels at the full resolution would be 0): raise it"
                )


def _check_class_sizes(cfg: DictConfig) -> None:
    """Every class the classifier trains on needs at least a batch of training images."""
    from cfexplain.data.readers import class_counts

    data = cfg.data
    classes = list(data.classes) if data.classes else None
    found = class_counts(data.root, "train", format=data.format, classes=classes)
    if found is None:
        return
    counts, where = found
    positive_from = data.get("positive_from")
    if data.task == "binary" and positive_from is not None and len(counts) > 2:
        names, n = list(counts), list(counts.values())
        p = int(positive_from)
        if 0 < p < len(names):
            counts = {f"<{names[p]}": sum(n[:p]), f">={names[p]}": sum(n[p:])}
    batch = int(cfg.classifier.batch_size)
    few = {name: n for name, n in counts.items() if n < batch}
    if few:
        raise ConfigError(
            f"{where}: class {', '.join(f'{k!r} has {v} training images' for k, v in few.items())}, "
            f"fewer than classifier.batch_size={batch}; add images or lower the batch size"
        )


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
        check_overrides(cfg)
        run_chain(cfg)


if __name__ == "__main__":
    main()
