"""Direction stage: a planted direction is recovered through images, multi-class shapes, resume.

The planted world: G renders w linearly (x = A w), the classifier reads w back from the image
(A⁺ x) and is a logistic function of a known direction u in W, and E is the exact inverse. The
direction the stage finds from images alone must then be u.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cfexplain.explain.counterfactual import CounterfactualEngine
from cfexplain.stages import direction as stage
from cfexplain.train import run_chain
from cfexplain.utils.artifacts import Artifact, fingerprint, save_model
from tests.conftest import run_train, smoke_train

RES, W_DIM, NUM_WS = 32, 8, 3


def _matrix(seed: int, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) / math.sqrt(cols)


def planted_directions(num_classes: int, seed: int = 7) -> torch.Tensor:
    """Unit directions ``[K', w_dim]`` (K' = 1 for a binary classifier)."""
    k = 1 if num_classes == 2 else num_classes
    return nn.functional.normalize(_matrix(seed, k, W_DIM), dim=1)


class _LinearMapping(nn.Module):
    def __init__(self, z_dim: int, seed: int) -> None:
        super().__init__()
        self.M = nn.Parameter(_matrix(seed, W_DIM, z_dim), requires_grad=False)
        self.register_buffer("w_avg", torch.zeros(W_DIM))

    def forward(self, z: torch.Tensor, psi: float = 1.0, **_) -> torch.Tensor:
        return (z @ self.M.T).unsqueeze(1).repeat(1, NUM_WS, 1)


class LinearGenerator(nn.Module):
    """``w -> x = A w`` (the mean over the ws), images ``[N, 1, RES, RES]``."""

    def __init__(self, seed: int = 0, z_dim: int = 8) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = z_dim, W_DIM, NUM_WS
        self.img_resolution, self.img_channels = RES, 1
        self.A = nn.Parameter(_matrix(seed, RES * RES, W_DIM) * 4, requires_grad=False)
        self.mapping = _LinearMapping(z_dim, seed + 1)

    def synthesis(self, ws: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        return (ws.mean(1) @ self.A.T).view(-1, 1, RES, RES)

    def forward(self, z: torch.Tensor, **_) -> torch.Tensor:
        return self.synthesis(self.mapping(z))


class LinearEncoder(nn.Module):
    """The exact inverse of :class:`LinearGenerator`: ``x -> w = A⁺ x`` broadcast to every ws."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.P = nn.Parameter(
            torch.linalg.pinv(_matrix(seed, RES * RES, W_DIM) * 4), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.P.T).unsqueeze(1).repeat(1, NUM_WS, 1)


class PlantedClassifier(nn.Module):
    """Logits from the w an image was rendered from: binary ``[0, k u·w + b]``, else ``k U w``."""

    def __init__(
        self, seed: int = 0, num_classes: int = 2, scale: float = 3.0, bias: float = 0.0
    ) -> None:
        super().__init__()
        self.inverse = LinearEncoder(seed)
        self.register_buffer("U", planted_directions(num_classes))
        self.num_classes, self.scale, self.bias = num_classes, scale, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.inverse(x)[:, 0]
        s = self.scale * w @ self.U.T
        if self.num_classes == 2:
            return torch.cat([torch.zeros_like(s), s + self.bias], dim=1)
        return s


def _stage_dir(exp: Path, name: str, files: dict, info: dict | None = None) -> None:
    art = Artifact(
        name, exp / name, fingerprint([name, sorted(files)]), files=files, info=info or {}
    )
    art.write()


def plant_run(exp, num_classes: int = 2):
    """Finished classifier / generator / encoder stages of the planted world under ``exp``."""
    for name, module, target, key, kwargs in (
        (
            "classifier",
            PlantedClassifier(num_classes=num_classes),
            "PlantedClassifier",
            "weights",
            {"num_classes": num_classes},
        ),
        ("generator", LinearGenerator(), "LinearGenerator", "G_ema", {}),
        ("encoder", LinearEncoder(), "LinearEncoder", "encoder", {}),
    ):
        (exp / name).mkdir(parents=True)
        save_model(exp / name / f"{key}.safetensors", module, f"{__name__}.{target}", kwargs)
        _stage_dir(exp, name, {key: f"{key}.safetensors"}, {"perceptual": "stlpips_alex"})
    return exp


def _cos(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- tests


def test_fit_recovers_a_planted_direction_and_its_plane():
    rng = np.random.default_rng(0)
    u = rng.normal(size=16)
    u /= np.linalg.norm(u)
    w = rng.normal(size=(3000, 16)) * rng.uniform(0.5, 2.0, size=16)  # anisotropic W
    y = (rng.random(3000) < 1 / (1 + np.exp(-(4 * w @ u - 0.5)))).astype(int)
    fit = stage.fit_linear_direction(
        w, y, Cs=[0.01, 0.1, 1.0], cv=3, max_iter=500, holdout=0.2, seed=0
    )
    assert _cos(fit["direction"], u) >= 0.95 and fit["auc"] > 0.85
    assert np.linalg.norm(fit["direction"]) == pytest.approx(1.0)
    # the plane in raw W: the boundary distance of a point on it is 0
    on_plane = -fit["intercept"] * fit["coef"] / (fit["coef"] @ fit["coef"])
    assert stage.boundary_distance(on_plane[None], fit["coef"], fit["intercept"])[
        0
    ] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="one-sided"):
        stage.fit_linear_direction(
            w,
            np.r_[np.ones(3), np.zeros(2997)].astype(int),
            Cs=[1.0],
            cv=3,
            max_iter=100,
            holdout=0.2,
            seed=0,
        )


class OrdinalClassifier(nn.Module):
    """Five ordered grades whose expected grade rises (saturating) along the planted unit
    direction u: ``logit_k = -(s - k)²`` with ``s = 2 + 3 u·w``."""

    def __init__(self) -> None:
        super().__init__()
        self.inverse = LinearEncoder()
        self.register_buffer("u", planted_directions(2)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 2 + 3 * self.inverse(x)[:, 0] @ self.u
        return -(s[:, None] - torch.arange(5.0)).square()


class _TwoRegimeClassifier(nn.Module):
    """Grades 0-1 where v·w < 1 (85% of N(0, 1) samples), rising along u; grades 3-4 beyond,
    rising along u' (u, u', v orthonormal)."""

    def __init__(self) -> None:
        super().__init__()
        self.inverse = LinearEncoder()
        basis = torch.linalg.qr(_matrix(11, W_DIM, 3))[0].T  # [3, W_DIM] orthonormal rows
        self.register_buffer("basis", basis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.inverse(x)[:, 0]
        u, u2, v = self.basis
        s = torch.where(w @ v < 1.0, 0.5 + 0.3 * (w @ u), 3.5 + 0.3 * (w @ u2))
        return -(s[:, None] - torch.arange(5.0)).square()


def test_mean_gradient_direction_is_the_planted_rise_of_the_grade():
    G, f = LinearGenerator(), OrdinalClassifier()
    w = torch.randn(600, W_DIM, generator=torch.Generator().manual_seed(3)) * torch.linspace(
        0.5, 2.0, W_DIM
    )  # anisotropic W; the grade saturates at both ends
    cpu = torch.device("cpu")
    d = stage.mean_gradient_direction(G, f, w, batch_size=128, device=cpu)
    assert d.shape == (W_DIM,) and d.norm() == pytest.approx(1.0, abs=1e-5)
    assert _cos(d, f.u) > 0.9999  # towards the higher grades, not away from them
    # Each grade has an equal say: the rare high grades (15% of the samples) pull as hard as the
    # crowded low ones, so the direction is halfway between u and u'.
    two = _TwoRegimeClassifier()
    w = torch.randn(2000, W_DIM, generator=torch.Generator().manual_seed(4))
    d = stage.mean_gradient_direction(G, two, w, batch_size=500, device=cpu)
    u, u2, _ = two.basis
    assert _cos(d, u + u2) > 0.999, (_cos(d, u), _cos(d, u2))
    with pytest.raises(ValueError, match="does not change"):
        stage.mean_gradient_direction(
            G, PlantedClassifier(scale=0.0), w, batch_size=128, device=cpu
        )


def test_stage_recovers_the_planted_direction_from_images(smoke_cfg, tmp_path):
    plant_run(tmp_path / "runs" / "knee")
    art = run_chain(
        smoke_cfg("stages=[direction]", "direction.n_samples=2000", "direction.batch_size=500")
    )["direction"]
    saved = load_file(str(art.path("directions")))
    assert saved["direction"].shape == (W_DIM,) and saved["lambda_range"].shape == (1,)
    assert _cos(saved["direction"], planted_directions(2)[0]) >= 0.95
    assert art.metrics["generated/auc"] >= 0.97
    assert (
        art.metrics["real_through_E/auc"] >= 0.95
    )  # E is exact here, so f(x) is predicted from E(x)
    assert art.metrics["counterfactual/monotonicity_mean"] >= 0.95  # f is monotone along u
    assert art.info["labels"] == {"1": "f's decision"}
    assert (art.dir / "config.yaml").is_file()
    # the engine of the finished run walks along the direction it found
    engine = CounterfactualEngine.from_run(tmp_path / "runs" / "knee", device="cpu")
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    G = engine.G
    cf = engine(G.synthesis(G.mapping(z)), target=1, lambdas="symmetric")
    assert cf.images.shape == (4, 9 if engine.num_frames == 9 else engine.num_frames, 1, RES, RES)
    assert (cf.probs.diff(dim=1) > 0).all()


def test_multiclass_gives_one_direction_per_class_and_an_ordinal_one(smoke_cfg, tmp_path):
    plant_run(tmp_path / "runs" / "knee", num_classes=3)
    art = run_chain(
        smoke_cfg(
            "stages=[direction]",
            "direction.n_samples=1500",
            "direction.batch_size=500",
            "direction.ordinal_gradient_samples=1000",
        )
    )["direction"]
    saved = load_file(str(art.path("directions")))
    assert saved["directions"].shape == (3, W_DIM) and saved["ordinal"].shape == (W_DIM,)
    assert saved["coef"].shape == (3, W_DIM) and saved["lambda_range"].shape == (3,)
    assert torch.allclose(saved["directions"].norm(dim=1), torch.ones(3), atol=1e-5)
    for t in range(3):
        assert art.metrics[f"generated/auc_class{t}"] >= 0.9
    assert "generated/ordinal_r2" in art.metrics
    # ordinal_fit=gradient (the default): the mean unit gradient of the expected grade on the
    # first ordinal_gradient_samples samples, beside the Ridge fit it is compared with
    assert -1.0 <= art.metrics["generated/ordinal_cos_ridge"] <= 1.0
    assert "1000 samples" in art.info["ordinal_fit"]
    with pytest.raises(ValueError, match="direction.ordinal_fit"):
        run_chain(smoke_cfg("stages=[direction]", "direction.ordinal_fit=lasso", "force=true"))
    engine = CounterfactualEngine.from_run(tmp_path / "runs" / "knee", device="cpu")
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    cf = engine(engine.G.synthesis(engine.G.mapping(z)), target=2, lambdas="symmetric")
    assert cf.target == 2 and cf.probs.shape == (3, engine.num_frames)
    assert (cf.probs[:, -1] > cf.probs[:, 0]).all()  # walking along class 2's direction raises it


def test_interrupted_sampling_resumes_to_the_same_direction(smoke_cfg, tmp_path, monkeypatch):
    overrides = (
        "stages=[direction]",
        "direction.n_samples=2000",
        "direction.batch_size=250",
        "checkpoint_every=2",
    )
    ref_dir = tmp_path / "ref"
    plant_run(ref_dir / "knee")
    ref = run_chain(smoke_cfg(*overrides, f"runs_dir={ref_dir}"))["direction"]

    plant_run(tmp_path / "runs" / "knee")
    real_generator = stage.generator

    def crash_at_chunk_5(seed, *keys):
        if keys[:2] == (50, 5):
            raise RuntimeError("power cut")
        return real_generator(seed, *keys)

    monkeypatch.setattr(stage, "generator", crash_at_chunk_5)
    with pytest.raises(RuntimeError, match="power cut"):
        run_chain(smoke_cfg(*overrides))
    partial = tmp_path / "runs" / "knee" / ".direction.partial" / "state.pt"
    assert partial.is_file()
    monkeypatch.setattr(stage, "generator", real_generator)
    art = run_chain(smoke_cfg(*overrides))["direction"]
    assert art.info["resumed_from_chunks"] == 4
    a, b = load_file(str(ref.path("directions"))), load_file(str(art.path("directions")))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_checkpoint_holds_only_the_samples(smoke_cfg, tmp_path):
    plant_run(tmp_path / "runs" / "knee")
    overrides = ("stages=[direction]", "direction.n_samples=1000", "direction.batch_size=250")
    art = run_chain(smoke_cfg(*overrides))["direction"]
    state = art.dir / "state.pt"
    chunks = torch.load(state, weights_only=True)["chunks"]
    tensors = [t for c in chunks.values() for t in c.values()]
    assert len(chunks) == 4 and chunks["0"]["w"].shape == (250, W_DIM)
    # w is W's first layer: a view of all NUM_WS layers would save NUM_WS times its bytes.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    payload = sum(t.numel() * t.element_size() for t in tensors)
    assert state.stat().st_size < payload + 16_000


@pytest.mark.slow
def test_two_gloo_processes_find_the_same_direction_as_one(smoke_cfg, tmp_path):

    overrides = ("stages=[direction]", "direction.n_samples=1000", "direction.batch_size=125")
    plant_run(tmp_path / "one" / "knee")
    one = run_chain(smoke_cfg(*overrides, f"runs_dir={tmp_path / 'one'}"))["direction"]
    plant_run(tmp_path / "two" / "knee")
    run_train(smoke_train(tmp_path / "two", *overrides, processes=2))
    two = Artifact.load(tmp_path / "two" / "knee" / "direction")
    assert two.info["processes"] == 2 and two.info["samples"] == 1000
    a, b = load_file(str(one.path("directions"))), load_file(str(two.path("directions")))
    assert all(torch.equal(a[k], b[k]) for k in a)  # chunks are seeded by index, not by rank
