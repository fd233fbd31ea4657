"""Counterfactual engine: auto-λ reaches its targets, batched == per image, flips, refinement."""

from __future__ import annotations

import pytest
import torch

from cfexplain.explain.counterfactual import CounterfactualEngine, Counterfactuals, project
from cfexplain.nn.classifier import ResNetClassifier
from cfexplain.nn.encoder import Encoder
from cfexplain.nn.stylegan2 import Generator
from cfexplain.utils.cli import ConfigError
from tests.stages.test_direction import (
    LinearEncoder,
    LinearGenerator,
    OrdinalClassifier,
    PlantedClassifier,
    planted_directions,
)


def _planted_engine(**kw) -> CounterfactualEngine:
    G = LinearGenerator()
    return CounterfactualEngine(
        G, LinearEncoder(), PlantedClassifier(), planted_directions(2)[0], device="cpu", **kw
    )


def _planted_images(n: int, seed: int = 0) -> torch.Tensor:
    G = LinearGenerator()
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    return G.synthesis(G.mapping(z))


def test_auto_lambdas_hit_the_target_probabilities():
    engine = _planted_engine(lambda_range=2.0, bisect_steps=20)
    x = _planted_images(6)
    for target in (1, 0):
        cf = engine(x, target=target, lambdas="auto")
        goal = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]).expand(6, -1)
        assert cf.lambdas.shape == cf.probs.shape == (6, 5)
        assert torch.allclose(cf.probs, goal, atol=1e-3), cf.probs
        assert (cf.lambdas.diff(dim=1) > 0).all()
        # probabilities of class `target`: the two targets are mirror images
        assert torch.allclose(
            cf.input_probs + engine(x, target=1 - target, lambdas=[0.0]).input_probs, torch.ones(6)
        )
    # exact inverse: the reconstruction is the input, frame probabilities follow sigmoid(3 (u·w + λ))
    assert torch.allclose(cf.reconstruction, x, atol=1e-4) and cf.recon_error.max() < 1e-4


def test_unreachable_targets_stop_at_the_end_of_the_range():
    engine = _planted_engine(lambda_range=0.05, bisect_steps=12)  # far too short to reach 0.1 / 0.9
    near_boundary = _planted_images(3) * 0.01  # probabilities near 0.5: 0.3..0.7 are out of reach
    cf = engine(near_boundary, target=1, lambdas="auto")
    assert ((cf.probs - 0.5).abs() < 0.1).all()
    assert torch.allclose(cf.lambdas[:, 0], torch.full((3,), -0.1), atol=1e-3)
    assert torch.allclose(cf.lambdas[:, -1], torch.full((3,), 0.1), atol=1e-3)


class _WavyClassifier(torch.nn.Module):
    """Binary logit ``6 sin(u·w)``: along u the probability crosses every level again and again."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = PlantedClassifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.planted.inverse(x)[:, 0] @ self.planted.U[0]
        return torch.stack([torch.zeros_like(s), 6 * torch.sin(s)], dim=1)


def test_auto_lambdas_take_the_crossing_nearest_the_reconstruction():
    u = planted_directions(2)[0]
    G = LinearGenerator()
    w = G.mapping(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(1)))[:, 0]
    w = w - (w @ u)[:, None] * u + torch.tensor([0.0, 0.2, -0.2, 1.0])[:, None] * u  # u·w known
    x = G.synthesis(w[:, None].expand(-1, 3, -1))

    def engine(**kw):
        return CounterfactualEngine(
            G, LinearEncoder(), _WavyClassifier(), u, lambda_range=4.0, device="cpu", **kw
        )

    cf = engine(bisect_steps=20)(x, target=1, lambdas="auto")
    s0 = torch.tensor([0.0, 0.2, -0.2, 1.0])[:, None]
    goal = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    # the crossings of 6 sin(s) = logit(p) nearest s0 on the rising branch through 0
    nearest = torch.asin(torch.logit(goal) / 6)[None] - s0
    assert torch.allclose(cf.probs, goal.expand(4, -1), atol=1e-3)
    assert torch.allclose(cf.lambdas, nearest, atol=1e-3), cf.lambdas
    # bisecting the whole [-8, 8] (the monotone assumption) lands on crossings a turn away
    far = engine(bisect_steps=20, scan_steps=0)(x, target=1, lambdas="auto")
    assert (far.lambdas - nearest).abs().max() > 3.0
    with pytest.raises(ValueError, match="scan_steps"):
        engine(scan_steps=-1)


def _stylegan_engine(max_batch: int, bisect_steps: int = 8) -> CounterfactualEngine:
    torch.manual_seed(0)
    G = Generator(
        z_dim=16, w_dim=16, img_resolution=16, img_channels=1, channel_base=128, channel_max=16
    )
    E = Encoder(
        img_resolution=16, img_channels=1, w_dim=16, num_ws=G.num_ws, width=4, channel_max=16
    )
    torch.nn.init.normal_(E.head[-1].weight, std=0.05)  # leave the all-w_avg start behind
    f = ResNetClassifier(in_channels=1, num_classes=2, width=4, blocks=[1])
    for m in f.modules():  # BasicBlocks start as identity; make f depend on the image for real
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    d = torch.randn(16)
    return CounterfactualEngine(
        G,
        E,
        f.eval(),
        d,
        lambda_range=4.0,
        max_batch=max_batch,
        bisect_steps=bisect_steps,
        device="cpu",
    )


@pytest.mark.parametrize("lambdas", ["symmetric", "auto", [-1.0, 0.5, 2.0]])
def test_batched_and_per_image_sequences_are_identical(lambdas):
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batched = _stylegan_engine(max_batch=64)(x, target=1, lambdas=lambdas)
    engine = _stylegan_engine(max_batch=3)  # frames of one image split over several passes
    single = [engine(x[i : i + 1], target=1, lambdas=lambdas) for i in range(4)]
    for field in (
        "images",
        "lambdas",
        "probs",
        "reconstruction",
        "recon_error",
        "input_probs",
        "w",
    ):
        one = torch.cat([getattr(s, field) for s in single])
        assert torch.allclose(getattr(batched, field), one, atol=1e-5, rtol=1e-5), field
    assert batched.images.shape[:2] == batched.lambdas.shape
    assert batched.probs.std() > 0  # the walk changes what f sees


def test_refinement_lowers_the_reconstruction_error_per_image():
    engine = _stylegan_engine(max_batch=64)
    with torch.no_grad():
        target_w = engine.G.mapping(torch.randn(3, 16, generator=torch.Generator().manual_seed(2)))
        x = engine.G.synthesis(target_w)
    plain = engine(x, lambdas=[0.0])
    refined = engine(x, lambdas=[0.0], refine_steps=15)
    assert (refined.recon_error < plain.recon_error).all()
    one = engine(x[1:2], lambdas=[0.0], refine_steps=15)
    assert torch.allclose(one.w, refined.w[1:2], atol=1e-4)


def test_project_refines_in_passes_even_under_no_grad():
    engine = _stylegan_engine(max_batch=64)
    G, E = engine.G.requires_grad_(False), engine.E
    with torch.no_grad():
        x = G.synthesis(G.mapping(torch.randn(4, 16, generator=torch.Generator().manual_seed(3))))
        w0 = project(G, E, x)
        assert torch.equal(w0, E(x))  # no steps: E(x) as is
        w = project(G, E, x, refine_steps=15, batch=3)  # two passes

        def error(w):
            return (G.synthesis(w, noise_mode="const") - x).square().flatten(1).mean(1)

        assert (error(w) < error(w0)).all()
    # what the engine's counterfactuals start from (one pass over the four images)
    assert torch.allclose(w, engine.refine(x, w0, 15), atol=1e-5)


def _result(lambdas, probs, recon_probs) -> Counterfactuals:
    n, k = len(probs), len(probs[0])
    return Counterfactuals(
        images=torch.zeros(n, k, 1, 4, 4),
        lambdas=torch.tensor(lambdas, dtype=torch.float32).expand(n, -1),
        probs=torch.tensor(probs),
        reconstruction=torch.zeros(n, 1, 4, 4),
        recon_error=torch.zeros(n),
        input_probs=torch.tensor(recon_probs),
        w=torch.zeros(n, 1, 2),
        target=1,
        recon_probs=torch.tensor(recon_probs),
    )


def test_flip_index_is_the_flipping_frame_nearest_the_reconstruction():
    cf = _result(
        [-2.0, -1.0, 0.0, 1.0, 2.0],
        [
            [0.1, 0.2, 0.3, 0.6, 0.9],  # negative: flips at λ = 1
            [0.2, 0.4, 0.7, 0.8, 0.9],  # positive: flips at λ = -1 (not the farther -2)
            [0.1, 0.2, 0.3, 0.4, 0.45],  # never flips
        ],
        [0.3, 0.7, 0.3],
    )
    assert cf.flip_index().tolist() == [3, 1, -1]


def test_bad_arguments_are_named():
    engine = _planted_engine()
    with pytest.raises(ValueError, match="targets 0 and 1"):
        engine(_planted_images(1), target=2)
    with pytest.raises(ValueError, match="lambdas must be"):
        engine(_planted_images(1), lambdas="wide")
    with pytest.raises(ValueError, match="direction must be"):
        CounterfactualEngine(LinearGenerator(), LinearEncoder(), PlantedClassifier(), torch.ones(5))


def test_parse_lambdas_reads_a_grid_name_or_numbers():
    from omegaconf import OmegaConf

    from cfexplain.explain.counterfactual import parse_lambdas

    assert parse_lambdas("auto") == "auto" and parse_lambdas("symmetric") == "symmetric"
    assert parse_lambdas(OmegaConf.create([-1, 0, 2.5])) == [-1.0, 0.0, 2.5]
    for bad in ("sym", ["a"], [], 3):
        with pytest.raises(ValueError, match="lambdas"):
            parse_lambdas(bad)


def test_ordinal_walk_runs_from_the_lowest_grade_to_the_highest():
    u = planted_directions(2)[0]
    G = LinearGenerator()
    engine = CounterfactualEngine(
        G,
        LinearEncoder(),
        OrdinalClassifier(),
        torch.randn(5, u.shape[0]),  # per-class directions: not used by the ordinal walk
        ordinal=u * 2.0,  # normalised by the engine
        lambda_range=torch.tensor([1.0, 1.0, 1.5, 1.0, 1.0]),
        num_frames=7,
        bisect_steps=20,
        device="cpu",
    )
    x = _planted_images(4)
    cf = engine(x, target=4, lambdas="auto", walk="auto")  # auto: the engine has an ordinal α
    assert cf.ordinal and cf.class_probs.shape == (4, 7, 5) and cf.recon_class_probs.shape == (4, 5)
    g = cf.grades()
    assert torch.allclose(g[:, 0], torch.full((4,), 0.3), atol=1e-3)
    assert torch.allclose(g[:, -1], torch.full((4,), 3.7), atol=1e-3)
    assert (g.diff(dim=1) > 0).all()  # the planted grade rises along u
    # evenly spaced in λ between the two ends
    assert torch.allclose(cf.lambdas.diff(dim=1), cf.lambdas.diff(dim=1)[:, :1].expand(-1, 6))
    assert (
        cf.argmax_grades()[:, 0].tolist() == [0] * 4
        and cf.argmax_grades()[:, -1].tolist() == [4] * 4
    )
    assert torch.allclose(cf.probs, cf.class_probs[..., 4])
    sym = engine(x, target=4, lambdas="symmetric", walk="ordinal")
    assert torch.allclose(sym.lambdas[0], torch.linspace(-1.5, 1.5, 7), atol=1e-6)  # L: the longest
    assert torch.allclose(sym.class_probs[:, 3], sym.recon_class_probs, atol=1e-5)
    plain = engine(x, target=4, lambdas="symmetric", walk="target")
    assert not plain.ordinal
    with pytest.raises(ValueError, match="walk must be"):
        engine(x, walk="sideways")
    with pytest.raises(ValueError, match="ordinal direction"):
        _planted_engine()(x, walk="ordinal")


def test_reprojection_leaves_exact_inverses_unchanged():
    # With E the exact inverse of G, G(E(G(w'))) = G(w'): re-projection must change nothing.
    x = _planted_images(3)
    a = _planted_engine(lambda_range=2.0)(x, lambdas="symmetric")
    b = _planted_engine(lambda_range=2.0, reproject=True)(x, lambdas="symmetric")
    assert torch.allclose(a.images, b.images, atol=1e-4) and torch.allclose(
        a.probs, b.probs, atol=1e-4
    )
    assert torch.allclose(a.reconstruction, b.reconstruction, atol=1e-5)


def test_lambda_bound_holds_frames_inside_the_latent_density():
    x = _planted_images(5)
    free = _planted_engine(lambda_range=20.0)(x, lambdas="symmetric")
    engine = _planted_engine(lambda_range=20.0, lambda_bound=1.0)
    bound = engine(x, lambdas="symmetric")
    alpha = engine.alpha(1)
    ref = engine.density @ alpha
    lo, hi = ref.mean() - ref.std(), ref.mean() + ref.std()
    proj = bound.w[:, 0] @ alpha  # [N]
    reached = proj[:, None] + bound.lambdas  # projection of every frame's w on α
    inside = (proj >= lo) & (proj <= hi)
    assert inside.any()
    assert (reached[inside] >= lo - 1e-4).all() and (reached[inside] <= hi + 1e-4).all()
    # Frames within the band are untouched; the grid's ends (|λ| = 20) are held at the bound.
    kept = (free.lambdas + proj[:, None] >= lo) & (free.lambdas + proj[:, None] <= hi)
    assert torch.equal(bound.lambdas[kept], free.lambdas[kept])
    assert (bound.lambdas[:, -1] < 20).all() and (bound.lambdas[:, 0] > -20).all()
    assert (bound.lambdas[:, 4] == 0).all()  # the reconstruction is always inside
    with pytest.raises(ValueError, match="lambda_bound"):
        _planted_engine(lambda_bound=0.0)


def test_layers_move_only_the_chosen_ws():
    G = LinearGenerator()
    seen = []
    synth = G.synthesis

    def spy(ws, noise_mode="const"):
        seen.append(ws.clone())
        return synth(ws, noise_mode)

    G.synthesis = spy
    engine = CounterfactualEngine(
        G,
        LinearEncoder(),
        PlantedClassifier(),
        planted_directions(2)[0],
        layers=[1, 3],
        device="cpu",
    )
    engine(_planted_images(2), lambdas=[-1.0, 1.0])
    ws = seen[0].view(2, 3, 3, -1)  # [N, K (0, -1, +1), num_ws, w_dim]
    assert torch.equal(ws[:, 1, 0], ws[:, 0, 0]) and torch.equal(ws[:, 2, 0], ws[:, 0, 0])
    assert torch.allclose(ws[:, 2, 1:] - ws[:, 0, 1:], engine.alpha(1).expand(2, 2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        CounterfactualEngine(
            G, LinearEncoder(), PlantedClassifier(), planted_directions(2)[0], layers=[2, 9]
        )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lambda_bound": "abc"}, "counterfactual.lambda_bound='abc': expected a number > 0"),
        ({"lambda_bound": -1}, "counterfactual.lambda_bound=-1: expected a number > 0"),
        ({"grade_ends": "ab"}, "counterfactual.grade_ends='ab': expected \\[low, high\\]"),
        (
            {"grade_ends": [3, 1]},
            "counterfactual.grade_ends=\\[3.0, 1.0\\]: expected \\[low, high\\] with low < high",
        ),
        ({"layers": [0.5, 2]}, "counterfactual.layers=\\[0.5, 2\\]: expected \\[start, stop\\)"),
        ({"layers": [1, 2, 3]}, "counterfactual.layers=\\[1, 2, 3\\]: expected"),
    ],
)
def test_a_bad_walk_option_is_a_config_error_naming_its_field(kw, message):
    """A config error, not a ValueError the explain pipeline would turn into a note and a
    gallery without counterfactuals."""
    with pytest.raises(ConfigError, match=message):
        _planted_engine(**kw)
