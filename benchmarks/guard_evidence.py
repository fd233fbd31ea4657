"""Which test images the guard flags, split by the knee phantom's marker.

    python benchmarks/guard_evidence.py runs/knee_shortcut [--limit 600]

For a trained knee run with a guard stage, on the first ``limit`` test images: the share flagged
by any signal and by ``evidence_loss`` among the images with a burned-in marker and among those
without, and the share of the marked images whose ``evidence_loss`` names a corner cell (where
the marker lies). Prints one JSON object. Not part of ``python -m benchmarks``: it needs a
trained run.
"""

from __future__ import annotations

import argparse
import json

import torch

from cfexplain.explain.guard import judge
from cfexplain.runs import TrainedRun

CORNERS = ("top left", "top right", "bottom left", "bottom right")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=600)
    a = p.parse_args()
    run = TrainedRun(a.run)
    if run.guard is None:
        raise SystemExit(f"{a.run}: no guard stage (python -m cfexplain.train ... stages=[guard])")
    ds = run.dataset("test")
    samples = [ds[i] for i in range(min(a.limit, len(ds)))]
    x = torch.stack([s["image"] for s in samples]).to(run.device)
    marked = [s["meta"]["factors"]["marker"] >= 0.5 for s in samples]
    verdicts = judge(run.guard_models(), x, run.guard)
    evidence = [[r for r in v.reasons if r.startswith("evidence_loss")] for v in verdicts]

    def share(hits: list[bool], among: bool) -> float:
        chosen = [h for h, m in zip(hits, marked) if m == among]
        return round(sum(chosen) / max(len(chosen), 1), 4)

    flagged = [v.flagged for v in verdicts]
    by_evidence = [bool(e) for e in evidence]
    corner = [any(c in r for r in e for c in CORNERS) for e in evidence]
    out = {
        "images": len(samples),
        "marked": sum(marked),
        "evidence_gap": run.guard.evidence_gap,
        "flagged_marked": share(flagged, True),
        "flagged_unmarked": share(flagged, False),
        "evidence_loss_marked": share(by_evidence, True),
        "evidence_loss_unmarked": share(by_evidence, False),
        "evidence_loss_in_a_corner_marked": share(corner, True),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
