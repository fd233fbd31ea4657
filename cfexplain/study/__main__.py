"""``python -m cfexplain.study make|score ...``: a reader study of a trained run.

``make run=runs/<experiment> readers=3 n_real=50 n_fake=50 n_cf=20 out=study/`` builds one
self-contained page per reader (``study/reader-<k>/index.html`` with its images) and the key
(``study/key.json``). ``score study=study/ answers='answers/*.json'`` (or ``score study/
answers/*.json``) writes the report: ``study/report/index.html``, CSV tables, ``summary.json``
and a W&B table (offline by default). The first word picks the subcommand (``command=``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cfexplain.runs import TrainedRun
from cfexplain.utils.cli import (
    SHARE,
    ConfigError,
    Number,
    number,
    run_command,
    tracked,
    whole_number,
)

log = logging.getLogger("cfexplain")

COMMANDS = ("make", "score")
USAGE = (
    "say what to do: python -m cfexplain.study make run=runs/<experiment> ... | "
    "score study=<folder> answers='answers/*.json'"
)


def make(cfg: DictConfig) -> Path:
    """Build the study that ``cfg`` describes; return its folder."""
    from cfexplain.study.build import KEY_FILE, build_study

    if OmegaConf.is_missing(cfg, "run"):
        raise ConfigError(
            "set run=runs/<experiment> (a folder holding a finished classifier/ stage)"
        )
    run_dir = TrainedRun(str(cfg.run)).dir  # checks the folder holds a finished classifier
    out = Path(str(cfg.out)) if cfg.out else run_dir / "study" / time.strftime("%Y%m%d-%H%M%S")
    folder = build_study(
        run_dir,
        out,
        readers=cfg.readers,
        n_real=cfg.n_real,
        n_fake=cfg.n_fake,
        n_cf=cfg.n_cf,
        seed=cfg.seed,
        target=cfg.target,
        lambdas=cfg.lambdas if isinstance(cfg.lambdas, str) else list(cfg.lambdas),
        time_limit_s=cfg.time_limit_s,
        realism_reference=cfg.realism_reference,
        batch_size=cfg.batch_size,
        device=str(cfg.device),
        counterfactual=OmegaConf.to_container(cfg.counterfactual, resolve=True),
    )
    log.info(
        f"[study] {cfg.readers} readers, each {cfg.n_real} real + {cfg.n_fake} generated images "
        f"and {cfg.n_cf} counterfactuals: give each reader one folder {folder}/reader-<k>/; "
        f"keep {folder / KEY_FILE} (the key) to yourself"
    )
    return folder


def score(cfg: DictConfig) -> Path:
    """Score the answers of ``cfg.answers`` against ``cfg.study``'s key; return the report."""
    from cfexplain.study.score import analyse, answer_files, load_answers, load_key, write_report

    for field in ("study", "answers"):
        if OmegaConf.is_missing(cfg, field):
            raise ConfigError(f"set {field}= ({USAGE})")
    accuracy = float(number(Number("published_accuracy", **SHARE), cfg.published_accuracy))
    bins = whole_number("realism_bins", cfg.realism_bins)
    study = Path(str(cfg.study)).expanduser().resolve()
    key = load_key(study)
    answers = load_answers(answer_files(cfg.answers), key)
    results = analyse(key, answers, accuracy, bins)
    out = Path(str(cfg.out)).expanduser().resolve() if cfg.out else study / "report"
    with tracked("study", out, cfg, study.name) as run:
        index = write_report(out, results, run)
    p = results["pooled"]
    log.info(
        f"[study] {len(results['readers'])} readers, pooled accuracy {p['accuracy']:.3f} "
        f"(95% CI {p['ci_low']:.3f}-{p['ci_high']:.3f}; published {p['published']}), "
        f"p(no better than chance) {p['p_chance']:.3g}, "
        f"Fleiss' kappa {results['agreement']['fleiss_kappa']:.3f}"
    )
    return index


def study(cfg: DictConfig) -> Path:
    """Run the subcommand ``cfg.command``."""
    if OmegaConf.is_missing(cfg, "command") or cfg.command not in COMMANDS:
        raise ConfigError(USAGE)
    return make(cfg) if cfg.command == "make" else score(cfg)


def _quote(value: str) -> str:
    """``value`` as a quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_argv(argv: list[str]) -> list[str]:
    """``make|score`` and its positional arguments as Hydra overrides: ``make RUN`` sets
    ``run=``, ``score STUDY ANSWERS...`` sets ``study=`` and ``answers=[...]``."""
    if not argv or argv[0] not in COMMANDS:
        return argv
    command, rest = argv[0], argv[1:]
    positional = [a for a in rest if "=" not in a and not a.startswith("-")]
    if command == "make":
        positional = positional[:1]  # any further word goes to Hydra, which names it
    out = [f"command={command}"]
    if positional and command == "make":
        out.append(f"run={_quote(positional[0])}")
    elif positional:
        out.append(f"study={_quote(positional[0])}")
        if len(positional) > 1:
            out.append("answers=[" + ",".join(_quote(p) for p in positional[1:]) + "]")
    return out + [a for a in rest if a not in positional]


@hydra.main(version_base="1.3", config_path="pkg://cfexplain.conf", config_name="study")
def _main(cfg: DictConfig) -> None:
    made = not OmegaConf.is_missing(cfg, "command") and cfg.command == "make"
    run_command("study", study, cfg, "study" if made else "report")


def main() -> None:
    sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:])]
    _main()


if __name__ == "__main__":
    main()
