"""A trained run ``runs/<experiment>``: the one place that knows a run folder's layout.

A run holds one folder per finished stage, ``<stage>/artifact.json`` beside the stage's
``config.yaml`` and weights (classifier, generator, encoder, direction, normative,
segmentation, reporter), and one folder per command that wrote into it (``explain/``, ``evaluation/``,
``inspect/``, ``sensitivity/``). :class:`TrainedRun` opens it, says which stages it has, and
loads each model once, on first use, on its device.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

from cfexplain.utils.artifacts import ARTIFACT_FILE, Artifact
from cfexplain.utils.cli import ConfigError, class_index, whole_number

STAGES = (
    "classifier",
    "generator",
    "encoder",
    "direction",
    "normative",
    "guard",
    "segmentation",
    "reporter",
)
# The stages whose config.yaml is the run's training config, in order of preference.
CONFIG_STAGES = ("classifier", "segmentation", "reporter")


def open_dataset(data_cfg: DictConfig, split: str) -> Dataset:
    """``split`` of the dataset ``data_cfg`` describes, with the phantoms' sample cache off: a
    command reads each sample once, so caching would make memory grow with the images read."""
    from cfexplain.data import build_dataset

    ds = build_dataset(data_cfg, split)
    if hasattr(ds, "cache"):
        ds.cache = False
    return ds


class TrainedRun:
    """The finished stages of ``runs/<experiment>`` and their models, each loaded once.

    Args:
        path: the run folder (as the user gave it: error messages repeat it).
        device: where the models are loaded.
        require: the stage the run must have finished (``None``: only the folder must exist).
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        require: str | None = "classifier",
    ) -> None:
        self.given = str(path)
        self.dir = Path(path).expanduser().resolve()
        self.device = torch.device(device)
        self._artifacts: dict[str, Artifact] = {}
        self._datasets: dict[str, Dataset] = {}
        if require is not None and not self.has(require):
            where = self.artifact_file(require)
            raise ConfigError(f"run={self.given}: no finished {require} stage ({where})")
        if not self.dir.is_dir():
            raise ConfigError(f"run={self.given}: no such folder {self.dir}")

    @classmethod
    def open(cls, cfg: DictConfig) -> TrainedRun:
        """The run of a command's ``run=``: seed, pick the device (``device=``), open the run
        and check ``target=`` against its classifier's classes."""
        from cfexplain.utils import distributed
        from cfexplain.utils.seeding import seed_everything

        if OmegaConf.is_missing(cfg, "run"):
            raise ConfigError(
                "set run=runs/<experiment> (a folder holding a finished classifier/ stage)"
            )
        if "batch_size" in cfg:
            whole_number("batch_size", cfg.batch_size)
        seed_everything(int(cfg.seed), False)
        run = cls(str(cfg.run), distributed.setup(str(cfg.device)).device)
        cfg.target = run.check_target(cfg.target)  # a class name becomes its index
        return run

    # ------------------------------------------------------------------------- layout

    @property
    def name(self) -> str:
        """The experiment's name (the folder's)."""
        return self.dir.name

    def artifact_file(self, stage: str) -> Path:
        """``<run>/<stage>/artifact.json``, written last: a stage is finished when it exists."""
        return self.dir / stage / ARTIFACT_FILE

    def has(self, stage: str) -> bool:
        """Whether ``stage`` finished."""
        return self.artifact_file(stage).is_file()

    def stage_dir(self, stage: str) -> Path:
        """The folder of a finished ``stage``; ConfigError naming the run when it is missing."""
        if not self.has(stage):
            raise ConfigError(f"run={self.given}: no finished {stage} stage")
        return self.dir / stage

    def artifact(self, stage: str) -> Artifact:
        """The :class:`Artifact` of a finished ``stage`` (read once)."""
        if stage not in self._artifacts:
            self._artifacts[stage] = Artifact.load(self.stage_dir(stage))
        return self._artifacts[stage]

    def output_dir(self, command: str, stamped: bool = False) -> Path:
        """Where ``command`` writes into the run: ``<run>/<command>/`` (with a timestamped
        subfolder when ``stamped``)."""
        out = self.dir / command
        return out / time.strftime("%Y%m%d-%H%M%S") if stamped else out

    def beside(self, name: str) -> Path:
        """A folder beside the run, shared by the runs of one ``runs/`` folder."""
        return self.dir.parent / name

    # ------------------------------------------------------------------------- config, data

    @cached_property
    def config(self) -> DictConfig:
        """The config the run trained with (the classifier stage's, else the segmentation's)."""
        for stage in CONFIG_STAGES:
            f = self.dir / stage / "config.yaml"
            if f.is_file():
                return OmegaConf.load(f)
        raise ConfigError(
            f"run={self.given}: no stage config (classifier/ or segmentation/ config.yaml)"
        )

    def dataset(self, split: str) -> Dataset:
        """``split`` of the run's training data (built once per split, sample cache off)."""
        if split not in self._datasets:
            self._datasets[split] = open_dataset(self.config.data, split)
        return self._datasets[split]

    @property
    def classes(self) -> list[str]:
        """The classifier's class names."""
        return [str(c) for c in self.artifact("classifier").info.get("classes") or []]

    def check_target(self, target: Any) -> int:
        """The index of ``target`` (an index or a name) among the classifier's classes;
        ConfigError naming them if it is none of them."""
        return class_index(target, self.classes)

    # ------------------------------------------------------------------------- models

    @cached_property
    def classifier(self) -> nn.Module:
        """f ``[N, C, H, W] -> logits [N, K]``, eval mode."""
        from cfexplain.nn.classifier import load_classifier

        return load_classifier(self.stage_dir("classifier"), self.device)

    @cached_property
    def generator(self) -> nn.Module:
        """G (EMA weights), frozen: ``mapping(z) -> w [N, num_ws, w_dim]``, ``synthesis(w)``."""
        from cfexplain.nn.encoder import load_generator

        return load_generator(self.stage_dir("generator"), self.device)

    @cached_property
    def encoder(self) -> nn.Module:
        """E ``[N, C, H, W] -> w [N, num_ws, w_dim]``, frozen."""
        from cfexplain.nn.encoder import load_encoder

        return load_encoder(self.stage_dir("encoder"), self.device)

    @cached_property
    def directions(self) -> dict[str, Tensor]:
        """The direction stage's tensors (on the CPU): ``direction [w_dim]`` (binary) or
        ``directions [K, w_dim]``, ``lambda_range [1 or K]``, and the fits behind them."""
        from safetensors.torch import load_file

        return load_file(str(self.artifact("direction").path("directions")))

    @cached_property
    def attributes(self) -> Any:
        """The :class:`~cfexplain.explain.attributes.AttributeSet` that
        ``python -m cfexplain.attributes`` wrote into ``<run>/attributes/``."""
        from cfexplain.explain.attributes import AttributeSet

        return AttributeSet.load(self.artifact("attributes").path("attributes"))

    @cached_property
    def normative(self) -> dict[str, nn.Module]:
        """The normative models by kind (``vae``, ``aae``), eval mode."""
        from cfexplain.nn.normative import load_normative

        return load_normative(self.stage_dir("normative"), self.device)

    @cached_property
    def segmentation(self) -> nn.Module:
        """The U-Net ``[N, C, H, W] -> logits [N, K, H, W]``, eval mode."""
        from cfexplain.nn.segmentation import load_segmentation

        return load_segmentation(self.stage_dir("segmentation"), self.device)

    @cached_property
    def reporter(self) -> nn.Module:
        """The report writer: images -> words with an attention map each, eval mode."""
        from cfexplain.nn.reporter import load_reporter

        return load_reporter(self.stage_dir("reporter"), self.device)

    @cached_property
    def perceptual(self) -> nn.Module:
        """The LPIPS distance the encoder stage trained with (its kind, rebuilt offline)."""
        from cfexplain.nn.perceptual import build_perceptual

        kind = str(self.artifact("encoder").info.get("perceptual", "auto"))
        return build_perceptual(kind, self.device)

    @cached_property
    def guard(self) -> Any:
        """The guard stage's :class:`~cfexplain.explain.guard.Calibration`, or None when the
        run has no guard stage (its images then go unchecked, and the pages say so)."""
        if not self.has("guard"):
            return None
        from cfexplain.explain.guard import Calibration

        return Calibration.load(self.artifact("guard").path("guard"))

    def guard_models(self, batch: int = 64) -> Any:
        """The :class:`~cfexplain.explain.guard.Models` the guard's signals read."""
        from cfexplain.explain.guard import Models

        kind = self.guard.normative if self.guard is not None else None
        return Models(
            classifier=self.classifier,
            generator=self.generator,
            encoder=self.encoder,
            perceptual=self.perceptual,
            normative=self.normative[kind] if kind else None,
            device=self.device,
            batch=batch,
        )

    def provenance(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        """``{"<stage> stage": "fingerprint …, written …"}`` of the finished ``stages``."""
        out: dict[str, Any] = {}
        for stage in stages:
            if self.has(stage):
                art = self.artifact(stage)
                out[f"{stage} stage"] = f"fingerprint {art.fingerprint}, written {art.created}"
        return out
