"""The generator's snapshot quality: what each snapshot of G_ema is measured on, which snapshot
is kept, and when training has collapsed.

Two kinds of yardstick (README "Generator"):

- on the run's classifier (moves with every trained classifier): Fréchet distance and KID on its
  penultimate features, and the class shares it gives generated versus real images;
- fixed, comparable between runs: FD, precision and recall (k = 3) on :class:`FixedFeatures`,
  whose weights ship inside a wheel, and on the knee phantom the factor coverage read by the
  evaluation's factor oracles (per factor the 1-D Wasserstein distance in real std units, and
  the marker and laterality rates).

Private to ``cfexplain.stages``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cfexplain.data import build_dataset
from cfexplain.nn.classifier import load_classifier
from cfexplain.stages._shared import sample_images
from cfexplain.utils.images import save_grid
from cfexplain.utils.quality import (
    FeatureStats,
    factor_coverage,
    frechet_distance,
    inception_fd,
    precision_recall,
)
from cfexplain.utils.seeding import METRIC_SEED, Stream, generator
from cfexplain.utils.tracking import Run

log = logging.getLogger("cfexplain")

# What generator.keep_metric may name: snapshot metrics where lower is better.
KEEP_METRICS = ("fd_fixed_val", "fd_classifier_val")
# Factor readings that are 0/1 (rates), not distributions.
RATE_FACTORS = ("marker", "laterality")


class SnapshotQuality:
    """Snapshot grids and metrics of G_ema on fixed real images, computed on rank 0.

    The real images (train, validation, test splits) and their features are drawn once; a
    snapshot generates ``metrics.num_images`` images from fixed latents and compares them.
    Snapshots are chosen on the validation split and reported on the test split.
    """

    def __init__(self, cfg: DictConfig, run: Run, device: torch.device) -> None:
        g = cfg.generator
        self.run, self.device, self.g = run, device, g
        n, seed = int(g.metrics.num_images), int(cfg.seed)
        self.real = {
            split: sample_images(build_dataset(cfg.data, split), n, seed, key)
            for split, key in (
                ("train", Stream.GENERATOR_REAL_TRAIN),
                ("val", Stream.GENERATOR_REAL_VAL),
                ("test", Stream.GENERATOR_REAL_TEST),
            )
        }
        self.info: dict[str, Any] = {}
        self.stats = self._classifier_features(run)
        self.fixed = self._fixed_features() if g.metrics.get("fixed_features", True) else None
        self.oracle = self._oracle(cfg) if g.metrics.get("oracle") else None
        if g.keep_metric == "fd_classifier_val" and self.stats is None:
            raise ValueError(
                "generator.keep_metric=fd_classifier_val needs a trained classifier in the run "
                "(stages=[classifier, generator, ...]); or use keep_metric=fd_fixed_val"
            )

    # ------------------------------------------------------------------------- references

    def _classifier_features(self, run: Run) -> FeatureStats | None:
        if "classifier" not in run.inputs:
            self.info["metrics"] = (
                "no classifier stage in this run: classifier-feature FD and class shares not computed"
            )
            return None
        stats = FeatureStats(
            load_classifier(run.inputs["classifier"].dir, self.device), self.device
        )
        self.info["feature_source"] = stats.feature_source
        self.cls_feats = {split: stats.features(x) for split, x in self.real.items()}
        base = frechet_distance(self.cls_feats["train"], self.cls_feats["test"])
        self.fd_classifier_real = base
        self.info["fd_classifier_real_train_vs_test"] = round(base, 4)
        self.real_shares = stats.class_shares(self.real["train"])
        self.info["class_shares_real_train"] = [round(x, 4) for x in self.real_shares]
        return stats

    def _fixed_features(self) -> Any:
        from cfexplain.nn.perceptual import FixedFeatures

        net = FixedFeatures(size=int(self.g.metrics.get("fixed_size", 64))).to(self.device)
        self.fixed_feats = {split: self._embed(net, x) for split, x in self.real.items()}
        self.info["fixed_features"] = f"shift-tolerant LPIPS AlexNet trunk ({net.weights.name})"
        real_real = frechet_distance(self.fixed_feats["train"], self.fixed_feats["test"])
        self.info["fd_fixed_real_train_vs_test"] = round(real_real, 4)
        pr = precision_recall(self.fixed_feats["test"], self.fixed_feats["train"])
        self.info |= {f"{k}_real_train_vs_test": round(v, 4) for k, v in pr.items()}
        return net

    def _embed(self, net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x.to(self.device)).double().cpu() for x in images.split(64)])

    def _oracle(self, cfg: DictConfig) -> torch.nn.Module | None:
        """The knee phantom's factor oracle, trained once and cached beside the runs (the same
        cache as ``evaluate``'s, with the same arguments)."""
        if cfg.data.name != "knee" or cfg.data.get("root"):
            self.info["factor_coverage"] = "not computed: the oracles read the knee phantom"
            return None
        from cfexplain.evaluate.oracles import fit_or_load

        res = int(cfg.data.resolution)
        oracle, info = fit_or_load(
            Path(cfg.runs_dir) / "oracles" / f"knee_{res}px",
            resolution=res,
            device=self.device,
            **OmegaConf.to_container(self.g.metrics.oracle, resolve=True),
        )
        self.info["factor_oracle"] = {k: info[k] for k in ("fingerprint", "reused") if k in info}
        self.real_factors = self._read_factors(oracle, self.real["test"])
        return oracle

    @torch.no_grad()
    def _read_factors(self, oracle: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.cat([oracle(b.to(self.device)).cpu() for b in x.split(128)])
        return {name: out[:, i] for i, name in enumerate(oracle.factors)}

    # ------------------------------------------------------------------------- a snapshot

    @torch.no_grad()
    def snapshot(self, G_ema: torch.nn.Module, grid_z: torch.Tensor, nimg: int, step: int) -> dict:
        """Save and log the grid of ``grid_z``; measure ``G_ema`` on every yardstick."""
        kimg = nimg / 1000
        grid = torch.cat([G_ema(z, noise_mode="const") for z in grid_z.split(64)]).cpu()
        rel = f"snapshots/grid_{kimg:07.2f}kimg.png"
        save_grid(grid, self.run.dir / rel)
        self.run.log_images("snapshot/grid", grid, step=step)
        out: dict[str, Any] = {"grid": rel, "kimg": round(kimg, 3)}
        psi = float(self.g.metrics.truncation_psi)
        fake = generate(G_ema, len(self.real["test"]), self.device, psi=psi)
        out |= self._on_classifier(fake) | self._on_fixed(fake) | self._on_factors(fake)
        if self.g.metrics.get("inception_weights"):
            fid = inception_fd(
                fake, self.real["test"], self.g.metrics.inception_weights, self.device
            )
            out["fid_inception"] = round(fid, 4)
        self.run.log({f"quality/{k}": v for k, v in out.items() if isinstance(v, float)}, step=step)
        tqdm.write(describe(out))
        return out

    def _on_classifier(self, fake: torch.Tensor) -> dict[str, Any]:
        if self.stats is None:
            return {}
        feats = self.stats.features(fake)
        out = {
            k: round(v, 4)
            for k, v in self.stats.compare(feats, self.cls_feats["test"], kid=True).items()
        }
        out["fd_classifier_ratio"] = round(
            out["fd_classifier"] / max(self.fd_classifier_real, 1e-12), 3
        )
        out["fd_classifier_val"] = round(frechet_distance(self.cls_feats["val"], feats), 4)
        shares = self.stats.class_shares(fake)
        out["class_shares_generated"] = [round(x, 4) for x in shares]
        gap = np.max(np.abs(np.array(shares) - np.array(self.real_shares)))
        out["class_share_gap"] = round(float(gap), 4)
        return out

    def _on_fixed(self, fake: torch.Tensor) -> dict[str, Any]:
        if self.fixed is None:
            return {}
        feats = self._embed(self.fixed, fake)
        out = {
            "fd_fixed": frechet_distance(self.fixed_feats["test"], feats),
            "fd_fixed_val": frechet_distance(self.fixed_feats["val"], feats),
            **precision_recall(self.fixed_feats["test"], feats),
        }
        return {k: round(v, 4) for k, v in out.items()}

    def _on_factors(self, fake: torch.Tensor) -> dict[str, Any]:
        if self.oracle is None:
            return {}
        cov = factor_coverage(
            self.real_factors, self._read_factors(self.oracle, fake), RATE_FACTORS
        )
        return {k: round(v, 4) for k, v in cov.items()}


def describe(m: dict[str, Any]) -> str:
    """One line of a snapshot's headline metrics."""
    parts = [f"{m['kimg']:7.2f} kimg"]
    for key, label, fmt in (
        ("fd_fixed", "FD(fixed)", ".3f"),
        ("precision", "P", ".2f"),
        ("recall", "R", ".2f"),
        ("fd_classifier", "FD(classifier)", ".3f"),
        ("fd_classifier_ratio", "x real", ".1f"),
        ("class_share_gap", "class gap", ".3f"),
        ("rate/marker/generated", "marker", ".2f"),
    ):
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}")
    return "  ".join(parts)


@torch.no_grad()
def generate(
    G: torch.nn.Module, n: int, device: torch.device, psi: float = 1.0, batch: int = 64
) -> torch.Tensor:
    """``n`` images ``[n, C, H, W]`` from fixed latents (seeded apart from training)."""
    z = torch.randn(n, G.z_dim, generator=generator(METRIC_SEED, Stream.GENERATOR_SAMPLES))
    return torch.cat([G(zb.to(device), psi=psi, noise_mode="const").cpu() for zb in z.split(batch)])


def best_index(snapshots: list[dict[str, Any]], metric: str, tolerance: float = 1.0) -> int | None:
    """The latest snapshot whose ``metric`` is within ``tolerance`` times the lowest, among those
    not marked collapsed; None if none qualifies. With ``tolerance`` 1 that is the lowest (the
    last of ties). Above 1 a later snapshot that measures as good, within the metric's noise,
    wins: G keeps refining what a 500-image distance cannot see. The index never moves back to
    a snapshot before the current best (a new lowest value is itself the latest within range),
    so the training state kept for it stays the right one."""
    scored = [
        (m[metric], i)
        for i, m in enumerate(snapshots)
        if m.get(metric) is not None and not m.get("collapsed", False)
    ]
    if not scored:
        return None
    bound = min(scored)[0] * tolerance
    return max(i for v, i in scored if v <= bound)


# ----------------------------------------------------------------------------- collapse


@dataclass(frozen=True)
class CollapseRule:
    """When the snapshots say training has collapsed, and what recovering costs.

    A snapshot is collapsed when the classifier's class shares of generated images moved more
    than ``class_gap`` further off the real ones than the best snapshot's while the kept metric
    got worse than the best's, when the kept metric is more than ``fd_ratio`` times its best so
    far, or when recall (the share of real images the generated ones cover) is below
    ``recall_ratio`` times the best snapshot's. The class-share rule is relative and asks for a
    worse yardstick because the shares are read by the run's own classifier: a shortcut
    classifier calls an image diseased by its marker, so a G that improves but does not draw the
    marker yet sits 40 points off for tens of kimg (an absolute 30-point rule rolled such a run
    back three times, to states that drew no marker at all). Mode collapse onto one class moves
    the shares and worsens the fixed yardstick together. A collapsed snapshot is never kept nor
    rolled back to; before ``start_kimg`` it does not count toward a rollback (early training
    swings and recovers: the cpu_demo knee G's class shares were 28 points off at 10 kimg and
    0.2 at 80).
    ``patience`` collapsed snapshots in a row trigger a rollback to the best state with the
    learning rates times ``lr_factor``, at most ``max_rollbacks`` times.
    """

    enabled: bool = True
    start_kimg: float = 0.0
    class_gap: float = 0.30
    fd_ratio: float = 3.0
    recall_ratio: float = 0.5
    patience: int = 2
    lr_factor: float = 0.5
    max_rollbacks: int = 3

    @classmethod
    def from_config(cls, node: DictConfig | None) -> CollapseRule:
        if node is None:
            return cls(enabled=False)
        return cls(**OmegaConf.to_container(node, resolve=True))

    def reasons(self, snap: dict[str, Any], best: dict[str, Any] | None, metric: str) -> list[str]:
        """Why ``snap`` counts as collapsed against the ``best`` snapshot (empty: it does not)."""
        out = []
        value, ref = snap.get(metric), (best or {}).get(metric)
        gap, ref_gap = snap.get("class_share_gap"), (best or {}).get("class_share_gap", 0.0)
        worse = best is None or (value is not None and ref is not None and value > ref)
        if gap is not None and gap > ref_gap + self.class_gap and worse:
            out.append(
                f"class shares {gap:.2f} off the real ones, more than {self.class_gap:g} beyond"
                f" the best snapshot's {ref_gap:.2f}, while {metric} got worse"
            )
        if value is not None and ref is not None and value > self.fd_ratio * ref:
            out.append(f"{metric} {value:.3g} > {self.fd_ratio:g} x its best {ref:.3g}")
        recall, ref = snap.get("recall"), (best or {}).get("recall")
        if recall is not None and ref is not None and recall < self.recall_ratio * ref:
            out.append(f"recall {recall:.2f} < {self.recall_ratio:g} x the best's {ref:.2f}")
        return out
