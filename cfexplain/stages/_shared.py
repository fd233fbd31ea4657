"""Pieces every training stage's loop uses: seeded image draws, the time budget, the artifact.

Private to ``cfexplain.stages`` (not a stage: it is not in the chain).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from cfexplain.data import collate
from cfexplain.utils import distributed
from cfexplain.utils.artifacts import STATE_FILE, Artifact, torch_load, torch_save
from cfexplain.utils.seeding import Stream, generator, rng_state, set_rng_state
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")


def sample_images(ds: Dataset, n: int, seed: int, key: int) -> torch.Tensor:
    """``n`` distinct images ``[n, C, H, W]`` of ``ds``, the same for the same ``(seed, key)``."""
    idx = torch.randperm(len(ds), generator=generator(seed, key))[:n].tolist()
    return collate([ds[i] for i in idx])[0]


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


def resume_state(
    run: Run, model: torch.nn.Module, opt: torch.optim.Optimizer, loop: dict[str, Any], stage: str
) -> dict[str, Any]:
    """Model, optimiser and RNG from the stage's resumable ``state.pt`` when there is one; the
    loop counters saved with them, else ``loop`` as given."""
    state_file = run.dir / STATE_FILE
    if not state_file.is_file():
        return loop
    saved = torch_load(state_file)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    loop = dict(saved["loop"])
    log.info(f"[{stage}] resumed from {state_file} at step {loop['step']}")
    run.notes["resumed_from_step"] = loop["step"]
    return loop


def save_state(
    run: Run,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loop: Mapping[str, Any],
    d: distributed.Dist,
) -> None:
    """Write the resumable ``state.pt`` (rank 0, atomically); every rank waits for it."""
    if run.is_main:
        torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng_state(),
                "loop": dict(loop),
            },
            run.dir / STATE_FILE,
        )
    d.barrier()
