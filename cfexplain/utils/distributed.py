"""Devices and DistributedDataParallel: the same loop runs alone or under ``torchrun``.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK; the backend is nccl on CUDA and gloo on CPU.
Rank 0 alone logs and writes; every rank reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cfexplain.utils.cli import ConfigError


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when present (one GPU per local rank), else CPU; ``cpu``/``cuda[:i]`` as given."""
    if spec == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={spec}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec}: CUDA is not available; use device=auto or device=cpu")
    return device


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a (possibly one-process) distributed run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` (or a submitit SLURM job) describes, if any."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        # Hydra's submitit launcher starts one task per GPU; submitit knows the ranks and the master.
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``DistributedDataParallel`` when running distributed, the model itself otherwise."""
    if not d.enabled:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when enabled; CPU stays fp32 (fp16 on CPU is slow, bf16 unmeasured)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Let rank 0 do something (e.g. build a cache) before the others."""
    if not d.is_main:
        d.barrier()
    yield
    if d.is_main:
        d.barrier()
