"""Reporter stage: the report writer that ``explain methods=[...,report]`` runs (MDNet-style).

A small ResNet encoder and an LSTM decoder with soft attention over its 16 x 16 feature grid
(``reporter=lstm``) learn the training split's reports (``meta["report"]``) with teacher
forcing; the vocabulary is built from those reports and saved in the weights' metadata
(``reporter.safetensors``) and as ``vocab.json``. AdamW, warm-up + cosine learning rate,
resumable every ``checkpoint_every`` steps. Metrics on the test split's first ``eval_images``:
BLEU-4, the findings read back from the written reports against the factors, and word pointing
in the ground-truth masks (phantoms).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cfexplain.data.reports import detokenize, tokenize
from cfexplain.explain.reporter import evaluate_reports, generate
from cfexplain.nn.reporter import ReporterNet, build_vocab, pad_tokens, report_loss
from cfexplain.stages._shared import (
    Checkpoint,
    check_batch,
    count_step,
    epoch_loader,
    lr_at,
    resume_loop,
    write_artifact,
)
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import Artifact, save_model, write_json, write_text
from cfexplain.utils.seeding import Stream, derived_seed
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

WEIGHTS = "reporter.safetensors"
TARGET = "cfexplain.nn.reporter.ReporterNet"
SEED_KEY = 70  # separates this stage's batch order from the other stages'


def fit(cfg: DictConfig, run: Run) -> Artifact:
    """Train the report writer on the train split's reports; write weights, vocabulary and
    test metrics into ``run.dir``."""
    from cfexplain.data import build_dataset

    if cfg.get("reporter") is None:
        raise ValueError(
            "the reporter stage needs its config group: reporter=lstm (conf/config.yaml's defaults have it)"
        )
    d = distributed.setup(cfg.device)
    r = cfg.reporter
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    if r.get("redraw"):
        train_ds = _Redrawn(train_ds, OmegaConf.to_container(r.redraw), int(cfg.seed))
    log.info(f"[reporter] {train_ds.source}")
    reports = _reports(train_ds)
    vocab = build_vocab((tokenize(t) for t in reports), int(r.min_count))
    kwargs = {
        k: v for k, v in OmegaConf.to_container(r.model, resolve=True).items() if k != "_target_"
    }
    kwargs |= {"vocab": vocab, "in_channels": int(cfg.data.channels)}
    model, loop = _train(cfg, run, train_ds, reports, kwargs, d)
    n_eval = min(int(r.eval_images), len(test_ds))
    samples = [test_ds[i] for i in range(n_eval)]
    scores = evaluate_reports(
        model,
        samples,
        int(r.eval_batch_size),
        str(r.decode),
        int(r.beam_size),
        int(r.pointing_tolerance),
    )
    metrics = {f"test/{k}": v for k, v in scores.items()}
    metrics |= {"steps": loop["step"], "train_seconds": round(loop["train_seconds"], 1)}
    files = {"weights": WEIGHTS, "vocab": "vocab.json", "examples": "examples.txt"}
    info = {
        "data": train_ds.source,
        "vocab_size": len(vocab),
        "model": f"{TARGET} { ({k: v for k, v in kwargs.items() if k != 'vocab'}) }",
        "parameters": sum(p.numel() for p in model.parameters()),
        "decode": str(r.decode),
        "processes": d.world,
        "device": str(d.device),
    }
    if run.is_main:
        save_model(run.dir / WEIGHTS, model, TARGET, kwargs)
        write_json(run.dir / files["vocab"], vocab)
        write_text(run.dir / files["examples"], _examples(model, samples[:8], str(r.decode)))
        run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.summary(metrics)
        tqdm.write(
            f"[reporter] test BLEU-4 {scores['bleu4']:.3f}"
            + (
                f", finding accuracy {scores['finding_accuracy']:.3f}"
                if "finding_accuracy" in scores
                else ""
            )
        )
    return write_artifact(run, metrics, files, info)


class _Redrawn(Dataset):
    """The training phantom with ``factors`` drawn anew for each sample, independently of the
    rest (the same for a seed), and the sample rendered with them (the report follows): the
    phantom's disease factors all grow from one severity, so without this a model could write
    every finding from the joint space alone. ``name: [low, high]`` draws uniformly;
    ``name: marginal`` takes the factor of another training sample drawn at random (its own
    distribution, so the finding's prevalence stays that of the data)."""

    def __init__(self, ds: Any, factors: dict, seed: int) -> None:
        if not hasattr(ds, "render"):
            raise ValueError(
                f"reporter.redraw: {ds.source} cannot redraw factors (only the phantoms can)"
            )
        known = ds.params(0)[0]
        for name, span in factors.items():
            uniform = isinstance(span, list) and len(span) == 2
            if name not in known or not (uniform or span == "marginal"):
                raise ValueError(
                    f"reporter.redraw.{name}={span!r}: expected [low, high] or 'marginal' for a "
                    f"factor of {sorted(known)}"
                )
        self.ds, self.factors, self.seed = ds, factors, seed
        self.source = f"{ds.source}; {', '.join(factors)} drawn independently"
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            rng = np.random.default_rng([self.seed, SEED_KEY, int(i)])
            values = {}
            for name, span in self.factors.items():
                if span == "marginal":
                    donor = int(rng.integers(len(self.ds)))
                    values[name] = float(self.ds.params(donor)[0][name])
                else:
                    values[name] = float(rng.uniform(*span))
            self._cache[i] = self.ds.render(i, values)
        return self._cache[i]


def _reports(ds: Dataset) -> list[str]:
    """Every training sample's report; a one-line error naming the data when one is missing."""
    out = []
    for i in range(len(ds)):
        text = ds[i]["meta"].get("report")
        if not text:
            raise ValueError(
                f"reporter: {getattr(ds, 'source', 'the dataset')} sample {i} has no report "
                "(meta['report']); the phantoms write them, a CSV manifest names its column with "
                "data.reports=<column>"
            )
        out.append(str(text))
    return out


def _examples(model: ReporterNet, samples: Sequence[dict], decode: str) -> str:
    """Reference and written report of a few test images, for a person to read."""
    if not samples:
        return ""
    x = torch.stack([s["image"] for s in samples])
    lines = []
    for s, dec in zip(samples, generate(model, x, decode)):
        lines += [
            f"reference: {s['meta'].get('report', '')}",
            f"written:   {detokenize(dec.words)}",
            "",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training


def _collate(model: ReporterNet, reports: Sequence[str]):
    from cfexplain.data import collate

    def fn(samples):
        x, _, metas = collate(samples)
        ids = [model.encode(tokenize(reports[m["index"]])) for m in metas]
        return x, pad_tokens(ids)

    return fn


def _train(
    cfg: DictConfig,
    run: Run,
    ds: Dataset,
    reports: list[str],
    kwargs: dict[str, Any],
    d: distributed.Dist,
) -> tuple[ReporterNet, dict[str, Any]]:
    r = cfg.reporter
    check_batch("reporter.batch_size", int(r.batch_size), len(ds), d)
    torch.manual_seed(int(cfg.seed))  # initial weights: same on every rank, same for a seed
    model = ReporterNet(**kwargs).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(r.lr), weight_decay=float(r.weight_decay))
    ckpt = Checkpoint(run, d, model=model, optimizer=opt)
    loop = resume_loop(ckpt)
    if loop["finished"]:
        return model.eval(), loop
    ddp = distributed.wrap_ddp(model, d)
    bar = tqdm(
        total=int(r.steps),
        initial=loop["step"],
        desc="reporter",
        unit="step",
        disable=not run.is_main,
    )
    t0 = time.time() - loop["train_seconds"]
    model.train()
    collate_fn = _collate(model, reports)
    while loop["step"] < int(r.steps):
        _train_epoch(cfg, run, ddp, opt, ds, collate_fn, loop, t0, d, bar, ckpt)
    bar.close()
    loop["finished"] = True
    ckpt.save(loop["step"], loop=loop)
    return model.eval(), loop


def _train_epoch(
    cfg: DictConfig,
    run: Run,
    ddp: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ds: Dataset,
    collate_fn: Any,
    loop: dict[str, Any],
    t0: float,
    d: distributed.Dist,
    bar: tqdm,
    ckpt: Checkpoint,
) -> None:
    """The rest of the current epoch (its batches not done before a resume), up to the end."""
    r, total, batch = cfg.reporter, int(cfg.reporter.steps), int(cfg.reporter.batch_size)
    schedule = dict(
        base=float(r.lr), warmup=int(r.warmup_steps), total=total, min_ratio=float(r.min_lr_ratio)
    )
    epoch = loop["step"] // (len(ds) // batch)
    seed, workers = int(cfg.seed) + SEED_KEY, int(cfg.data.num_workers)
    loader = epoch_loader(ds, batch, seed, epoch, loop["step"], d, workers, collate_fn)
    for x, tokens in loader:
        x, tokens = x.to(d.device, non_blocking=True), tokens.to(d.device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(loop["step"], **schedule)
        # Dropout draws from a seed of the step: the same after a resume, whatever the data
        # loader drew from the global generator when the epoch's iterator started.
        torch.manual_seed(derived_seed(seed, Stream.REPORTER_STEP, loop["step"], d.rank))
        logits, alphas = ddp(x, tokens)
        loss = report_loss(logits, alphas, tokens, float(r.attention_weight))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), float(r.grad_clip))
        opt.step()
        count_step(run, loop, loss, opt, ckpt, t0, bar, int(cfg.checkpoint_every))
        if loop["step"] >= total:
            break
