"""Build a reader study: per reader a self-contained page with its images, the key beside them.

Turing part (Schutte et al. 2021; Park et al. 2021): real test images and G samples
(truncation psi 1, one z seed each) in an order of their own per reader; the reader says "real"
or "generated" with a confidence. Counterfactual part (Singla et al. 2023): test images that are
not in the Turing part (seeing one there would give it away as real), with their counterfactual
sequence and f's probability under each frame, rated on three Likert questions.

The key (truth, source, class, realism score of every item; the seed; each reader's order) is
``key.json`` beside the reader folders, never in a page or an image name. Images carry neutral
random names and no PNG text chunk. The same run and seed give the same study, byte for byte.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cfexplain.utils.artifacts import (
    fingerprint,
    write_bytes,
    write_json,
    write_text,
)
from cfexplain.utils.cli import ConfigError, class_index, whole_number
from cfexplain.utils.seeding import derived_seed

KEY_FILE = "key.json"
PAGE_FILE = "index.html"
IMAGE_DIR = "images"
KEY_FORMAT = "cfexplain-study-key/1"
# Singla et al. 2023's questions, rated 1 (disagree) to 5 (agree): (answer field, wording).
QUESTIONS = (
    ("plausible", "The change is plausible"),
    ("explains", "The change explains the decision"),
    ("identity", "The image keeps the patient's identity"),
)
# Keys of the study's random streams (derived_seed(seed, key, ...)): distinct draws.
_PICK, _LATENT, _ORDER, _NAMES = 1, 2, 3, 4
_PNG_KEPT = (b"IHDR", b"PLTE", b"IDAT", b"IEND")  # pixels only: no text, time or gamma chunk
_REALISM_K = 3  # neighbours of the realism score's reference radii (Kynkäänniemi et al. 2019)


@dataclass
class StudyRun:
    """What a study reads from a trained run."""

    dir: Path
    device: torch.device
    classes: list[str]
    data: Any  # the classifier stage's data config
    classifier: nn.Module
    generator: nn.Module
    engine: Any  # CounterfactualEngine, or None when the study has no counterfactual part
    fingerprints: dict[str, str]  # stage -> artifact fingerprint


def _open_run(run: str | Path, device: str, counterfactual: dict[str, Any] | None) -> StudyRun:
    """``run``'s classifier, generator and (for ``counterfactual`` parameters) its engine,
    opened through :class:`~cfexplain.runs.TrainedRun`."""
    from cfexplain.runs import TrainedRun
    from cfexplain.utils.distributed import resolve_device

    trained = TrainedRun(run, resolve_device(device))
    stages = ["classifier", "generator"]
    stages += ["encoder", "direction"] if counterfactual is not None else []
    for stage in stages:
        if not trained.has(stage):
            raise ConfigError(
                f"run={run}: no finished {stage} stage ({trained.artifact_file(stage)}); "
                f"the study needs {', '.join(stages)} (python -m cfexplain.train trains them)"
            )
    engine = None
    if counterfactual is not None:
        from cfexplain.explain.counterfactual import CounterfactualEngine

        engine = CounterfactualEngine.from_run(trained, **counterfactual)
    return StudyRun(
        dir=trained.dir,
        device=trained.device,
        classes=trained.classes,
        data=trained.config.data,
        classifier=trained.classifier,
        generator=trained.generator.eval(),
        engine=engine,
        fingerprints={s: trained.artifact(s).fingerprint for s in stages},
    )


# ----------------------------------------------------------------------------- images


def png_bytes(image: Tensor) -> bytes:
    """``image [C, H, W]`` in [-1, 1] as PNG bytes holding pixels only (no metadata chunk)."""
    from PIL import Image

    from cfexplain.utils.images import to_uint8

    arr = to_uint8(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return strip_png(buf.getvalue())


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """``[(type, body), ...]`` of a PNG file, in order."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length  # length, type, body, CRC
    return chunks


def strip_png(data: bytes) -> bytes:
    """``data`` with every chunk but the pixel chunks (IHDR, PLTE, IDAT, IEND) removed."""
    out, pos = [data[:8]], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] in _PNG_KEPT:
            out.append(data[pos : pos + 12 + length])
        pos += 12 + length
    return b"".join(out)


# ----------------------------------------------------------------------------- material


@torch.no_grad()
def _generated(r: StudyRun, seeds: list[int], batch_size: int) -> tuple[Tensor, list[int]]:
    """G samples ``[N, C, H, W]`` (psi 1, z from each seed) and the class f gives each."""
    z_dim = int(r.generator.z_dim)
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    images, classes = [], []
    for zb in z.split(batch_size):
        x = r.generator(zb.to(r.device), psi=1.0, noise_mode="const").clamp(-1, 1)
        classes += r.classifier(x).argmax(dim=1).tolist()
        images.append(x.cpu())
    return torch.cat(images), classes


@torch.no_grad()
def _features(model: nn.Module, x: Tensor, batch_size: int) -> tuple[Tensor, str]:
    """``[N, F]`` features for the realism score: f's pooled last feature map when it has one
    (a user's model may not), else 8x8 average-pooled pixels; and which of the two it is."""
    out = []
    use_f = callable(getattr(model, "features", None))
    for xb in x.split(batch_size):
        xb = xb.to(next(model.parameters()).device)
        h = (
            model.features(xb).mean(dim=(2, 3))
            if use_f
            else nn.functional.adaptive_avg_pool2d(xb, 8)
        )
        out.append(h.flatten(1).double().cpu())
    return torch.cat(out), "classifier features" if use_f else "8x8 pixels"


def realism_scores(reference: Tensor, points: Tensor, k: int = _REALISM_K) -> Tensor:
    """Realism score (Kynkäänniemi et al. 2019) of features ``points [M, F]`` against real
    ``reference [N, F]``: ``max_j r_j / |x - ref_j|``, with ``r_j`` the distance of ``ref_j`` to
    its k-th nearest reference neighbour. Above 1: inside the real manifold. ``[M]``."""
    radii = torch.cdist(reference, reference).kthvalue(k + 1, dim=1).values  # [N]; 1st is itself
    dist = torch.cdist(points, reference).clamp_min(1e-12)  # [M, N]
    return (radii[None] / dist).max(dim=1).values


@dataclass
class Material:
    """The study's items and their images, in item order (the key's order, not a reader's)."""

    turing: list[dict[str, Any]]  # key entries: truth, source, class, realism
    turing_png: list[bytes]  # one PNG per Turing item
    counterfactuals: list[dict[str, Any]]  # key entries: source, class, λ and p per frame
    cf_png: list[list[bytes]]  # per counterfactual item: input PNG, then one PNG per frame
    realism: dict[str, Any]  # how the realism scores were computed


def _material(
    r: StudyRun,
    *,
    n_real: int,
    n_fake: int,
    n_cf: int,
    seed: int,
    target: int,
    lambdas: Any,
    realism_reference: int,
    batch_size: int,
) -> Material:
    """Pick the test images (disjoint: Turing reals, counterfactual inputs, realism reference),
    sample G, score realism and render the counterfactual sequences."""
    from cfexplain.data import build_dataset

    ds = build_dataset(r.data, "test")
    if hasattr(ds, "cache"):
        ds.cache = False  # each image is read once
    if n_real + n_cf > len(ds):
        raise ConfigError(
            f"n_real={n_real} + n_cf={n_cf}: the run's test split has only {len(ds)} images"
        )
    names = [str(c) for c in getattr(ds, "class_names", r.classes)]
    order = [int(i) for i in np.random.default_rng(derived_seed(seed, _PICK)).permutation(len(ds))]
    real_idx, cf_idx = order[:n_real], order[n_real : n_real + n_cf]
    ref_idx = order[n_real + n_cf :][:realism_reference]
    load = {i: ds[i] for i in real_idx + cf_idx + ref_idx}
    z_seeds = [derived_seed(seed, _LATENT, i) % 2**32 for i in range(n_fake)]
    fake, fake_cls = _generated(r, z_seeds, batch_size)
    real = torch.stack([load[i]["image"] for i in real_idx])
    if fake.shape[1:] != real.shape[1:]:
        raise ConfigError(
            f"run={r.dir}: G makes images {tuple(fake.shape[1:])} but the test images are "
            f"{tuple(real.shape[1:])}; readers would tell them apart by size"
        )
    turing = [
        {
            "truth": "real",
            "source": {"test_index": i},
            "class": names[int(load[i]["label"])],
            "class_from": "label",
        }
        for i in real_idx
    ] + [
        {
            "truth": "generated",
            "source": {"z_seed": s, "psi": 1.0},
            "class": r.classes[c],
            "class_from": "classifier",
        }
        for s, c in zip(z_seeds, fake_cls)
    ]
    turing = [{"item": n, **entry, "realism": None} for n, entry in enumerate(turing)]
    images = torch.cat([real, fake])
    realism: dict[str, Any] = {"reference_images": len(ref_idx), "k": _REALISM_K}
    if len(ref_idx) > _REALISM_K:
        ref = torch.stack([load[i]["image"] for i in ref_idx])
        feats, realism["features"] = _features(r.classifier, torch.cat([ref, images]), batch_size)
        scores = realism_scores(feats[: len(ref)], feats[len(ref) :])
        for item, s in zip(turing, scores.tolist()):
            item["realism"] = round(float(s), 6)
    cf, cf_png = _counterfactuals(
        r, [load[i] for i in cf_idx], cf_idx, names, target, lambdas, batch_size
    )
    return Material(turing, [png_bytes(x) for x in images], cf, cf_png, realism)


def _counterfactuals(
    r: StudyRun,
    samples: list[dict],
    indices: list[int],
    names: list[str],
    target: int,
    lambdas: Any,
    batch_size: int,
) -> tuple[list[dict[str, Any]], list[list[bytes]]]:
    """Key entries and PNGs (input, frames...) of the counterfactual items."""
    entries: list[dict[str, Any]] = []
    pngs: list[list[bytes]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        x = torch.stack([s["image"] for s in chunk])
        cf = r.engine(x, target=target, lambdas=lambdas)
        for i, s in enumerate(chunk):
            entries.append(
                {
                    "item": len(entries),
                    "source": {"test_index": indices[start + i]},
                    "class": names[int(s["label"])],
                    "input_prob": round(float(cf.input_probs[i]), 6),
                    "lambdas": [round(float(v), 6) for v in cf.lambdas[i]],
                    "probs": [round(float(v), 6) for v in cf.probs[i]],
                }
            )
            pngs.append([png_bytes(x[i])] + [png_bytes(f) for f in cf.images[i].cpu()])
    return entries, pngs


# ----------------------------------------------------------------------------- readers


def _tokens(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct neutral names (12 hex digits)."""
    seen: list[str] = []
    while len(seen) < n:
        t = rng.bytes(6).hex()
        if t not in seen:
            seen.append(t)
    return seen


def reader_plan(seed: int, reader: int, m: Material) -> dict[str, Any]:
    """Reader ``reader``'s (0-based) orders and image names, as the key records them."""
    rng = np.random.default_rng(derived_seed(seed, _ORDER, reader))
    turing = [int(i) for i in rng.permutation(len(m.turing))]
    cf = [int(i) for i in rng.permutation(len(m.counterfactuals))]
    frames = [len(m.cf_png[j]) - 1 for j in cf]
    names = iter(
        _tokens(
            np.random.default_rng(derived_seed(seed, _NAMES, reader)),
            len(turing) + len(cf) + sum(frames),
        )
    )
    return {
        "reader": f"reader-{reader + 1}",
        "turing": [{"token": next(names), "item": i} for i in turing],
        "counterfactual": [
            {"token": next(names), "item": j, "frames": [next(names) for _ in range(k)]}
            for j, k in zip(cf, frames)
        ],
    }


def _write_reader(
    folder: Path, plan: dict[str, Any], m: Material, key: dict[str, Any], time_limit_s: float
) -> None:
    """``folder/index.html`` and ``folder/images/<token>.png``, written in display order."""
    from cfexplain.study.page import render_page

    def src(token: str) -> str:
        return f"{IMAGE_DIR}/{token}.png"

    for entry in plan["turing"]:
        write_bytes(folder / src(entry["token"]), m.turing_png[entry["item"]])
    cf_spec = []
    for entry in plan["counterfactual"]:
        pngs, info = m.cf_png[entry["item"]], key["counterfactuals"][entry["item"]]
        for token, data in zip([entry["token"], *entry["frames"]], pngs):
            write_bytes(folder / src(token), data)
        cf_spec.append(
            {
                "id": entry["token"],
                "input": src(entry["token"]),
                "input_p": info["input_prob"],
                "frames": [{"src": src(t), "p": p} for t, p in zip(entry["frames"], info["probs"])],
            }
        )
    spec = {
        "study": key["study_id"],
        "reader": plan["reader"],
        "target": key["target"],
        "time_limit_s": time_limit_s,
        "questions": [{"id": q, "text": text} for q, text in QUESTIONS],
        "turing": [{"id": e["token"], "src": src(e["token"])} for e in plan["turing"]],
        "counterfactual": cf_spec,
    }
    write_text(folder / PAGE_FILE, render_page(spec))


# ----------------------------------------------------------------------------- the study


def build_study(
    run: str | Path,
    out: str | Path,
    *,
    readers: int,
    n_real: int,
    n_fake: int,
    n_cf: int,
    seed: int,
    target: int | str,
    lambdas: Any = "auto",
    time_limit_s: float = 0.0,
    realism_reference: int = 200,
    batch_size: int = 16,
    device: str = "auto",
    counterfactual: dict[str, Any] | None = None,
) -> Path:
    """Build the study folder ``out`` (reader folders and ``key.json``); return its path.

    It is built in a hidden sibling folder and renamed into place at the end: a killed build
    leaves no half study. An existing ``out`` is never overwritten.
    """
    readers, n_real = whole_number("readers", readers), whole_number("n_real", n_real)
    n_fake, n_cf = whole_number("n_fake", n_fake), whole_number("n_cf", n_cf, 0)
    seed, batch_size = whole_number("seed", seed, 0), whole_number("batch_size", batch_size)
    realism_reference = whole_number("realism_reference", realism_reference)
    if (
        isinstance(time_limit_s, bool)
        or not isinstance(time_limit_s, int | float)
        or time_limit_s < 0
    ):
        raise ConfigError(f"time_limit_s={time_limit_s!r}: expected a number of seconds >= 0")
    time_limit_s = float(time_limit_s)
    out = Path(str(out)).expanduser().resolve()
    if out.exists():
        raise ConfigError(f"out={out}: exists already; a study is never overwritten")
    r = _open_run(run, device, dict(counterfactual or {}) if n_cf else None)
    target = class_index(target, r.classes)
    m = _material(
        r,
        n_real=n_real,
        n_fake=n_fake,
        n_cf=n_cf,
        seed=seed,
        target=target,
        lambdas=lambdas,
        realism_reference=realism_reference,
        batch_size=batch_size,
    )
    key: dict[str, Any] = {
        "format": KEY_FORMAT,
        "seed": seed,
        "run": str(r.dir),
        "stages": r.fingerprints,
        "classes": r.classes,
        "target": r.classes[target],
        "counts": {
            "readers": readers,
            "n_real": n_real,
            "n_fake": n_fake,
            "n_cf": n_cf,
        },
        "time_limit_s": time_limit_s,
        # how each generated item is made again from its z_seed
        "generated": "G(torch.randn(z_dim, generator=torch.Generator().manual_seed(z_seed)), "
        "psi=1, noise_mode='const')",
        "questions": [{"id": q, "text": text} for q, text in QUESTIONS],
        "realism": m.realism,
        "items": m.turing,
        "counterfactuals": m.counterfactuals,
        "readers": [reader_plan(seed, i, m) for i in range(readers)],
    }
    key = {"study_id": fingerprint(key), **key}
    return _write_study(out, key, m, time_limit_s)


def _write_study(out: Path, key: dict[str, Any], m: Material, time_limit_s: float) -> Path:
    """Write the reader folders and the key into a hidden sibling of ``out``, then rename it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the study is shared like any folder
        for plan in key["readers"]:
            _write_reader(tmp / plan["reader"], plan, m, key, time_limit_s)
        write_json(tmp / KEY_FILE, key)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
