"""Procedural H&E histology tiles: normal tissue vs tumour, with a ground-truth tumour mask.

Colour follows Beer-Lambert: each pixel's optical density is a hematoxylin concentration
times the H colour vector plus an eosin concentration times the E vector, so stain variation
is a jitter of those vectors and strengths. Lengths are in image-side units (1.0 = the tile
width), so the same tile renders at any resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from cfexplain.data.phantoms.knee import (
    SPLITS,
    CachedPhantom,
    area_down,
    band_noise,
    check_common,
    check_index,
    coverage_mask,
    phantom_report,
    pixel_grid,
    resample,
    sample_seed,
    to_tensor_image,
)

CLASS_NAMES = ["normal", "tumour"]
# Optical-density directions of the two stains (R, G, B) before jitter.
H_VECTOR = (0.65, 0.70, 0.29)
E_VECTOR = (0.07, 0.99, 0.11)


def _unit(vec: np.ndarray) -> np.ndarray:
    return vec / np.linalg.norm(vec)


def _sample_factors(rng: np.random.Generator, tumour: bool) -> dict[str, float]:
    """Tissue and acquisition factors of one tile (the nuisance ones independent of the label)."""
    u = rng.uniform
    h = _unit(np.abs(np.array(H_VECTOR) + rng.normal(0.0, 0.06, 3)))
    e = _unit(np.abs(np.array(E_VECTOR) + rng.normal(0.0, 0.06, 3)))
    return {
        "tumour": float(tumour),
        # Tumour region: a blob with a wavy border, centred somewhere on the tile.
        "region_x": u(-0.3, 0.3),
        "region_y": u(-0.3, 0.3),
        "region_radius": u(0.18, 0.45),
        # Nuclei: density in nuclei per unit area, radius in image-side units.
        "normal_density": u(35.0, 60.0),
        "normal_nucleus_radius": u(0.016, 0.022),
        "tumour_density": u(90.0, 140.0),
        "tumour_nucleus_radius": u(0.027, 0.038),
        "pleomorphism": u(0.25, 0.45),
        "hyperchromasia": u(1.35, 1.8),
        "lymphocytes": float(rng.uniform() < 0.3),
        "fibre_angle": u(0.0, 180.0),
        "lumen": u(0.0, 0.2),
        # Acquisition.
        "stain_h_r": float(h[0]),
        "stain_h_g": float(h[1]),
        "stain_h_b": float(h[2]),
        "stain_e_r": float(e[0]),
        "stain_e_g": float(e[1]),
        "stain_e_b": float(e[2]),
        "h_strength": u(0.75, 1.25),
        "e_strength": u(0.7, 1.3),
        "brightness": u(0.88, 1.0),
        "blur": u(0.0, 0.006),
        "noise": u(0.005, 0.03),
    }


def _nuclei(
    rng: np.random.Generator,
    count: int,
    radius: float,
    spread: float,
    aspect_max: float,
    darkness: float,
) -> dict[str, np.ndarray]:
    """Centres (image-side units), semi-axes, angles, irregularity and darkness of nuclei."""
    r = radius * np.exp(rng.normal(0.0, spread, count))
    aspect = rng.uniform(1.0, aspect_max, count)
    return {
        "x": rng.uniform(-0.5, 0.5, count),
        "y": rng.uniform(-0.5, 0.5, count),
        "a": r * np.sqrt(aspect),
        "b": r / np.sqrt(aspect),
        "angle": rng.uniform(0.0, math.pi, count),
        "irregular": rng.uniform(0.0, 1.0, count) * spread,
        "phase": rng.uniform(0.0, 2.0 * math.pi, (2, count)),
        "dark": darkness * np.exp(rng.normal(0.0, 0.5 * spread, count)),
    }


def _per_nucleus(values: np.ndarray) -> np.ndarray:
    """Per-nucleus values [N] as float32 [N, 1, 1], to broadcast over each one's window."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _splat_nuclei(nuc: dict[str, np.ndarray], size: int, chroma: np.ndarray) -> np.ndarray:
    """Hematoxylin concentration [size, size] of the given nuclei, drawn in small windows."""
    out = np.zeros(size * size, dtype=np.float32)
    if nuc["x"].size == 0:
        return out.reshape(size, size)
    cx = (nuc["x"] + 0.5) * size - 0.5
    cy = (nuc["y"] + 0.5) * size - 0.5
    k = int(math.ceil(1.6 * nuc["a"].max() * size)) + 1
    off = np.arange(-k, k + 1)
    ix = np.rint(cx).astype(np.int64)[:, None, None] + off[None, None, :]
    iy = np.rint(cy).astype(np.int64)[:, None, None] + off[None, :, None]
    lx = (ix - cx[:, None, None]).astype(np.float32)  # [N, 1, W]
    ly = (iy - cy[:, None, None]).astype(np.float32)  # [N, W, 1]
    ca, sa = _per_nucleus(np.cos(nuc["angle"])), _per_nucleus(np.sin(nuc["angle"]))
    xr = (lx * ca + ly * sa) / _per_nucleus(nuc["a"] * size)
    yr = (ly * ca - lx * sa) / _per_nucleus(nuc["b"] * size)
    rho = np.sqrt(xr * xr + yr * yr) + 1e-6
    # Pleomorphic nuclei have lumpy outlines: the radius wobbles with the angle phi; cos and
    # sin of 2 phi and 3 phi come from the unit direction, which is cheaper than arctan2.
    ux, uy = xr / rho, yr / rho
    c2, s2 = ux * ux - uy * uy, 2.0 * ux * uy
    c3, s3 = ux * c2 - uy * s2, uy * c2 + ux * s2
    p0, p1 = nuc["phase"]
    lobes = 0.6 * (c2 * _per_nucleus(np.cos(p0)) - s2 * _per_nucleus(np.sin(p0)))
    lobes = lobes + 0.4 * (c3 * _per_nucleus(np.cos(p1)) - s3 * _per_nucleus(np.sin(p1)))
    wobble = 1.0 + _per_nucleus(nuc["irregular"]) * lobes
    # About one pixel of anti-aliased edge.
    edge = (1.0 - rho / wobble) * _per_nucleus(nuc["b"] * size) + 0.5
    val = np.minimum(np.maximum(edge, 0.0), 1.0) * _per_nucleus(nuc["dark"])
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size) & (val > 0)
    flat = (iy * size + ix)[inside]
    # Chromatin: coarse granules inside each nucleus.
    weights = val[inside] * (0.7 + 0.6 * chroma.ravel()[flat])
    out += np.bincount(flat, weights=weights, minlength=size * size).astype(np.float32)
    return out.reshape(size, size)


def _nucleus_groups(
    f: Mapping[str, float], seeds: Mapping[str, int], is_tumour: bool
) -> list[tuple[dict[str, np.ndarray], bool]]:
    """``(nuclei, lives inside the tumour region)`` for the normal nuclei, the lymphocyte
    cluster (when ``lymphocytes``) and the tumour nuclei (when ``is_tumour``), each group
    from its own stream."""
    nrng = np.random.default_rng(seeds["normal"])
    normal = _nuclei(
        nrng, int(nrng.poisson(f["normal_density"])), f["normal_nucleus_radius"], 0.12, 2.2, 1.0
    )
    groups = [(normal, False)]
    if f["lymphocytes"] >= 0.5:
        lrng = np.random.default_rng(seeds["lymph"])
        lymph = _nuclei(
            lrng, int(lrng.poisson(40)), 0.6 * f["normal_nucleus_radius"], 0.05, 1.1, 1.6
        )
        cx, cy = lrng.uniform(-0.35, 0.35, 2)
        lymph["x"] = cx + 0.09 * lrng.standard_normal(lymph["x"].size)
        lymph["y"] = cy + 0.09 * lrng.standard_normal(lymph["y"].size)
        groups.append((lymph, False))
    if is_tumour:
        rng = np.random.default_rng(seeds["tumour"])
        tumour = _nuclei(
            rng,
            int(rng.poisson(f["tumour_density"])),
            f["tumour_nucleus_radius"],
            f["pleomorphism"],
            1.8,
            f["hyperchromasia"],
        )
        groups.append((tumour, True))
    return groups


def render_histology(
    factors: Mapping[str, float], seeds: Mapping[str, int], resolution: int, supersample: int = 2
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """RGB image [R, R, 3] float32 in [0, 1] and masks {"tumour": bool [R, R]}.

    Normal nuclei come from their own stream and only those inside the tumour region are
    replaced, so turning ``tumour`` off changes nothing outside the region.
    """
    f = factors
    size = resolution * supersample
    g = pixel_grid(size)
    gx, gy = g[None, :], g[:, None]

    # Tumour region: a disc whose border is pushed in and out by smooth noise.
    wave = resample(band_noise(np.random.default_rng(seeds["region"]), 32, 2.0, 6.0), size)
    dist = np.sqrt((gx - f["region_x"]) ** 2 + (gy - f["region_y"]) ** 2)
    region = f["region_radius"] * (1.0 + 0.3 * wave) - dist  # > 0 inside
    is_tumour = f["tumour"] >= 0.5
    in_region = region > 0 if is_tumour else np.zeros((size, size), dtype=bool)

    # Eosin: fibrous stroma with a few empty lumina; tumour nests are less fibrous.
    srng = np.random.default_rng(seeds["stroma"])
    grain = size / 128.0  # fibre grain is set at 128 supersampled pixels per tile
    fib = band_noise(srng, size, 0.7 * grain, 5.0 * grain, aspect=4.0, angle=f["fibre_angle"])
    holes = resample(band_noise(srng, 32, 2.0, 7.0), size)
    lumen = np.clip((holes - (2.2 - 8.0 * f["lumen"])) * 2.0, 0.0, 1.0)
    tumour_soft = np.clip(region / 0.02, 0.0, 1.0) if is_tumour else 0.0
    conc_e = 0.55 * (0.75 + 0.25 * np.tanh(fib) * (1.0 - 0.6 * tumour_soft)) * (1.0 - lumen)
    conc_h = 0.06 + 0.10 * tumour_soft * (1.0 - lumen)  # cytoplasm takes a little hematoxylin

    # Nuclei: normal ones everywhere except the tumour region; larger, darker, pleomorphic and
    # crowded ones inside it; optional lymphocyte clusters (small, round, very dark) anywhere.
    chroma = np.random.default_rng(seeds["chroma"]).random((size, size), dtype=np.float32)
    for nuc, in_tumour in _nucleus_groups(f, seeds, is_tumour):
        col = np.clip(((nuc["x"] + 0.5) * size).astype(np.intp), 0, size - 1)
        row = np.clip(((nuc["y"] + 0.5) * size).astype(np.intp), 0, size - 1)
        inside = in_region[row, col]
        keep = inside if in_tumour else ~inside
        conc_h = conc_h + _splat_nuclei({k: v[..., keep] for k, v in nuc.items()}, size, chroma)

    od = (f["h_strength"] * conc_h)[..., None] * np.array(
        [f["stain_h_r"], f["stain_h_g"], f["stain_h_b"]], dtype=np.float32
    )
    od = od + (f["e_strength"] * conc_e)[..., None] * np.array(
        [f["stain_e_r"], f["stain_e_g"], f["stain_e_b"]], dtype=np.float32
    )
    rgb = f["brightness"] * np.exp(-od.astype(np.float32))
    rgb = area_down(np.moveaxis(rgb, -1, 0), supersample)  # [3, R, R]

    sigma = f["blur"] * resolution
    if sigma > 0.25:
        rgb = ndimage.gaussian_filter(rgb, (0.0, sigma, sigma), mode="nearest")
    noise_rng = np.random.default_rng(seeds["noise"])
    rgb = rgb + f["noise"] * noise_rng.standard_normal(rgb.shape, dtype=np.float32)
    cover = area_down(in_region.astype(np.float32), supersample)
    score = area_down(region.astype(np.float32), supersample)
    masks = {"tumour": coverage_mask(cover, score, is_tumour)}
    return np.clip(np.moveaxis(rgb, 0, -1), 0.0, 1.0).astype(np.float32), masks


class HistologyPhantom(CachedPhantom):
    """H&E tiles, normal (0) or tumour (1), generated on the fly.

    ``ds[i]`` is ``{"image": float32 [3, R, R] in [-1, 1], "label": int, "meta": {...}}`` with
    ``meta`` holding ``factors``, ``masks`` ({"tumour": bool [R, R]}, empty for normal tiles),
    ``tumour_fraction`` (share of the tile in the mask), ``index`` and ``split``. Labels are a
    fair coin per tile; sample i depends only on (seed, split, i).

    Factors: ``tumour`` (0/1), the region (``region_x``, ``region_y``, ``region_radius``),
    nuclei (``*_density`` per unit area, ``*_nucleus_radius``, ``pleomorphism``,
    ``hyperchromasia``), tissue (``lymphocytes`` 0/1, ``fibre_angle`` degrees, ``lumen``) and
    acquisition nuisance (``stain_h_*``/``stain_e_*`` unit OD vectors, ``h_strength``,
    ``e_strength``, ``brightness``, ``blur`` sigma, ``noise`` std), lengths in image-side units.
    """

    channels = 3
    class_names = CLASS_NAMES
    num_classes = 2

    def __init__(
        self,
        n: int,
        resolution: int = 64,
        seed: int = 0,
        split: str = "train",
        cache: bool = True,
        supersample: int = 2,
    ) -> None:
        check_common(n, resolution, seed, split)
        if supersample not in (1, 2, 4):
            raise ValueError(f"supersample must be 1, 2 or 4, got {supersample!r}")
        self.n, self.resolution, self.seed, self.split = int(n), int(resolution), int(seed), split
        self.supersample = supersample
        self.class_names = list(CLASS_NAMES)
        self.cache = cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.n

    def params(self, i: int) -> tuple[dict[str, float], dict[str, int]]:
        """``(factors, seeds)`` of tile i."""
        i = check_index(i, self.n)
        label_seq, factor_seq, layout_seq = sample_seed(self.seed, self.split, i).spawn(3)
        tumour = bool(np.random.default_rng(label_seq).uniform() < 0.5)
        factors = _sample_factors(np.random.default_rng(factor_seq), tumour)
        names = ("region", "stroma", "chroma", "normal", "lymph", "tumour", "noise")
        draws = np.random.default_rng(layout_seq).integers(2**31, size=len(names))
        seeds = dict(zip(names, draws.tolist()))
        return factors, seeds

    def render(self, i: int, overrides: Mapping[str, float] | None = None) -> dict:
        """Tile i with some factors replaced, e.g. ``{"tumour": 0}`` for its normal twin."""
        factors, seeds = self.params(i)
        for key, val in (overrides or {}).items():
            if key not in factors:
                raise KeyError(
                    f"unknown histology factor {key!r}; expected one of {sorted(factors)}"
                )
            factors[key] = float(val)
        return self._sample(i, factors, seeds)

    def _sample(self, i: int, factors: dict[str, float], seeds: dict[str, int]) -> dict:
        img, masks = render_histology(factors, seeds, self.resolution, self.supersample)
        meta: dict[str, Any] = {
            "factors": {k: float(v) for k, v in factors.items()},
            "masks": {k: torch.from_numpy(m) for k, m in masks.items()},
            "tumour_fraction": float(masks["tumour"].mean()),
            "index": int(i),
            "split": self.split,
            "report": phantom_report("histology", factors, (self.seed, SPLITS[self.split], i)),
        }
        from cfexplain.data.concepts import histology_concepts  # here: concepts reads this module

        meta["concepts"] = histology_concepts(factors)
        return {"image": to_tensor_image(img), "label": int(factors["tumour"] >= 0.5), "meta": meta}
