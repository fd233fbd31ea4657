"""Heatmap metrics on constructed maps, masks and models whose answers are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from cfexplain.evaluate.heatmaps import (
    blurred,
    deletion_insertion,
    dilate,
    iou_at_area,
    localisation,
    perturbation_curves,
    pointing_game,
    randomisation_check,
    rank_correlation,
    relevance_mass,
    relevance_rank,
    ssim,
)
from cfexplain.explain.metrics import average_ranks

R = 16


def square_mask(n: int = 1, top: int = 4, left: int = 4, size: int = 4) -> torch.Tensor:
    """``bool [n, R, R]`` with one ``size`` x ``size`` square."""
    m = torch.zeros(n, R, R, dtype=torch.bool)
    m[:, top : top + size, left : left + size] = True
    return m


# ----------------------------------------------------------------------------- localisation


def test_map_equal_to_mask_scores_one_everywhere():
    masks = torch.cat([square_mask(1, 2, 3, 5), square_mask(1, 9, 8, 3)])
    for maps in (masks.float(), masks.float()[:, None]):  # [N, H, W] and [N, 1, H, W]
        scores = localisation(maps, masks)
        for name, v in scores.items():
            assert v.shape == (2,), name
            torch.testing.assert_close(v, torch.ones(2), msg=name)


def test_uniform_map_scores_area_share():
    masks = square_mask(1, 4, 4, 4)  # 16 of 256 pixels
    share = 16 / 256
    for maps in (torch.ones(1, R, R), torch.full((1, 1, R, R), 0.3)):
        assert relevance_mass(maps, masks).item() == pytest.approx(share)
        # Exact ties: split evenly, so a constant map gets no credit from raster order.
        assert pointing_game(maps, masks).item() == pytest.approx(share)
        assert relevance_rank(maps, masks).item() == pytest.approx(share)
        assert iou_at_area(maps, masks).item() == pytest.approx(share / (2 - share))


def test_uniform_map_with_tiny_noise_is_near_area_share_on_relevance_mass():
    masks = square_mask(1, 0, 0, 8)  # a quarter of the image
    maps = 1 + 1e-4 * torch.rand(1, R, R, generator=torch.Generator().manual_seed(0))
    assert relevance_mass(maps, masks).item() == pytest.approx(0.25, abs=1e-3)


def test_peak_outside_mask_misses_and_tolerance_reaches_it():
    masks = square_mask(1, 4, 4, 4)  # rows/cols 4..7
    maps = torch.zeros(1, R, R)
    maps[0, 10:14, 10:14] = 0.5  # 16 pixels away from the mask: the top-16 lie outside
    maps[0, 5, 11] = 1.0  # the peak, 4 px right of the mask's last column
    assert pointing_game(maps, masks).item() == 0.0
    assert pointing_game(maps, masks, tolerance=3).item() == 0.0
    assert pointing_game(maps, masks, tolerance=4).item() == 1.0
    assert relevance_mass(maps, masks).item() == 0.0
    assert relevance_rank(maps, masks).item() == 0.0
    assert iou_at_area(maps, masks).item() == 0.0
    # Ties at the 16th value share the remaining places: 15 of 255 zeros, 16 of them inside.
    maps[0, 10:14, 10:14] = 0.0
    assert relevance_rank(maps, masks).item() == pytest.approx(15 * 16 / 255 / 16)


def test_dilation_is_a_disc():
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 4, 4] = True
    d = dilate(m, 2)[0]
    assert d.sum().item() == 13  # lattice points within distance 2
    assert d[4, 6] and d[5, 5] and not d[6, 6]


def test_relevance_mass_counts_only_positive_relevance():
    masks = square_mask(1, 0, 0, 8)
    maps = torch.zeros(1, R, R)
    maps[0, :8, :8] = 1.0  # 64 units inside
    maps[0, 8:, 8:] = -5.0  # negative outside: ignored
    maps[0, 0, 15] = 64.0  # 64 positive units outside
    assert relevance_mass(maps, masks).item() == pytest.approx(0.5)


def test_rank_and_iou_match_a_direct_definition_on_random_maps():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 1, R, R, generator=g)  # continuous: no ties
    masks = torch.rand(5, R, R, generator=g) < torch.linspace(0.05, 0.6, 5)[:, None, None]
    rank, iou = relevance_rank(maps, masks), iou_at_area(maps, masks)
    for i in range(5):
        k = int(masks[i].sum())
        top = torch.zeros(R * R, dtype=torch.bool)
        top[maps[i].flatten().argsort(descending=True)[:k]] = True
        m = masks[i].flatten()
        assert rank[i].item() == pytest.approx((top & m).sum().item() / k)
        assert iou[i].item() == pytest.approx((top & m).sum().item() / (top | m).sum().item())


def test_empty_masks_and_maps_without_positive_relevance_give_nan():
    masks = torch.cat([torch.zeros(1, R, R, dtype=torch.bool), square_mask(1)])
    maps = torch.rand(2, R, R, generator=torch.Generator().manual_seed(2))
    scores = localisation(maps, masks)
    for name, v in scores.items():
        assert math.isnan(v[0].item()), name
        assert not math.isnan(v[1].item()), name  # one empty mask does not spoil the others
    assert math.isnan(relevance_mass(-torch.ones(1, R, R), square_mask(1)).item())
    assert math.isnan(relevance_mass(torch.zeros(1, R, R), square_mask(1)).item())


def test_maps_are_resized_to_the_masks():
    masks = square_mask(2, 4, 8, 4)  # aligned with 2x2 blocks
    small = masks[:, ::2, ::2].float()  # [2, 8, 8], the same region at half resolution
    scores = localisation(small[:, None], masks)
    assert scores["pointing_game"].tolist() == [1.0, 1.0]
    assert (scores["relevance_mass"] > 0.7).all()
    assert (scores["relevance_rank"] == 1.0).all()


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (torch.ones(2, R, R), torch.ones(2, R, R), "bool"),
        (torch.ones(2, R, R), torch.ones(R, R, dtype=torch.bool), r"masks must be \[N, H, W\]"),
        (torch.ones(2, 3, R, R), torch.ones(2, R, R, dtype=torch.bool), r"maps must be"),
        (torch.ones(R, R), torch.ones(2, R, R, dtype=torch.bool), r"maps must be"),
        (torch.ones(3, R, R), torch.ones(2, R, R, dtype=torch.bool), "number of images"),
        (torch.ones(2, R, R, dtype=torch.long), torch.ones(2, R, R, dtype=torch.bool), "float"),
        (torch.full((2, R, R), math.nan), torch.ones(2, R, R, dtype=torch.bool), "NaN"),
    ],
)
def test_shape_and_type_errors_are_clear(maps, masks, match):
    for fn in (pointing_game, relevance_mass, relevance_rank, iou_at_area):
        with pytest.raises(ValueError, match=match):
            fn(maps, masks)


# ----------------------------------------------------------------------------- faithfulness


class RegionModel(nn.Module):
    """Logit of class 1 = 4 * mean of the pixels in a region; class 0 = 0. Counts its calls."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.calls = 0
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batches.append(len(x))
        assert not torch.is_grad_enabled()
        z = 4 * (x * self.region).sum((1, 2, 3)) / self.region.sum()
        return torch.stack([torch.zeros_like(z), z], 1)


def faithfulness_setup():
    region = square_mask(1, 2, 2, 6)[0]
    model = RegionModel(region)
    x = torch.rand(3, 1, R, R, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.5
    on = region.float().expand(3, R, R) + 0.01 * torch.rand(3, R, R)
    off = torch.flip(region, (0, 1)).float().expand(3, R, R).clone()
    return model, x, on, off


def test_map_on_the_region_is_more_faithful_than_a_map_elsewhere():
    model, x, on, off = faithfulness_setup()
    good = deletion_insertion(model, x, on, target=1, steps=8)
    bad = deletion_insertion(model, x, off, target=1, steps=8)
    assert good["deletion"].shape == good["insertion"].shape == (3,)
    assert (good["deletion"] < bad["deletion"] - 0.1).all()
    assert (good["insertion"] > bad["insertion"] + 0.1).all()


def test_curves_start_and_end_at_the_image_and_the_baseline():
    model, x, on, _ = faithfulness_setup()
    c = perturbation_curves(model, x, on, target=1, steps=4, baseline=-1.0)
    with torch.no_grad():
        p_x = model(x).softmax(1)[:, 1]
        p_base = model(-torch.ones_like(x)).softmax(1)[:, 1]
    torch.testing.assert_close(c["fractions"], torch.linspace(0, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(c["deletion"][:, 0], p_x)
    torch.testing.assert_close(c["deletion"][:, -1], p_base)
    torch.testing.assert_close(c["insertion"][:, 0], p_base)
    torch.testing.assert_close(c["insertion"][:, -1], p_x)
    # Every frame of a region-first deletion lowers the class-1 probability.
    assert (c["deletion"].diff(dim=1) <= 1e-6).all()


def test_batching_gives_the_same_numbers_in_the_fewest_forward_passes():
    model, x, on, _ = faithfulness_setup()
    one = deletion_insertion(model, x, on, target=1, steps=4, batch_size=1)
    assert model.calls == 2 * 3 * 5
    model.calls, model.batches = 0, []
    many = deletion_insertion(model, x, on, target=1, steps=4, batch_size=12)
    assert model.calls == math.ceil(30 / 12) and max(model.batches) == 12
    for k in ("deletion", "insertion"):
        torch.testing.assert_close(one[k], many[k])


def test_model_mode_is_restored_and_targets_can_differ_per_image():
    model, x, on, _ = faithfulness_setup()
    model.train()
    both = deletion_insertion(model, x, on, target=torch.tensor([1, 0, 1]), steps=4)
    assert model.training
    ones = deletion_insertion(model, x, on, target=1, steps=4)
    # softmax of two classes: p0 = 1 - p1 frame by frame, so the AUCs sum to 1.
    torch.testing.assert_close(both["deletion"][1], 1 - ones["deletion"][1])
    torch.testing.assert_close(both["deletion"][[0, 2]], ones["deletion"][[0, 2]])


def test_image_baseline_and_blur():
    model, x, on, _ = faithfulness_setup()
    base = blurred(x, sigma=2.0)
    assert base.shape == x.shape
    tv = lambda z: z.diff(dim=-1).abs().mean()  # noqa: E731
    assert tv(base) < tv(x)
    torch.testing.assert_close(
        blurred(torch.full((1, 2, 8, 8), 0.3)), torch.full((1, 2, 8, 8), 0.3)
    )
    c = perturbation_curves(model, x, on, target=1, steps=2, baseline=base)
    with torch.no_grad():
        torch.testing.assert_close(c["insertion"][:, 0], model(base).softmax(1)[:, 1])
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion(model, x, on, target=1, baseline=torch.zeros(2, 1, R, R))
    with pytest.raises(ValueError, match="target"):
        deletion_insertion(model, x, on, target=torch.tensor([1, 0]))


# ----------------------------------------------------------------------------- randomisation


class SmallCNN(nn.Module):
    """Head registered first, so registration order differs from forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def trained_cnn() -> tuple[SmallCNN, torch.Tensor]:
    """A CNN trained a few steps on 'bright square top-left' vs noise, and a batch."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(16, 1, R, R) * 2 - 1
    y = torch.arange(16) % 2
    x[y == 1, :, 2:8, 2:8] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:6]


def gradient_saliency(x: torch.Tensor):
    def attribute(m: nn.Module) -> torch.Tensor:
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xx)[:, 1].sum(), xx)
        return g

    return attribute


def test_gradient_saliency_passes_and_the_model_is_untouched():
    model, x = trained_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = randomisation_check(model, gradient_saliency(x), seed=0)
    # Reverse forward order, not registration order.
    assert res.layers == ["fc", "bn2", "conv2", "bn1", "conv1"]
    assert len(res.spearman) == len(res.ssim) == 5
    assert res.final == res.spearman[-1]
    assert res.passed
    # Gradients depend on every layer: already the random head decorrelates the maps.
    assert max(abs(v) for v in res.spearman) < 0.5
    # The trained model: same weights and statistics, no hooks left, global RNG unchanged.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    json.dumps(res.to_dict())


def test_registered_method_runs_on_the_copy_without_leaking_hooks():
    from cfexplain.explain.attribution import get_method

    model, x = trained_cnn()
    res = randomisation_check(model, lambda m: get_method("saliency")(m, abs=True).attribute(x, 1))
    assert res.layers == ["fc", "bn2", "conv2", "bn1", "conv1"]
    assert res.passed
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_same_seed_same_result_other_seed_other_weights():
    model, x = trained_cnn()
    a = randomisation_check(model, gradient_saliency(x), seed=3)
    b = randomisation_check(model, gradient_saliency(x), seed=3)
    c = randomisation_check(model, gradient_saliency(x), seed=4)
    assert a.to_dict() == b.to_dict()
    assert a.spearman != c.spearman


def test_map_independent_of_the_weights_fails():
    model, x = trained_cnn()
    res = randomisation_check(model, lambda m: x.abs().sum(1, keepdim=True), threshold=0.5)
    assert res.spearman == pytest.approx([1.0] * 5)
    assert res.ssim == pytest.approx([1.0] * 5)
    assert not res.passed
    # No forward pass to observe: reverse registration order.
    assert res.layers == ["bn2", "conv2", "bn1", "conv1", "fc"]


def test_a_map_that_only_the_first_layer_shapes_fails_although_its_end_point_passes():
    """Guided backprop's failure (Adebayo et al.): maps that survive the randomisation of every
    layer above the first. Only the mean over the cascade catches it."""
    model, x = trained_cnn()
    res = randomisation_check(model, lambda m: m.conv1(x).abs().sum(1, keepdim=True))
    assert res.layers[-1] == "conv1" and res.spearman[:-1] == pytest.approx([1.0] * 4)
    assert abs(res.final) < 0.5 and res.cascade > 0.5 and not res.passed


def test_batchnorm_is_reset_and_layer_groups_are_cumulative():
    model, x = trained_cnn()
    model.bn1.running_mean.fill_(3.0)
    seen = []

    def attribute(m: nn.Module) -> torch.Tensor:
        seen.append(
            (
                m.bn1.running_mean.abs().max().item(),
                torch.equal(m.fc.weight, model.fc.weight),
            )
        )
        return gradient_saliency(x)(m)

    res = randomisation_check(model, attribute, layers=["fc", "bn1"])
    assert res.layers == ["fc", "bn1"]
    # Trained maps, then fc random, then fc and bn1 random (statistics reset to 0).
    assert seen == [(3.0, True), (3.0, False), (0.0, False)]
    with pytest.raises(ValueError, match="nope"):
        randomisation_check(model, attribute, layers=["nope"])


def test_rank_helpers_handle_ties():
    a = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        average_ranks(a), torch.tensor([[2.5, 0.0, 2.5, 1.0], [1.5] * 4], dtype=torch.float64)
    )
    g = torch.Generator().manual_seed(5)
    u, v = torch.rand(2, 64, generator=g), torch.rand(2, 64, generator=g)
    rho = rank_correlation(u, v)
    # Spearman = Pearson of ranks; without ties 1 - 6 Σd² / (n (n² - 1)).
    d = average_ranks(u) - average_ranks(v)
    torch.testing.assert_close(rho.double(), 1 - 6 * d.square().sum(1) / (64 * (64**2 - 1)))
    assert rank_correlation(u, u).tolist() == pytest.approx([1.0, 1.0])
    assert rank_correlation(u, -u).tolist() == pytest.approx([-1.0, -1.0])
    r = rank_correlation(torch.ones(1, 8), u[:1, :8])
    assert math.isnan(r.item())
    assert rank_correlation(u[:1, :8], torch.ones(1, 8)).item() == 0.0
    m = torch.rand(2, 1, 12, 12, generator=g)
    torch.testing.assert_close(ssim(m, 3 * m), torch.ones(2))
    assert (ssim(m, torch.rand(2, 1, 12, 12, generator=g)) < 0.5).all()
