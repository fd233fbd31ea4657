"""Procedural AP knee radiographs with Kellgren-Lawrence ground truth.

Factors (``meta["factors"]``, plain floats):

- disease: ``jsw_medial``, ``jsw_lateral`` (joint-space width per compartment),
  ``osteophyte`` (length of the largest marginal spur, 0 = none), ``sclerosis`` and
  ``deformity`` (unitless, 0 = none, 1 = severe);
- nuisance, drawn independently of disease: ``rotation`` (degrees, counter-clockwise as
  displayed), ``scale``, ``shift_x``, ``shift_y``, ``exposure``, ``gamma``, ``noise`` (std of
  detector noise in [0, 1] grey levels), ``blur`` (Gaussian sigma), ``laterality`` (0 left,
  1 right = mirrored image);
- ``marker``: 1 when a lead "L"/"R" marker is burned into a corner (see :func:`marker_rule`).

Units: every length is in *image-side units*, 1.0 being the image width, so a length ``v``
spans ``v * resolution * scale`` pixels at any resolution (``jsw_medial = 0.07`` is about 4.5
px at 64 px). Per-subject shape, density and texture (``meta["anatomy"]``) vary as well.

Sampling: a latent severity s ~ U(0, 1) drives every disease factor through its own noisy
ramp; the grade is :func:`kl_grade` of the factors (about half the images have KL >= 2).

The anatomy is drawn in a canonical frame (a left knee, lateral side on the viewer's right,
y pointing down) from approximate signed distances; each output pixel is mapped back into that
frame, so the image and the masks share one geometric transform. Edges are anti-aliased
analytically and by supersampling.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy import fft as sp_fft
from scipy import ndimage

from cfexplain.data import ImageDataset

SPLITS = {"train": 0, "val": 1, "test": 2}
TASKS = {"binary": ["KL<2", "KL>=2"], "kl": ["KL0", "KL1", "KL2", "KL3", "KL4"]}
DISEASE_FACTORS = ("jsw_medial", "jsw_lateral", "osteophyte", "sclerosis", "deformity")
# The disease factors in the groups that vary on their own (both joint-space widths narrow
# together), e.g. when ``KneePhantom(decorrelate=...)`` or an oracle redraws them.
DISEASE_GROUPS = (("jsw_medial", "jsw_lateral"), ("osteophyte",), ("sclerosis",), ("deformity",))
NUISANCE_FACTORS = (
    "rotation",
    "scale",
    "shift_x",
    "shift_y",
    "exposure",
    "gamma",
    "noise",
    "blur",
    "laterality",
)
MASK_NAMES = ("osteophyte", "joint_space", "sclerosis", "marker")

# Kellgren-Lawrence thresholds (image-side units for lengths). At 64 px and scale 1 a definite
# osteophyte is >= 3.2 px and a healthy joint space about 4-5 px.
JSW_DOUBTFUL = 0.052
JSW_DEFINITE = 0.040
JSW_MARKED = 0.022
OST_DEFINITE = 0.050
OST_MODERATE = 0.072
OST_LARGE = 0.095
SCL_SOME = 0.15
SCL_SEVERE = 0.50
DEF_PRESENT = 0.25


def kl_grade(factors: Mapping[str, float]) -> int:
    """Kellgren-Lawrence grade 0-4 from the disease factors (monotone in each factor).

    4: large osteophytes, marked narrowing, severe sclerosis and deformity;
    3: moderate osteophytes, definite narrowing and some sclerosis; 2: definite osteophyte;
    1: doubtful narrowing or a possible tiny osteophyte; 0: none. Narrowing is judged on the
    narrower compartment. Each level is an upward-closed condition and the grade is the highest
    level that holds, so worsening any factor can never lower it.
    """
    missing = [k for k in DISEASE_FACTORS if k not in factors]
    if missing:
        raise KeyError(f"kl_grade needs factors {DISEASE_FACTORS}; missing {missing}")
    jsw = min(float(factors["jsw_medial"]), float(factors["jsw_lateral"]))
    ost = float(factors["osteophyte"])
    scl = float(factors["sclerosis"])
    dfm = float(factors["deformity"])
    if ost >= OST_LARGE and jsw <= JSW_MARKED and scl >= SCL_SEVERE and dfm >= DEF_PRESENT:
        return 4
    if ost >= OST_MODERATE and jsw <= JSW_DEFINITE and scl >= SCL_SOME:
        return 3
    if ost >= OST_DEFINITE:
        return 2
    if ost > 0.0 or jsw <= JSW_DOUBTFUL:
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by the histology phantom).


def check_common(n: int, resolution: int, seed: int, split: str) -> None:
    """Raise ValueError naming the argument when n, resolution, seed or split is invalid."""
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if (
        not isinstance(resolution, (int, np.integer))
        or resolution < 16
        or resolution > 1024
        or resolution & (resolution - 1)
    ):
        raise ValueError(f"resolution must be a power of two in [16, 1024], got {resolution!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def sample_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed sequence of sample ``index``: a function of (seed, split, index) only."""
    return np.random.SeedSequence([int(seed), SPLITS[split], int(index)])


def check_index(i: int, n: int) -> int:
    """``i`` as a non-negative index into ``n`` samples, or IndexError."""
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} samples")
    return int(i) % n


def pixel_grid(size: int) -> np.ndarray:
    """Pixel centres [size] in image-side units, exactly symmetric about 0 so mirroring is exact."""
    half = (np.arange(size // 2, dtype=np.float64) + 0.5) / size
    return np.concatenate([-half[::-1], half]).astype(np.float32)


def area_down(x: np.ndarray, factor: int) -> np.ndarray:
    """Block means over the last two axes: [..., H, W] -> [..., H/f, W/f]."""
    if factor == 1:
        return x
    # Strided sums: several times faster than a reshape-mean on small images.
    acc = x[..., 0::factor, 0::factor].astype(np.float32)
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                acc = acc + x[..., dy::factor, dx::factor]
    return acc * np.float32(1.0 / (factor * factor))


def coverage_mask(cover: np.ndarray, score: np.ndarray, present: bool) -> np.ndarray:
    """Pixels at least half covered; when the feature is present but thinner than a pixel, the
    pixel where ``score`` peaks, so a mask is non-empty exactly when its factor is present."""
    if not present:
        return np.zeros(cover.shape, dtype=bool)
    mask = cover >= 0.5
    if not mask.any():
        mask.flat[int(np.argmax(score))] = True
    return mask


def clip01(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1]; two ufuncs are cheaper than ``np.clip`` on small arrays."""
    return np.minimum(np.maximum(x, 0.0), 1.0)


def smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two signed distances (positive inside) with a fillet of radius ~k."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.maximum(a, b) + h * h * (k * 0.25)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Intersection of two signed distances with rounded corners of radius ~k."""
    return -smooth_max(-a, -b, k)


def band_noise(
    rng: np.random.Generator,
    size: int,
    fine: float,
    coarse: float,
    aspect: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """Unit-variance, tileable band-pass noise [size, size]: a difference of Gaussians with
    sigmas ``fine`` < ``coarse`` (pixels). ``aspect`` > 1 stretches the grain along the
    direction ``angle`` (degrees from vertical, counter-clockwise)."""
    white = rng.random((size, size), dtype=np.float32) - 0.5
    fy = sp_fft.fftfreq(size).astype(np.float32)[:, None]
    fx = sp_fft.rfftfreq(size).astype(np.float32)[None, :]
    if angle:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        fy, fx = c * fy - s * fx, s * fy + c * fx
    fy = fy * aspect
    r2 = (fy * fy + fx * fx) * np.float32(2.0 * math.pi**2)
    gain = np.exp(r2 * np.float32(-fine * fine)) - np.exp(r2 * np.float32(-coarse * coarse))
    field = sp_fft.irfft2(sp_fft.rfft2(white) * gain, s=(size, size))
    return field / (field.std() + 1e-6)


def resample(tile: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, wrap-around resampling of a square tile [T, T] to [size, size]."""
    t = tile.shape[0]
    pos = (np.arange(size, dtype=np.float64) + 0.5) * (t / size) - 0.5
    lo = np.floor(pos).astype(np.intp)
    w = (pos - lo).astype(np.float32)
    lo, hi = lo % t, (lo + 1) % t
    # Gathers, not a matrix product: small BLAS calls stall on thread start-up.
    rows = tile[lo] * (1.0 - w)[:, None] + tile[hi] * w[:, None]
    return (rows[:, lo] * (1.0 - w) + rows[:, hi] * w).astype(np.float32)


def copy_sample(sample: Any) -> Any:
    """A deep copy of a sample's dicts and tensors, so callers cannot change a cached one."""
    if isinstance(sample, dict):
        return {k: copy_sample(v) for k, v in sample.items()}
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    return sample


class CachedPhantom(ImageDataset):
    """A phantom whose samples are rendered from ``params(i)`` by ``_sample(i, *params)`` and,
    with ``cache`` on, kept (callers get copies, so a cached sample never changes)."""

    n: int
    cache: bool
    _cache: dict[int, dict]

    def params(self, i: int) -> tuple:
        raise NotImplementedError

    def _sample(self, i: int, *params: Any) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, self.n)
        if self.cache and i in self._cache:
            return copy_sample(self._cache[i])
        sample = self._sample(i, *self.params(i))
        if self.cache:
            self._cache[i] = sample
            return copy_sample(sample)
        return sample

    def materialise(self) -> CachedPhantom:
        """Fill the cache with every sample (do it before forking DataLoader workers)."""
        self.cache = True
        for i in range(self.n):
            self[i]
        return self


def phantom_report(
    kind: str, factors: Mapping[str, float], seed: tuple, grade: int | None = None
) -> str:
    """The sample's report (cfexplain.data.reports; imported here, which imports this module)."""
    from cfexplain.data.reports import write_report

    return write_report(kind, factors, seed, grade)


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """[H, W] or [H, W, C] float in [0, 1] -> float32 [C, H, W] in [-1, 1]."""
    arr = np.clip(img, 0.0, 1.0) * 2.0 - 1.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = np.moveaxis(arr, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# Sampling of factors.


def _sample_disease(rng: np.random.Generator, anatomy: Mapping[str, float]) -> dict[str, float]:
    """Disease factors from one latent severity s ~ U(0, 1), each with its own noise."""
    s = rng.uniform(0.0, 1.0)

    def ramp(start: float, width: float, sd: float) -> float:
        return float(np.clip((s - start) / width + rng.normal(0.0, sd), 0.0, 1.0))

    narrowing = 0.92 * ramp(0.15, 0.85, 0.06)
    lateral_narrowing = 0.92 * float(np.clip(0.55 * narrowing / 0.92 + rng.normal(0, 0.06), 0, 1))
    return {
        "jsw_medial": anatomy["jsw0_medial"] * (1.0 - narrowing),
        "jsw_lateral": anatomy["jsw0_lateral"] * (1.0 - lateral_narrowing),
        "osteophyte": 0.12 * ramp(0.18, 0.78, 0.05),
        "sclerosis": ramp(0.45, 0.50, 0.06),
        "deformity": ramp(0.68, 0.32, 0.06),
    }


# Per-subject anatomy: uniform ranges, in image-side units unless named otherwise. Widths of
# condyles, notch and plateau are fractions of the femoral half-width ("_rel").
ANATOMY_RANGES = {
    "joint_y": (-0.03, 0.03),
    "half_width": (0.205, 0.240),
    "femur_x": (-0.015, 0.015),
    "femur_tilt": (-5.0, 5.0),  # degrees
    "femur_shaft": (0.072, 0.092),
    "femur_flare": (0.10, 0.14),
    "rx_medial_rel": (0.53, 0.58),
    "rx_lateral_rel": (0.52, 0.57),
    "ry_medial": (0.080, 0.100),
    "ry_lateral": (0.072, 0.092),
    "notch_width_rel": (0.17, 0.22),
    "notch_height": (0.050, 0.070),
    "jsw0_medial": (0.062, 0.080),  # healthy joint-space widths of this subject
    "jsw0_lateral": (0.060, 0.078),
    "tibia_width_rel": (1.00, 1.06),
    "tibia_shaft": (0.060, 0.078),
    "tibia_flare": (0.10, 0.14),
    "tibia_x": (-0.01, 0.01),
    "tibia_tilt": (-4.0, 4.0),  # degrees
    "concavity": (0.004, 0.012),
    "spine_height": (0.028, 0.045),
    "fibula_x": (0.72, 0.82),  # fraction of the plateau half-width
    "fibula_y": (0.085, 0.120),
    "fibula_rx": (0.045, 0.058),
    "fibula_ry": (0.042, 0.056),
    "fibula_shaft": (0.018, 0.026),
    "fibula_slope": (-0.08, 0.04),
    "patella_x": (-0.03, 0.05),
    "patella_y": (0.09, 0.15),
    "patella_rx": (0.085, 0.110),
    "patella_ry": (0.10, 0.125),
    "patella_density": (0.15, 0.30),
    "soft_margin": (0.08, 0.16),
    "soft_density": (0.20, 0.34),
    "bone_density": (0.85, 1.10),
    "cortex_density": (0.55, 0.80),
    "texture_amp": (0.08, 0.18),
    "texture_grain": (0.7, 1.3),
    "background": (0.02, 0.07),
    "spur_angle": (20.0, 40.0),  # degrees below horizontal, where femoral spurs sprout
    "irregular_phase": (0.0, 2.0 * math.pi),
    **{f"spur_size_{k}": (0.6, 1.0) for k in range(4)},
    **{f"spur_width_{k}": (0.20, 0.30) for k in range(4)},
}


def _sample_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Per-subject shape, density and texture parameters (see ``ANATOMY_RANGES``)."""
    lo, hi = np.array(list(ANATOMY_RANGES.values())).T
    a: dict[str, Any] = dict(zip(ANATOMY_RANGES, rng.uniform(lo, hi).tolist()))
    for name in ("rx_medial", "rx_lateral", "notch_width", "tibia_width"):
        a[name] = a.pop(f"{name}_rel") * a["half_width"]
    # The largest spur has exactly the osteophyte size, so the factor is a max over sites.
    a[f"spur_size_{int(rng.integers(4))}"] = 1.0
    seed, corner = rng.integers(2**31), rng.integers(4)
    a["texture_seed"], a["marker_corner"] = int(seed), int(corner)
    return a


def _sample_nuisance(rng: np.random.Generator) -> dict[str, float]:
    """Acquisition factors, drawn independently of disease."""
    u = rng.uniform
    return {
        "rotation": u(-8.0, 8.0),
        "scale": u(0.95, 1.10),
        "shift_x": u(-0.04, 0.04),
        "shift_y": u(-0.04, 0.04),
        "exposure": u(0.75, 1.30),
        "gamma": u(0.80, 1.25),
        "noise": u(0.005, 0.03),
        "blur": u(0.0, 0.006),
        "laterality": float(rng.integers(2)),
    }


def marker_rule(diseased: bool, shortcut_rate: float, rng: np.random.Generator) -> int:
    """Burned-in marker: with probability ``shortcut_rate`` it equals ``diseased`` (present iff
    KL >= 2), otherwise it is a fair coin independent of the label."""
    if rng.uniform() < shortcut_rate:
        return int(diseased)
    return int(rng.uniform() < 0.5)


# ----------------------------------------------------------------------------------------------
# Rendering.


def _ellipse_sdf(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    """Approximate signed distance (positive inside) to an axis-aligned ellipse."""
    du, dv = (u - cx) / rx, (v - cy) / ry
    rho = np.sqrt(du * du + dv * dv) + 1e-6
    grad = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2) / rho + 1e-6
    return (1.0 - rho) / grad


def _condyle_sdf(
    u: np.ndarray,
    v: np.ndarray,
    xc: float,
    yc: float,
    rx: float,
    ry: float,
    ry_low: float,
    flat: float,
) -> np.ndarray:
    """Signed distance to a condyle: an ellipse whose lower half has its own height ``ry_low``
    and a superellipse exponent ``2 + flat`` (flattened bone end)."""
    low = v > yc
    du = np.abs(u - xc) * (1.0 / rx)
    ryv = np.where(low, np.float32(ry_low), np.float32(ry))
    dv = np.abs(v - yc) / ryv
    rho = np.sqrt(du * du + dv * dv) + 1e-6
    grad = np.sqrt((du / rx) ** 2 + (dv / ryv) ** 2) / rho + 1e-6
    if flat > 0:
        p = 2.0 + flat
        rho_p = (du**p + dv**p) ** (1.0 / p) + 1e-6
        grad_p = np.sqrt((du ** (p - 1) / rx) ** 2 + (dv ** (p - 1) / ryv) ** 2)
        grad_p = grad_p * rho_p ** (1.0 - p) + 1e-6
        rho = np.where(low, rho_p, rho)
        grad = np.where(low, grad_p, grad)
    return (1.0 - rho) / grad


def _spur_sdf(
    u: np.ndarray,
    v: np.ndarray,
    ax: float,
    ay: float,
    dx: float,
    dy: float,
    length: float,
    width: float,
    bend: float,
) -> np.ndarray:
    """Signed distance of a tapering beak from anchor (ax, ay) along unit (dx, dy).

    Its base half-width is ``width * length``; its tip curls by ``bend * length`` along the
    normal (-dy, dx), like the lipping of a real osteophyte.
    """
    pu, pv = u - ax, v - ay
    t = pu * dx + pv * dy
    tn = clip01(t * (1.0 / length))
    s = np.abs(pv * dx - pu * dy - (bend * length) * tn * tn)
    base = width * length
    return np.minimum(base - (base / length) * t - s, t + base)


def _decay(x: Any) -> Any:
    """exp(-x) for x >= 0, floored at exp(-20): float32 denormals are ~40x slower to compute."""
    if isinstance(x, np.ndarray):
        return np.exp(-np.minimum(x, 20.0))
    return math.exp(-min(x, 20.0))


def _plateau_height(x: np.ndarray | float, a: Mapping[str, Any], xm: float) -> Any:
    """Tibial plateau surface v(x) in the canonical frame: medial bowl and the two spines."""
    h = a["joint_y"] + a["concavity"] * _decay(((x - xm) / (0.7 * a["rx_medial"])) ** 2)
    for side in (-1.0, 1.0):
        h = h - a["spine_height"] * _decay(((x - (a["femur_x"] + side * 0.021)) / 0.015) ** 2)
    return h


def _canonical_coords(f: Mapping[str, float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (u, v) [size, size] of each supersampled pixel: the inverse of laterality
    mirroring, then scaling, rotation and shift."""
    grid = pixel_grid(size)
    th = math.radians(f["rotation"])
    c, s = math.cos(th) / f["scale"], math.sin(th) / f["scale"]
    x0 = grid[None, :] - np.float32(f["shift_x"])
    y0 = grid[:, None] - np.float32(f["shift_y"])
    u = c * x0 - s * y0
    v = s * x0 + c * y0
    if f["laterality"] >= 0.5:
        u = -u
    return u, v


def _span(lo_vals: np.ndarray, hi_vals: np.ndarray, lo: float, hi: float) -> slice:
    """The run of indices k with hi_vals[k] > lo and lo_vals[k] < hi, for bounds that are
    both increasing or both decreasing along k."""
    if lo_vals[-1] < lo_vals[0]:  # decreasing: search the negated sequences
        stop = bisect.bisect_left((-hi_vals).tolist(), -lo)
        start = bisect.bisect_right((-lo_vals).tolist(), -hi)
    else:
        start = bisect.bisect_right(hi_vals.tolist(), lo)
        stop = bisect.bisect_left(lo_vals.tolist(), hi)
    return slice(start, max(start, stop))


class _Grid:
    """Canonical (u, v) of every supersampled pixel, and windows of rows/columns that hold a
    canonical box. u and v are affine in (row, column), so each row's range sits at its end
    columns and the ranges are monotone: a window is two binary searches."""

    def __init__(self, factors: Mapping[str, float], size: int) -> None:
        self.u, self.v = _canonical_coords(factors, size)
        self._vlo = np.minimum(self.v[:, 0], self.v[:, -1])
        self._vhi = np.maximum(self.v[:, 0], self.v[:, -1])

    def rows(self, lo: float, hi: float) -> slice:
        return _span(self._vlo, self._vhi, lo, hi)

    def box(self, ulo: float, uhi: float, vlo: float, vhi: float) -> tuple[slice, slice]:
        rows = self.rows(vlo, vhi)
        if rows.stop <= rows.start:
            return rows, slice(0, 0)
        first, last = self.u[rows.start], self.u[rows.stop - 1]
        return rows, _span(np.minimum(first, last), np.maximum(first, last), ulo, uhi)


def render_knee(
    factors: Mapping[str, float], anatomy: Mapping[str, Any], resolution: int, supersample: int = 2
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image [R, R] float32 in [0, 1] and masks {name: bool [R, R]} for one knee.

    ``factors`` holds the disease and nuisance factors and ``marker``; ``anatomy`` comes from
    the sampler. Pure: the same inputs give the same pixels. Each structure is drawn by one
    method of ``_Knee``, called in the order in which its attenuation is summed.
    """
    a, f = anatomy, factors
    k = _Knee(f, a, resolution, supersample)
    d_tibia, tib_hw, tib_cx, below = k.tibia()
    d_femur, fem_hw, fem_cx, above, cond_sdf = k.femur()
    # Osteophytes grow both bones in place; their mask is what lies outside the plain bones.
    fem_plain, tib_plain = d_femur.copy(), d_tibia.copy()
    spur = k.osteophytes(d_femur, d_tibia) if f["osteophyte"] > 0 else None

    # One stream for the texture and then the detector noise: both fixed by the seed.
    trng = np.random.default_rng(a["texture_seed"])
    tex = k.texture(trng)
    att = k.soft_tissue()
    att[k.F] += k.bone(k.F, d_femur, fem_hw, fem_cx, _decay(above / (2.0 * a["femur_flare"])), tex)
    att[k.T] += k.bone(k.T, d_tibia, tib_hw, tib_cx, _decay(below / (2.0 * a["tibia_flare"])), tex)
    k.add_fibula(att, tex)
    k.add_patella(att)
    scl_shape = k.sclerosis(tib_plain, cond_sdf) if f["sclerosis"] > 0 else None
    if scl_shape is not None:
        att[k.J] += (1.1 * f["sclerosis"]) * scl_shape

    img = 1.0 - np.exp(att * np.float32(-f["exposure"]))
    img = area_down(clip01(img) ** np.float32(f["gamma"]), supersample)
    masks = k.masks(cond_sdf, spur, fem_plain, tib_plain, scl_shape)

    # Burned-in lead marker on the detector: image frame, not anatomy frame.
    has_marker = f["marker"] >= 0.5
    marker_cov = np.zeros((resolution, resolution), dtype=np.float32)
    if has_marker:
        img, marker_cov = _draw_marker(img, int(a["marker_corner"]), f["laterality"], resolution)
    masks["marker"] = coverage_mask(marker_cov, marker_cov, has_marker)

    sigma = f["blur"] * resolution
    if sigma > 0.25:
        img = ndimage.gaussian_filter(img, sigma, mode="nearest")
    img = img + np.float32(f["noise"]) * trng.standard_normal(img.shape, dtype=np.float32)
    return clip01(img).astype(np.float32), masks


# A condyle: centre (x, y), half-width, upper and lower half-heights (the lower one narrowed).
_Condyle = tuple[float, float, float, float, float]


class _Knee:
    """One knee in its canonical frame: the (u, v) of every supersampled pixel [S, S], the
    condyles, the tibial plateau, and the windows of rows each structure can reach. Signed
    distances are > 0 inside a shape; each method draws one structure."""

    def __init__(
        self,
        factors: Mapping[str, float],
        anatomy: Mapping[str, Any],
        resolution: int,
        supersample: int,
    ) -> None:
        a, f = anatomy, factors
        self.a, self.f, self.resolution, self.supersample = a, f, resolution, supersample
        size = resolution * supersample
        self.grid = grid = _Grid(f, size)
        self.u, self.v = u, v = grid.u, grid.v
        self.aa = 1.0 / (size * f["scale"])  # one supersample pixel in canonical units
        yj, W, fx0 = a["joint_y"], a["half_width"], a["femur_x"]
        self.xm = xm = fx0 - W + a["rx_medial"]
        xl = fx0 + W - a["rx_lateral"]
        self.cond: dict[str, _Condyle] = {}
        for name, xc, rx, ry in (
            ("medial", xm, a["rx_medial"], a["ry_medial"]),
            ("lateral", xl, a["rx_lateral"], a["ry_lateral"]),
        ):
            yc = _plateau_height(xc, a, xm) - a[f"jsw0_{name}"] - ry
            # Narrowing stretches only the lower half, so the change stays at the joint.
            self.cond[name] = (xc, yc, rx, ry, ry + a[f"jsw0_{name}"] - f[f"jsw_{name}"])
        self.yc_top = min(c[1] for c in self.cond.values())

        # Each structure is computed only on the rows it can reach: the femur above the joint,
        # the tibia below it, and everything that disease touches (J) in a band around it.
        reach = max(W, a["tibia_width"]) + 0.16  # osteophytes included
        self.J = grid.box(
            fx0 - reach,
            fx0 + reach,
            self.yc_top - 0.35 * max(a["ry_medial"], a["ry_lateral"]) - 0.02,
            yj + 0.16,
        )
        self.F = grid.rows(-np.inf, yj + 0.13)
        self.T = grid.rows(yj - 0.10, np.inf)
        self.uJ, self.vJ = u[self.J], v[self.J]
        self.plat_J = _plateau_height(self.uJ, a, xm)
        dfm = f["deformity"]
        if dfm > 0:
            # Subchondral collapse: the medial plateau dips and its surface gets dented.
            dent = 0.5 + 0.5 * np.sin(self.uJ * 70.0 + a["irregular_phase"])
            decay = _decay(((self.uJ - xm) / a["rx_medial"]) ** 2)
            self.plat_J = self.plat_J + dfm * (0.004 * dent + 0.006 * decay)

    def tibia(self) -> tuple[np.ndarray, Any, Any, np.ndarray]:
        """Signed distance [S, S] of the tibia (-1 off rows T), and on rows T the shaft's
        half-width, centre and depth below the joint."""
        a, u, v, T = self.a, self.u, self.v, self.T
        # Plateau on top, a metaphysis funnelling into the shaft, rounded margins. Away from
        # the joint the plateau's relief no longer matters.
        yj, xt, tw = a["joint_y"], a["tibia_x"], a["tibia_width"]
        plateau = np.full(u.shape, yj, dtype=np.float32)
        plateau[self.J] = self.plat_J
        uT, vT = u[T], v[T]
        below = np.maximum(vT - yj - 0.04, 0.0)
        tib_cx = xt + math.tan(math.radians(a["tibia_tilt"])) * below
        tib_hw = a["tibia_shaft"] + (tw - a["tibia_shaft"]) * _decay(below / a["tibia_flare"])
        d_tibia = np.full(u.shape, -1.0, dtype=np.float32)
        d_tibia[T] = smooth_min(vT - plateau[T], tib_hw - np.abs(uT - tib_cx), 0.035)
        return d_tibia, tib_hw, tib_cx, below

    def femur(self) -> tuple[np.ndarray, Any, Any, np.ndarray, dict[str, np.ndarray]]:
        """Signed distance [S, S] of the femur (-1 off rows F); on rows F the shaft's
        half-width, centre and height above the condyles; each condyle's distance on J."""
        a, u, v, F, grid = self.a, self.u, self.v, self.F, self.grid
        fx0, yc_top = a["femur_x"], self.yc_top
        # A shaft flaring like a trumpet into two condyles with a notch between them.
        uF, vF = u[F], v[F]
        above = np.maximum(yc_top - vF, 0.0)
        fem_cx = fx0 - math.tan(math.radians(a["femur_tilt"])) * above
        fem_hw = a["femur_shaft"] + (a["half_width"] - a["femur_shaft"]) * _decay(
            above / a["femur_flare"]
        )
        d_femur = np.full(u.shape, -1.0, dtype=np.float32)
        d_femur[F] = np.minimum(fem_hw - np.abs(uF - fem_cx), yc_top + 0.01 - vF)
        cond_sdf = self._condyles(d_femur)
        notch_y = max(c[1] + c[4] for c in self.cond.values())
        nw, nh = a["notch_width"], a["notch_height"]
        box = grid.box(fx0 - nw - 0.02, fx0 + nw + 0.02, notch_y - nh - 0.02, notch_y + 0.02)
        d_notch = _ellipse_sdf(u[box], v[box], fx0, notch_y, nw, nh)
        d_femur[box] = smooth_min(d_femur[box], -d_notch, 0.01)
        return d_femur, fem_hw, fem_cx, above, cond_sdf

    def _condyles(self, d_femur: np.ndarray) -> dict[str, np.ndarray]:
        """Blend both condyles into ``d_femur`` in place; return each one's distance on J."""
        u, v, dfm = self.u, self.v, self.f["deformity"]
        cond_sdf = {}
        for name, (xc, yc, rx, ry, ry_low) in self.cond.items():
            # Boxes reach past each shape by more than its blending radius, so nothing is cut.
            box = self.grid.box(
                xc - rx - 0.03, xc + rx + 0.03, yc - 0.35 * ry - 0.03, yc + ry_low + 0.03
            )
            ub, vb = u[box], v[box]
            # A low upper cap lets the metaphysis flare, not the ellipse, shape the shoulders.
            d_c = _condyle_sdf(ub, vb, xc, yc, rx, 0.35 * ry, ry_low, 2.5 * dfm)
            if dfm > 0:
                # Eroded, irregular articular surface: only ever removes bone.
                bumps = 1.0 + np.sin(ub * 45.0 + 2.0 * self.a["irregular_phase"])
                d_c = d_c - (vb > yc) * np.float32(dfm * 0.0035) * bumps
            d_femur[box] = smooth_max(d_femur[box], d_c, 0.02)
            full = np.full(u.shape, -1.0, dtype=np.float32)
            full[box] = d_c
            cond_sdf[name] = full[self.J]
        return cond_sdf

    def osteophytes(self, d_femur: np.ndarray, d_tibia: np.ndarray) -> np.ndarray:
        """Beaks at the four joint margins, continuing the articular surface outwards: blended
        into both bones in place; returns the spurs' own signed distance [S, S]."""
        a, u, v = self.a, self.u, self.v
        xt, tw, ost = a["tibia_x"], a["tibia_width"], self.f["osteophyte"]
        spur = np.full(u.shape, -1.0, dtype=np.float32)
        ang = math.radians(a["spur_angle"])
        for k, (name, side) in enumerate((("medial", -1.0), ("lateral", 1.0))):
            xc, yc, rx, _, ry_low = self.cond[name]
            tx = xt + side * (tw - 0.015)
            # Femoral beaks curl down, tibial ones up: both towards the joint line.
            for bone_d, ax, ay, dx, dy, bend, site in (
                (
                    d_femur,
                    xc + side * rx * math.cos(ang),
                    yc + ry_low * math.sin(ang),
                    side * 0.92,
                    0.39,
                    0.3 * side,
                    k,
                ),
                (
                    d_tibia,
                    tx,
                    _plateau_height(tx, a, self.xm) + 0.014,
                    side * 0.94,
                    -0.34,
                    -0.3 * side,
                    k + 2,
                ),
            ):
                length = ost * a[f"spur_size_{site}"]
                r = 1.2 * length + 0.015
                box = self.grid.box(ax - r, ax + r, ay - r, ay + r)
                d_s = _spur_sdf(
                    u[box], v[box], ax, ay, dx, dy, length, a[f"spur_width_{site}"], bend
                )
                bone_d[box] = smooth_max(bone_d[box], d_s, 0.006)
                spur[box] = np.maximum(spur[box], d_s)
        return spur

    def texture(self, trng: np.random.Generator) -> np.ndarray:
        """Trabecular texture [S, S]; it lives in the canonical frame so it turns with the bone."""
        tsize = max(32, self.resolution)  # a power of two, so wrapping is a bit mask
        grain = self.a["texture_grain"]
        tile = band_noise(trng, tsize, 0.45 * grain, 1.6 * grain, aspect=2.0)
        scale_t = tsize / 1.5  # the tile spans 1.5 canonical units
        # The offset keeps the values positive, so truncation is a floor.
        ti = (self.v * scale_t + 512.0).astype(np.int32) & (tsize - 1)
        tj = (self.u * scale_t + 512.0).astype(np.int32) & (tsize - 1)
        return tile.ravel()[ti * tsize + tj]

    def bone(
        self, rows: slice, d: np.ndarray, hw: Any, cx: Any, epi: Any, tex: np.ndarray
    ) -> np.ndarray:
        """Attenuation on ``rows`` of a bone of signed distance ``d`` [S, S], half-width ``hw``
        and centre ``cx``; ``epi`` is 1 at its end (epiphysis) and 0 along the shaft."""
        a = self.a
        d = d[rows]
        inside = clip01(d / self.aa + 0.5)
        chord = np.sqrt(clip01(1.0 - ((self.u[rows] - cx) / hw) ** 2))
        # Shafts: a thick cortex around a hollow medulla; ends: a thin shell around dense
        # cancellous bone.
        ct = 0.006 + 0.012 * (1.0 - epi)
        rim = _decay(np.maximum(d, 0.0) / ct)
        dens = (a["bone_density"] * (0.4 + 0.6 * epi)) * (0.6 + 0.4 * chord)
        dens = dens * (1.0 + a["texture_amp"] * tex[rows] * (0.3 + 0.7 * epi))
        return inside * (dens + a["cortex_density"] * (0.7 + 0.5 * (1.0 - epi)) * rim)

    def soft_tissue(self) -> np.ndarray:
        """Attenuation [S, S] of the background and the soft tissue: a cylinder whose projected
        thickness is its chord, fuller at the joint."""
        a, u, v = self.a, self.u, self.v
        soft_hw = (
            a["half_width"] + a["soft_margin"] + 0.03 * _decay(((v - a["joint_y"]) / 0.25) ** 2)
        )
        return a["background"] + a["soft_density"] * np.sqrt(clip01(1.0 - (u / soft_hw) ** 2))

    def add_fibula(self, att: np.ndarray, tex: np.ndarray) -> None:
        """Head below the lateral plateau, overlapping the tibia, tapering into the shaft."""
        a, u, v = self.a, self.u, self.v
        fx = a["tibia_x"] + a["fibula_x"] * a["tibia_width"]
        fy = a["joint_y"] + a["fibula_y"]
        B = self.grid.rows(fy - a["fibula_ry"] - 0.02, np.inf)
        uB, vB = u[B], v[B]
        d_fib = np.zeros(u.shape, dtype=np.float32)
        down = np.maximum(vB - fy, 0.0)
        neck = _decay(down / 0.07)
        fib_hw = a["fibula_shaft"] + (a["fibula_rx"] - a["fibula_shaft"]) * neck
        fib_cx = (
            (fx - 0.2 * a["fibula_rx"]) + a["fibula_slope"] * down + (0.2 * a["fibula_rx"]) * neck
        )
        d_head = _ellipse_sdf(uB, vB, fx, fy, a["fibula_rx"], a["fibula_ry"])
        d_fib[B] = np.maximum(d_head, np.minimum(fib_hw - np.abs(uB - fib_cx), vB - fy + 0.02))
        att[B] += 0.7 * self.bone(B, d_fib, fib_hw, fib_cx, _decay(down / 0.08), tex)

    def add_patella(self, att: np.ndarray) -> None:
        """A faint oval superimposed on the distal femur."""
        a, yj = self.a, self.a["joint_y"]
        P = self.grid.rows(
            yj - a["patella_y"] - a["patella_ry"], yj - a["patella_y"] + a["patella_ry"]
        )
        pu = (self.u[P] - a["patella_x"]) / a["patella_rx"]
        pv = (self.v[P] - (yj - a["patella_y"])) / a["patella_ry"]
        att[P] += a["patella_density"] * np.sqrt(clip01(1.0 - pu * pu - pv * pv))

    def sclerosis(self, tib_plain: np.ndarray, cond_sdf: dict[str, np.ndarray]) -> np.ndarray:
        """Subchondral sclerosis on J: a dense band under the plateau and inside each condyle's
        lower surface, strongest medially where the load is."""
        uJ, vJ, aa = self.uJ, self.vJ, self.aa
        depth = 0.028
        tib_band = clip01(tib_plain[self.J] / aa + 0.5) * _decay(
            np.maximum(vJ - self.plat_J, 0.0) / depth
        )
        scl_shape = None
        for name, weight in (("medial", 1.0), ("lateral", 0.6)):
            xc, yc, rx, _, _ = self.cond[name]
            d_c = cond_sdf[name]
            t2 = ((uJ - xc) / (0.75 * rx)) ** 2
            fem_band = clip01(d_c / aa + 0.5) * (vJ > yc) * _decay(np.maximum(d_c, 0.0) / depth)
            part = (weight * _decay(t2 * t2)) * np.maximum(fem_band, tib_band)
            scl_shape = part if scl_shape is None else np.maximum(scl_shape, part)
        assert scl_shape is not None
        return scl_shape

    def joint_space(self, cond_sdf: dict[str, np.ndarray]) -> np.ndarray:
        """Bool on J: below each condyle centre, outside the condyle, above the plateau; at
        least one output pixel thick so it never vanishes."""
        uJ, vJ, plat_J = self.uJ, self.vJ, self.plat_J
        thin = 0.5 / (self.resolution * self.f["scale"])
        js = None
        for name in ("medial", "lateral"):
            xc, yc, rx, _, _ = self.cond[name]
            gap = (cond_sdf[name] <= 0) & (vJ > yc) & (vJ < plat_J)
            mid = plat_J - 0.5 * self.f[f"jsw_{name}"]
            part = (np.abs(uJ - xc) < 0.7 * rx) & (gap | (np.abs(vJ - mid) < thin))
            js = part if js is None else js | part
        assert js is not None
        return js

    def masks(
        self,
        cond_sdf: dict[str, np.ndarray],
        spur: np.ndarray | None,
        fem_plain: np.ndarray,
        tib_plain: np.ndarray,
        scl_shape: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Joint space, osteophyte and sclerosis masks, bool [R, R]."""
        R, ss = self.resolution, self.supersample
        masks = {}
        js_cov = self._window_mask(self.joint_space(cond_sdf))
        masks["joint_space"] = coverage_mask(js_cov, js_cov, True)
        if spur is not None:
            outside = -np.maximum(fem_plain, tib_plain)
            ost_cov = area_down(((spur > 0) & (outside >= 0)).astype(np.float32), ss)
            ost_score = area_down(np.minimum(spur, outside), ss)
            masks["osteophyte"] = coverage_mask(ost_cov, ost_score, True)
        else:
            masks["osteophyte"] = np.zeros((R, R), dtype=bool)
        if scl_shape is not None:
            scl_cov = self._window_mask(scl_shape > 0.35)
            masks["sclerosis"] = coverage_mask(scl_cov, self._window_mask(scl_shape), True)
        else:
            masks["sclerosis"] = np.zeros((R, R), dtype=bool)
        return masks

    def _window_mask(self, field: np.ndarray) -> np.ndarray:
        """A field on J, zero elsewhere, area-averaged down to [R, R]."""
        full = np.zeros(self.u.shape, dtype=np.float32)
        full[self.J] = field
        return area_down(full, self.supersample)


def marker_places(resolution: int) -> torch.Tensor:
    """``[4, H, W]`` bool: the pixels a lead marker's plate may cover, one mask per corner
    (where a generator may draw the marker, whichever corner the real image had it in)."""
    blank = np.zeros((resolution, resolution), dtype=np.float32)
    plates = [_draw_marker(blank, c, 0.0, resolution)[1] > 0 for c in range(4)]
    return torch.from_numpy(np.stack(plates))


def _draw_marker(
    img: np.ndarray, corner: int, laterality: float, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint an 'L'/'R' lead marker into corner 0-3 (clockwise from top-left).

    Returns (image [R, R], coverage [R, R]).
    """
    side, margin, ss = 0.09, 0.04, 4
    # Only the pixels around the plate are drawn, at 4x supersampling.
    n = int(math.ceil((side + 2.0 / resolution) * resolution))
    right, bottom = corner in (1, 2), corner in (2, 3)
    lo_px = int(math.floor((margin - 1.0 / resolution) * resolution))
    c0 = resolution - lo_px - n if right else lo_px
    r0 = resolution - lo_px - n if bottom else lo_px
    g = pixel_grid(resolution * ss)
    gx = g[c0 * ss : (c0 + n) * ss]
    gy = g[r0 * ss : (r0 + n) * ss]
    cx = (0.5 - margin - side / 2) * (1 if right else -1)
    cy = (0.5 - margin - side / 2) * (1 if bottom else -1)
    lx = (gx[None, :] - cx) / side + 0.5
    ly = (gy[:, None] - cy) / side + 0.5

    def rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        return (lx >= x0) & (lx <= x1) & (ly >= y0) & (ly <= y1)

    plate = rect(0.0, 1.0, 0.0, 1.0)
    if laterality >= 0.5:
        leg = (np.abs((ly - 0.56) - (lx - 0.42) * 0.95) < 0.1) & rect(0.38, 0.8, 0.52, 0.82)
        glyph = (
            rect(0.22, 0.38, 0.18, 0.82)
            | rect(0.22, 0.72, 0.18, 0.32)
            | rect(0.22, 0.72, 0.46, 0.58)
            | rect(0.60, 0.74, 0.18, 0.58)
            | leg
        )
    else:
        glyph = rect(0.25, 0.42, 0.18, 0.82) | rect(0.25, 0.76, 0.66, 0.82)
    cover = area_down(plate.astype(np.float32), ss)
    shade = area_down(plate * np.where(glyph, np.float32(0.3), np.float32(0.97)), ss)
    out = img.copy()
    full = np.zeros_like(img)
    win = (slice(r0, r0 + n), slice(c0, c0 + n))
    out[win] = out[win] * (1.0 - cover) + shade
    full[win] = cover
    return out, full


# ----------------------------------------------------------------------------------------------


class KneePhantom(CachedPhantom):
    """AP knee radiographs with KL ground truth, generated on the fly.

    ``ds[i]`` is ``{"image": float32 [1, R, R] in [-1, 1], "label": int, "meta": {...}}`` with
    ``meta`` holding ``grade``, ``factors`` (disease, nuisance, ``marker``), ``anatomy``,
    ``masks`` ({osteophyte, joint_space, sclerosis, marker}: bool [R, R]), ``index``, ``split``.
    Sample i depends only on (seed, split, i). Label: ``grade >= 2`` (task ``binary``) or the
    grade (task ``kl``). Marker: see :func:`marker_rule`.

    ``decorrelate`` q in [0, 1]: every disease factor group (:data:`DISEASE_GROUPS`) of a sample
    is, with probability q, that of another sample of the split, drawn at random. Each factor's
    distribution stays the same; the correlation between two groups falls to about (1 - q)^2 of
    the phantom's (one severity drives them all: 88% of their variance is one component). 0 (the
    default) is the phantom as published here, sample for sample.
    """

    channels = 1
    n: int
    seed: int
    split: str
    task: str
    shortcut_rate: float
    decorrelate: float
    supersample: int
    cache: bool

    def __init__(
        self,
        n: int,
        resolution: int = 64,
        seed: int = 0,
        split: str = "train",
        task: str = "binary",
        shortcut_rate: float = 0.0,
        cache: bool = True,
        supersample: int = 2,
        decorrelate: float = 0.0,
    ) -> None:
        check_common(n, resolution, seed, split)
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        if not isinstance(shortcut_rate, numbers.Real) or not 0.0 <= shortcut_rate <= 1.0:
            raise ValueError(f"shortcut_rate must be a float in [0, 1], got {shortcut_rate!r}")
        if not isinstance(decorrelate, numbers.Real) or not 0.0 <= decorrelate <= 1.0:
            raise ValueError(f"decorrelate must be a float in [0, 1], got {decorrelate!r}")
        if supersample not in (1, 2, 4):
            raise ValueError(f"supersample must be 1, 2 or 4, got {supersample!r}")
        self.n, self.resolution, self.seed, self.split = int(n), int(resolution), int(seed), split
        self.task, self.shortcut_rate = task, float(shortcut_rate)
        self.decorrelate = float(decorrelate)
        self.supersample = supersample
        self.class_names = list(TASKS[task])
        self.num_classes = len(self.class_names)
        self.cache = cache
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.n

    def params(self, i: int) -> tuple[dict[str, float], dict[str, Any]]:
        """``(factors, anatomy)`` of sample i; factors hold disease, nuisance and ``marker``."""
        i = check_index(i, self.n)
        anat_seq, dis_seq, nui_seq, mark_seq, mix_seq = sample_seed(self.seed, self.split, i).spawn(
            5
        )
        anatomy = _sample_anatomy(np.random.default_rng(anat_seq))
        factors = _sample_disease(np.random.default_rng(dis_seq), anatomy)
        if self.decorrelate > 0:
            rng = np.random.default_rng(mix_seq)
            for group in DISEASE_GROUPS:
                if rng.uniform() < self.decorrelate:
                    donor = self._disease(int(rng.integers(self.n)))
                    factors.update({k: donor[k] for k in group})
        factors.update(_sample_nuisance(np.random.default_rng(nui_seq)))
        diseased = kl_grade(factors) >= 2
        factors["marker"] = float(
            marker_rule(diseased, self.shortcut_rate, np.random.default_rng(mark_seq))
        )
        return factors, anatomy

    def _disease(self, i: int) -> dict[str, float]:
        """Sample i's own disease factors (before any ``decorrelate`` exchange)."""
        # spawn(2) gives the same first two children as params' spawn(5)
        anat_seq, dis_seq = sample_seed(self.seed, self.split, i).spawn(2)
        return _sample_disease(
            np.random.default_rng(dis_seq), _sample_anatomy(np.random.default_rng(anat_seq))
        )

    def render(self, i: int, overrides: Mapping[str, float] | None = None) -> dict:
        """Sample i with some factors replaced (a true counterfactual: same anatomy and noise).

        The grade and label follow the overridden factors; the marker is kept unless overridden.
        """
        factors, anatomy = self.params(i)
        for key, val in (overrides or {}).items():
            if key not in factors:
                raise KeyError(f"unknown knee factor {key!r}; expected one of {sorted(factors)}")
            factors[key] = float(val)
        return self._sample(i, factors, anatomy)

    def _sample(self, i: int, factors: dict[str, float], anatomy: dict[str, Any]) -> dict:
        img, masks = render_knee(factors, anatomy, self.resolution, self.supersample)
        grade = kl_grade(factors)
        label = int(grade >= 2) if self.task == "binary" else grade
        meta = {
            "grade": grade,
            "factors": {k: float(v) for k, v in factors.items()},
            "anatomy": {k: (v if isinstance(v, int) else float(v)) for k, v in anatomy.items()},
            "masks": {k: torch.from_numpy(m) for k, m in masks.items()},
            "index": int(i),
            "split": self.split,
            "report": phantom_report("knee", factors, (self.seed, SPLITS[self.split], i), grade),
        }
        from cfexplain.data.concepts import knee_concepts  # here: concepts reads this module

        meta["concepts"] = knee_concepts(factors)
        return {"image": to_tensor_image(img), "label": label, "meta": meta}
