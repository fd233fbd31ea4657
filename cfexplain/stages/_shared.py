"""Pieces every training stage's loop uses: seeded image draws and batches, the learning rate,
the time budget, the checkpoint, the artifact.

Private to ``cfexplain.stages`` (not a stage: it is not in the chain).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from cfexplain.data import collate
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import STATE_FILE, Artifact, load_state, torch_save
from cfexplain.utils.seeding import Stream, generator, rng_state, set_rng_state
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


def sample_images(ds: Dataset, n: int, seed: int, key: int) -> torch.Tensor:
    """``n`` distinct images ``[n, C, H, W]`` of ``ds``, the same for the same ``(seed, key)``."""
    idx = torch.randperm(len(ds), generator=generator(seed, key))[:n].tolist()
    return collate([ds[i] for i in idx])[0]


def lr_at(step: int, *, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to ``base``, then cosine decay to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def epoch_batches(
    n: int, batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, full global batches only.

    ``batch`` is the global batch; each rank takes its ``batch // world`` share of every batch.
    """
    perm = torch.randperm(n, generator=generator(seed, Stream.EPOCH_ORDER, epoch)).tolist()
    per_rank = batch // world
    steps = n // batch
    return [
        perm[s * batch + rank * per_rank : s * batch + (rank + 1) * per_rank] for s in range(steps)
    ]


def epoch_loader(
    ds: Dataset,
    batch: int,
    seed: int,
    epoch: int,
    step: int,
    d: distributed.Dist,
    num_workers: int,
    collate_fn: Callable = collate,
) -> DataLoader:
    """This rank's batches of ``epoch`` from global ``step`` on: those done before a resume
    (the epoch's first ``step - epoch * steps_per_epoch``) are left out."""
    batches = epoch_batches(len(ds), batch, seed, epoch, d.rank, d.world)
    skip = step - epoch * (len(ds) // batch)
    return DataLoader(
        ds, batch_sampler=batches[skip:], collate_fn=collate_fn, num_workers=num_workers
    )


def check_batch(field: str, batch: int, n: int, d: distributed.Dist) -> int:
    """``batch`` (config ``field``) when the processes share it evenly and the split of ``n``
    images holds a batch; a ValueError naming the field otherwise."""
    if batch % d.world:
        raise ValueError(
            f"{field}={batch} must be divisible by the number of processes ({d.world})"
        )
    if n < batch:
        raise ValueError(f"{field}={batch} is larger than the training split ({n} images)")
    return batch


def resume_loop(ckpt: Checkpoint) -> dict[str, Any]:
    """The loop state ``{"step", "train_seconds", "finished"}`` that ``ckpt`` resumes (restoring
    its states and saying so), or a fresh one."""
    saved = ckpt.load()
    if not saved:
        return {"step": 0, "train_seconds": 0.0, "finished": False}
    loop: dict[str, Any] = saved["loop"]
    ckpt.announce(f"at step {loop['step']}", resumed_from_step=loop["step"])
    return loop


def count_step(
    run: Run,
    loop: dict[str, Any],
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    ckpt: Checkpoint,
    t0: float,
    bar: Any,
    checkpoint_every: int,
) -> None:
    """After an optimiser step of a one-loss stage: stop on a diverged loss (the checkpoint is
    untouched), count the step and its time, log loss and learning rate every 10 steps and
    checkpoint every ``checkpoint_every``."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{run.stage} diverged at step {loop['step']} (loss {value}); the last checkpoint "
            f"{ckpt.path} is untouched: lower {run.stage}.lr"
        )
    loop["step"] += 1
    loop["train_seconds"] = time.time() - t0
    bar.update()
    if loop["step"] % 10 == 0:
        bar.set_postfix(loss=f"{value:.4f}")
        run.log({"train/loss": value, "train/lr": opt.param_groups[0]["lr"]}, step=loop["step"])
    if loop["step"] % checkpoint_every == 0:
        ckpt.save(loop["step"], loop=loop)


def real_batch(ds: Dataset, n: int, seed: int, step: int, d: distributed.Dist) -> torch.Tensor:
    """Reals ``[n, C, H, W]`` for this rank and step, drawn with replacement: the same after a resume."""
    idx = torch.randint(
        len(ds), (n,), generator=generator(seed, Stream.REAL_BATCH, step, d.rank)
    ).tolist()
    return collate([ds[i] for i in idx])[0]


def out_of_time(seconds: float, budget: float, d: distributed.Dist) -> bool:
    """Whether the time budget is spent; rank 0's clock decides for every rank."""
    if budget == math.inf:
        return False
    flag = torch.tensor([float(seconds >= budget)], device=d.device)
    if d.enabled:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def write_artifact(
    run: Run, metrics: Mapping[str, Any], files: Mapping[str, str], info: Mapping[str, Any]
) -> Artifact:
    """The stage's ``artifact.json`` (written by rank 0): metrics, files, inputs, info and notes."""
    artifact = Artifact(
        run.stage,
        run.dir,
        run.fingerprint,
        dict(metrics),
        dict(files),
        inputs={k: a.fingerprint for k, a in run.inputs.items()},
        info={**info, **run.notes},
    )
    if run.is_main:
        artifact.write()
    return artifact


class Stateful(Protocol):
    """What a checkpoint saves by name: a module, an optimiser, an augment pipe..."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Checkpoint:
    """A stage's resumable ``state.pt``: named state dicts, the step and extra state.

    ``states`` are saved by name (modules, optimisers, EMA copies, the augment pipe); a stage
    that builds its models one after the other adds each with :meth:`add`. ``rng=True`` keeps
    the global torch RNG too, for stages that draw from it. ``step`` is in the units of the
    stage's ``run.log(..., step=)``: a resume drops the log rows after it, as they come again.
    On disk, one flat dict written atomically by rank 0::

        {"step": int, "states": [name, ...], name: state_dict, ..., "rng": ..., key: extra, ...}
    """

    def __init__(
        self, run: Run, d: distributed.Dist, rng: bool = False, **states: Stateful
    ) -> None:
        self.run, self.d, self.rng = run, d, rng
        self.path = run.dir / STATE_FILE
        self.states: dict[str, Stateful] = dict(states)
        self.saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """Restore the states (and the RNG) from ``state.pt`` and rewind ``log.jsonl`` to its
        step; the extra state saved with them, or None when there is nothing to resume from
        (no file, or a corrupt one moved aside): the stage starts from scratch."""
        self.saved = load_state(self.path)
        if self.saved is not None and "states" not in self.saved:
            log.warning(f"[{self.run.stage}] {self.path} is of an older format: starting afresh")
            self.saved = None
        if self.saved is None:
            return None
        self._restore(self.saved, self.states)
        if self.rng:
            set_rng_state(self.saved["rng"])
        self.run.rewind(int(self.saved["step"]))
        kept = {"step", "states", "rng", *self.saved["states"]}
        return {k: v for k, v in self.saved.items() if k not in kept}

    @property
    def step(self) -> int | None:
        """The step :meth:`load` resumed from; None when it started from scratch."""
        return None if self.saved is None else int(self.saved["step"])

    def add(self, **states: Stateful) -> None:
        """Save these states too; restore them now from the loaded ``state.pt`` if it has them."""
        self.states |= states
        if self.saved is not None:
            names = self.saved["states"]
            self._restore(self.saved, {k: v for k, v in states.items() if k in names})

    @staticmethod
    def _restore(saved: Mapping[str, Any], states: Mapping[str, Stateful]) -> None:
        for name, obj in states.items():
            obj.load_state_dict(saved[name])

    def announce(self, where: str, **notes: Any) -> None:
        """Log the resume (``where``: from which point) and note it in the artifact's info."""
        log.info(f"[{self.run.stage}] resumed from {self.path} {where}")
        self.run.notes |= notes

    def save(self, step: int, **extra: Any) -> None:
        """Write ``state.pt`` at ``step`` with ``extra`` (rank 0, atomically); every rank waits."""
        if self.run.is_main:
            state: dict[str, Any] = {"step": int(step), "states": list(self.states)}
            state |= {name: obj.state_dict() for name, obj in self.states.items()}
            if self.rng:
                state["rng"] = rng_state()
            clash = set(state) & set(extra)
            assert not clash, f"checkpoint: extra state {sorted(clash)} shadows a saved name"
            torch_save(state | extra, self.path)
        self.d.barrier()
