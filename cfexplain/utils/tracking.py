"""One ``Run`` per stage: the only place that knows wandb.

W&B runs offline by default (files under ``runs/<experiment>/wandb``), online when the user is
logged in and sets ``logger.mode=online``; ``logger=none`` turns it off. Whatever the logger,
scalars also go to ``log.jsonl`` in the stage folder, so a run is readable without W&B.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(requested: str) -> tuple[str, str | None]:
    """Pick the W&B mode: ``(mode, note)``; the note says why it differs from the request."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env, f"WANDB_MODE={env} from the environment"
    if requested == "online" and not _logged_in():
        return "offline", "logger.mode=online but no W&B login found (wandb login); logging offline"
    if requested not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode must be offline, online or disabled, got {requested!r}")
    return requested, None


class Run:
    """Logging and working folder of one stage.

    Attributes:
        stage: stage name.
        dir: folder the stage writes into (its partial folder until it finishes).
        inputs: finished artifacts of upstream stages, by stage name.
        fingerprint: hash of the config and inputs this stage depends on.
        is_main: False on every rank but 0 of a distributed run; those never log or write.
    """

    def __init__(
        self,
        stage: str,
        dir: Path,
        *,
        logger: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        experiment: str = "default",
        inputs: Mapping[str, Any] | None = None,
        fingerprint: str = "",
        is_main: bool = True,
    ) -> None:
        self.stage = stage
        self.dir = Path(dir)
        self.inputs = dict(inputs or {})
        self.fingerprint = fingerprint
        self.is_main = is_main
        self.notes: dict[str, Any] = {}
        self._wandb_run = None
        self._summary: dict[str, Any] = {}
        logger = dict(logger or {"name": "none"})
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        if is_main and logger.get("name") == "wandb":
            self._start_wandb(logger, dict(config or {}), experiment)

    # -------------------------------------------------------------------------- setup
    def _start_wandb(self, logger: dict[str, Any], config: dict[str, Any], experiment: str) -> None:
        mode, why = resolve_mode(str(logger.get("mode", "offline")))
        if why:
            warnings.warn(why, stacklevel=3)
            self.notes["wandb_mode_note"] = why
        if mode == "disabled":
            return
        import wandb  # noqa: PLC0415  (kept out of `import cfexplain`)

        wandb_dir = Path(logger.get("dir") or self.dir.parent)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._wandb_run = wandb.init(
            project=logger.get("project", "cfexplain"),
            entity=logger.get("entity"),
            group=experiment,
            job_type=self.stage,
            name=f"{experiment}/{self.stage}",
            config=config,
            dir=str(wandb_dir),
            mode=mode,
            tags=list(logger.get("tags") or []),
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.notes["wandb_mode"] = mode
        self.notes["wandb_dir"] = str(Path(self._wandb_run.dir).parent)

    @property
    def wandb_dir(self) -> Path | None:
        """Folder of the W&B run (offline files), or None without W&B."""
        return Path(self._wandb_run.dir).parent if self._wandb_run is not None else None

    # -------------------------------------------------------------------------- logging
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalars (numbers or 0-d tensors)."""
        if not self.is_main:
            return
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        with open(self.dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(row, step=step)

    def rewind(self, step: int) -> None:
        """Drop the ``log.jsonl`` rows logged after ``step``: a run resumed from a checkpoint
        at ``step`` logs them again."""
        if not self.is_main or not (self.dir / "log.jsonl").is_file():
            return
        from cfexplain.utils.artifacts import write_text

        lines = (self.dir / "log.jsonl").read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and _row_step(ln) <= step]
        write_text(self.dir / "log.jsonl", "".join(f"{ln}\n" for ln in kept))

    def log_images(
        self,
        key: str,
        images: torch.Tensor,
        captions: Sequence[str] | None = None,
        step: int | None = None,
    ) -> None:
        """Log images ``[N, C, H, W]`` in [-1, 1] (C = 1 or 3)."""
        if not self.is_main or self._wandb_run is None:
            return
        import wandb  # noqa: PLC0415

        assert images.ndim == 4 and images.shape[1] in (1, 3), (
            f"images must be [N,1|3,H,W], got {tuple(images.shape)}"
        )
        arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
        arr = arr.permute(0, 2, 3, 1).numpy()
        caps = list(captions) if captions is not None else [None] * len(arr)
        media = [
            wandb.Image(a.squeeze(-1) if a.shape[-1] == 1 else a, caption=c)
            for a, c in zip(arr, caps)
        ]
        self._wandb_run.log({key: media}, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table (cells: numbers, strings, or ``Path``s of image files, shown as images)."""
        if not self.is_main or self._wandb_run is None:
            return
        import wandb  # noqa: PLC0415

        def cell(v: Any) -> Any:
            return wandb.Image(str(v)) if isinstance(v, Path) else v

        data = [[cell(v) for v in r] for r in rows]
        self._wandb_run.log({key: wandb.Table(columns=list(columns), data=data)})

    def log_artifact(self, path: str | Path, name: str, type: str) -> None:
        """Attach a file or folder to the W&B run as an artifact (``name`` made W&B-safe: it
        accepts only letters, digits, ``_``, ``-`` and ``.``; experiment names may hold more)."""
        if not self.is_main or self._wandb_run is None:
            return
        import re

        import wandb  # noqa: PLC0415

        art = wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "_", name), type=type)
        path = Path(path)
        art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
        self._wandb_run.log_artifact(art)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final values of the run (W&B summary)."""
        if not self.is_main:
            return
        self._summary.update(values)
        if self._wandb_run is not None:
            for k, v in values.items():
                self._wandb_run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; safe to call twice."""
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


def _row_step(line: str) -> float:
    """The step of a ``log.jsonl`` row; a row without one (or unreadable) sorts first."""
    try:
        step = json.loads(line).get("step")
    except json.JSONDecodeError:
        return -math.inf
    return -math.inf if step is None else float(step)
