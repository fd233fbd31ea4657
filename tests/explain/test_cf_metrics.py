"""Counterfactual metrics against hand-computed values and scipy's Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cfexplain.explain import metrics as M
from cfexplain.explain.counterfactual import Counterfactuals


def _cf(probs, recon_probs, images=None, recon=None) -> Counterfactuals:
    probs = torch.tensor(probs)
    n, k = probs.shape
    return Counterfactuals(
        images=images if images is not None else torch.zeros(n, k, 1, 2, 2),
        lambdas=torch.linspace(-1, 1, k).expand(n, -1),
        probs=probs,
        reconstruction=recon if recon is not None else torch.zeros(n, 1, 2, 2),
        recon_error=torch.full((n,), 0.25),
        input_probs=torch.tensor(recon_probs),
        w=torch.zeros(n, 1, 3),
        target=1,
        recon_probs=torch.tensor(recon_probs),
    )


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(20, 9)).astype(np.float32)  # many ties
    b = rng.normal(size=(20, 9)).astype(np.float32)
    ours = M.spearman(torch.tensor(a), torch.tensor(b)).numpy()
    ref = np.array([spearmanr(x, y).statistic for x, y in zip(a, b)])
    ok = ~np.isnan(ref)
    assert np.allclose(ours[ok], ref[ok], atol=1e-5)
    # a constant row has no ordering: 0, not NaN
    assert M.spearman(torch.ones(1, 5), torch.arange(5.0)[None]).item() == 0.0


def test_flip_rate_monotonicity_and_summary():
    cf = _cf(
        [
            [0.1, 0.3, 0.5, 0.7, 0.9],  # rising, flips
            [0.9, 0.7, 0.6, 0.55, 0.52],  # falling, never flips (positive throughout)
            [0.2, 0.4, 0.3, 0.45, 0.6],  # mostly rising, flips at the last frame
        ],
        [0.4, 0.8, 0.35],
    )
    assert M.flip_rate(cf) == pytest.approx(2 / 3)
    mono = M.monotonicity(cf)
    assert mono[0].item() == pytest.approx(1.0) and mono[1].item() == pytest.approx(-1.0)
    assert mono[2].item() == pytest.approx(0.9)
    s = M.summary(cf)
    assert s["flip_rate"] == pytest.approx(2 / 3)
    assert s["monotonicity_mean"] == pytest.approx((1 - 1 + 0.9) / 3)
    assert s["monotonicity_share_0.9"] == pytest.approx(2 / 3)
    assert s["recon_error"] == pytest.approx(0.25) and s["recon_decision_agreement"] == 1.0


def test_proximity_measures_the_flipping_frame_and_skips_the_rest():
    images = torch.zeros(2, 3, 1, 2, 2)
    images[0, 2] = 0.5  # the frame that flips for image 0
    images[0, 0] = 9.0  # a far frame that must not be measured
    cf = _cf([[0.2, 0.4, 0.8], [0.1, 0.2, 0.3]], [0.3, 0.3], images=images)
    prox = M.proximity(cf)
    assert prox["l1"][0].item() == pytest.approx(0.5) and math.isnan(prox["l1"][1].item())
    assert M.summary(cf)["proximity_l1"] == pytest.approx(0.5)
    no_flip = _cf([[0.1, 0.2, 0.3]], [0.3])
    assert math.isnan(M.summary(no_flip)["proximity_l1"])


class _RegionShare(torch.nn.Module):
    """Two classes; p(class 1) is the share of a region's pixels that are 1 (0 elsewhere):
    ``logits = [log(1 - m), log(m)]`` with m the region's mean."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        m = m.clamp(1e-7, 1 - 1e-7)
        return torch.stack([(1 - m).log(), m.log()], dim=1)


@pytest.mark.parametrize("steps", [8, 16])
def test_cout_of_a_region_read_first_or_last_matches_the_closed_form(steps):
    # A region of a = 1/4 of the pixels decides; the counterfactual sets every pixel to 1. With the
    # region first in the order, p(1) climbs linearly to 1 over the first quarter of the path:
    # area 1 - a/2 under p(1), a/2 under p(0): COUT = 1 - a. With the region last: a - 1.
    h = w = 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:4, :4] = True
    model = _RegionShare(region)
    query, cf = torch.zeros(2, 1, h, w), torch.ones(2, 1, h, w)
    first = region.float()[None, None] + torch.rand(1, 1, h, w) * 0.5  # region ranks first
    attribution = torch.cat([first, -first])  # image 2: the region ranks last
    source, target = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    got = M.cout(model, query, cf, attribution, source, target, steps=steps)
    assert got.tolist() == pytest.approx([0.75, -0.75], abs=1e-5)
    # Swapping the roles of the classes flips the sign; a counterfactual equal to the query: 0.
    assert M.cout(model, query, cf, attribution, target, source, steps=steps).tolist() == (
        pytest.approx([-0.75, 0.75], abs=1e-5)
    )
    same = M.cout(model, query, query, attribution, source, target, steps=steps)
    assert same.tolist() == pytest.approx([-1.0, -1.0], abs=1e-5)  # p(0) stays 1 all along


def test_counterfactual_cout_reads_the_flip_frame_against_the_reconstruction():
    h = w = 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:, :2] = True  # a quarter of the pixels
    model = _RegionShare(region)
    # Frame 1 flips: its region is all 1 (the rest changes too, less): the |difference| order
    # puts the region first, so COUT = 1 - 1/4.
    frames = torch.zeros(1, 3, 1, h, w)
    frames[0, 1] = 0.5
    frames[0, 1, 0][region] = 1.0
    frames[0, 2] = 1.0
    cf = _cf([[0.0, 1.0, 1.0]], [0.0], images=frames, recon=torch.zeros(1, 1, h, w))
    assert M.counterfactual_cout(model, cf, steps=16).tolist() == pytest.approx([0.75], abs=1e-5)


def test_expected_grade_and_ordinal_metrics():
    from cfexplain.explain.counterfactual import expected_grade

    p = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert expected_grade(p).tolist() == pytest.approx([0.0, 2.5, 2.0])
    # Two walks of 4 frames over 3 grades: one rising (with a level wobble within tolerance),
    # one that falls in the middle.
    class_probs = torch.tensor(
        [
            [[0.9, 0.1, 0.0], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.1, 0.305, 0.595]],
            [[0.8, 0.2, 0.0], [0.0, 0.2, 0.8], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    cf = _cf([[0.1] * 4, [0.1] * 4], [0.1, 0.1])
    cf.class_probs = class_probs
    assert cf.ordinal
    g = cf.grades()
    assert g[0].tolist() == pytest.approx([0.1, 1.0, 1.5, 1.495])
    m = M.ordinal_metrics(cf)
    assert m["grade_rises"].tolist() == [1.0, 0.0]
    assert m["argmax_first"].tolist() == [0.0, 0.0] and m["argmax_last"].tolist() == [2.0, 2.0]
    assert m["grade_first"].tolist() == pytest.approx([0.1, 0.2])
    assert m["grade_monotonicity"][0].item() == pytest.approx(0.8)  # ranks 1,2,4,3
    assert M.grade_rises(torch.tensor([[0.0, 1.0, 0.98]]), tolerance=0.01).tolist() == [False]


class ReadsRegion(torch.nn.Module):
    """Logits [0, 3 * sum of the pixels in ``region``]: a classifier that reads one region."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.region = region

    def forward(self, x):
        v = 3.0 * x[:, 0][:, self.region].sum(1)
        return torch.stack([torch.zeros_like(v), v], dim=1)


def change_effects(f, before, after, target, grid):
    return M.spread_values(
        M.square_values(f, before, after, target, grid=grid), before, after, grid
    )


def test_square_values_credit_only_the_changes_the_classifier_reads():
    g = torch.Generator().manual_seed(0)
    before = torch.rand(3, 1, 16, 16, generator=g)
    after = before.clone()
    after[:, :, :4, :4] -= 0.5  # read by the classifier (square 0 of a 4 x 4 grid)
    after[:, :, 8:12, 8:12] += 0.9  # a larger change it ignores (square 10)
    read = torch.zeros(16, 16, dtype=torch.bool)
    read[:4, :4] = True
    f = ReadsRegion(read)
    out = change_effects(f, before, after, 1, grid=4)
    assert out.shape == (3, 1, 16, 16)
    move = torch.softmax(f(after), 1)[:, 1] - torch.softmax(f(before), 1)[:, 1]
    assert (move < 0).all()
    # The read square carries the whole move, signed towards it (positive), spread over its
    # pixels; the ignored change and the unchanged squares get exactly nothing.
    assert torch.allclose(out[:, 0, :4, :4].sum((1, 2)), move.abs(), atol=1e-6)
    assert (out[:, 0, :4, :4] > 0).all()
    assert torch.equal(out[:, 0, 8:12, 8:12], torch.zeros(3, 4, 4))
    rest = torch.ones(16, 16, dtype=torch.bool)
    rest[:4, :4] = False
    assert torch.equal(out[:, 0][:, rest], torch.zeros(3, int(rest.sum())))


def test_spread_values_spread_a_square_by_how_much_each_pixel_changed():
    before = torch.zeros(1, 1, 8, 8)
    after = before.clone()
    after[0, 0, 0, 0], after[0, 0, 0, 1] = 0.3, 0.1  # one square of a 2 x 2 grid, unevenly
    read = torch.zeros(8, 8, dtype=torch.bool)
    read[:4, :4] = True
    out = change_effects(ReadsRegion(read), before, after, 1, grid=2)[0, 0]
    assert out[0, 0] == pytest.approx(3 * out[0, 1].item(), rel=1e-5)
    assert int((out != 0).sum()) == 2


def test_focused_change_keeps_the_fewest_squares_that_carry_the_share():
    before, after = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    # squares of a 2 x 2 grid: values 0.1, 0.4, -0.2, 0.3 (positive sum 0.8)
    values = torch.tensor([[0.1, 0.4, -0.2, 0.3]])
    out = M.focused_change(before, after, values, grid=2, keep=0.6)[0, 0]
    # 0.4 alone is short of 0.6 * 0.8 = 0.48; 0.4 + 0.3 reaches it: squares 1 and 3 only
    assert out[:2, 2:].eq(1).all() and out[2:, 2:].eq(1).all()
    assert out[:, :2].eq(0).all()
    assert torch.equal(M.focused_change(before, after, values, grid=2, keep=1.0)[0, 0, :2, :2],
                       torch.ones(2, 2))  # fmt: skip
    assert torch.equal(M.focused_change(before, after, -values.abs(), grid=2), before)


def test_counterfactual_effects_reduce_the_change_to_what_f_reads():
    g = torch.Generator().manual_seed(1)
    recon = 0.1 * torch.rand(2, 1, 16, 16, generator=g) - 0.05  # f's logit near 0
    frame = recon.clone()
    frame[:, :, :4, :4] += 0.05  # read by the classifier: its logit rises by 2.4
    frame[:, :, 8:12, 8:12] -= 0.9  # a larger change it ignores
    read = torch.zeros(16, 16, dtype=torch.bool)
    read[:4, :4] = True
    f = ReadsRegion(read)
    p = lambda x: torch.softmax(f(x), 1)[:, 1]  # noqa: E731
    images = torch.stack([recon, (recon + frame) / 2, frame], dim=1)
    cf = _cf(torch.stack([p(x) for x in images.unbind(1)], 1).tolist(), p(recon).tolist(),
             images=images, recon=recon)  # fmt: skip
    e = M.counterfactual_effects(f, cf, grid=4)
    assert e.map.shape == (2, 1, 16, 16) and e.focused.shape == recon.shape
    # Only the read square changes in the focused image, and it moves f all the way.
    assert torch.equal(e.focused[:, :, :4, :4], frame[:, :, :4, :4])
    assert torch.equal(e.focused[:, :, 4:], recon[:, :, 4:])
    assert torch.allclose(e.focused_scores, p(frame), atol=1e-6)
    assert torch.allclose(e.sufficiency, torch.ones(2), atol=1e-5)
    # A counterfactual f does not react to at all: nothing kept, no share to report.
    still = ReadsRegion(torch.zeros(16, 16, dtype=torch.bool))
    e = M.counterfactual_effects(still, cf, grid=4)
    assert torch.equal(e.focused, recon) and e.sufficiency.isnan().all()


class GradesRegion(ReadsRegion):
    """Three grades with logits [-v, 0, v], v = 3 * the region's pixel sum: the expected grade
    rises with the region alone."""

    def forward(self, x):
        v = super().forward(x)[:, 1]
        return torch.stack([-v, torch.zeros_like(v), v], dim=1)


def test_ordinal_walks_credit_the_squares_that_move_the_expected_grade():
    g = torch.Generator().manual_seed(2)
    recon = 0.1 * torch.rand(2, 1, 16, 16, generator=g) - 0.05
    read = torch.zeros(16, 16, dtype=torch.bool)
    read[4:8, 4:8] = True
    f = GradesRegion(read)
    frames = [recon.clone() for _ in range(3)]
    for k, frame in enumerate(frames):
        frame[:, :, 4:8, 4:8] += 0.03 * k  # the grade rises frame by frame
        frame[:, :, 12:, 12:] -= 0.5 * k  # a larger change f ignores
    images = torch.stack(frames, dim=1)
    class_probs = torch.stack([torch.softmax(f(x), 1) for x in frames], dim=1)
    cf = _cf([[0.5] * 3] * 2, [0.5, 0.5], images=images, recon=recon)
    cf.class_probs, cf.recon_class_probs = class_probs, torch.softmax(f(recon), 1)
    assert M.strongest_frame(cf).tolist() == [2, 2]
    e = M.counterfactual_effects(f, cf, grid=4)
    grade = lambda x: M.readout(f, x, None)  # noqa: E731
    move = grade(frames[2]) - grade(recon)
    assert (move > 0.5).all()
    # The read square carries the whole rise of the expected grade; the ignored change nothing.
    assert torch.allclose(e.map[:, 0, 4:8, 4:8].sum((1, 2)), move, atol=1e-5)
    assert torch.equal(e.map[:, 0, 12:, 12:], torch.zeros(2, 4, 4))
    assert torch.equal(e.focused[:, :, 12:, 12:], recon[:, :, 12:, 12:])
    assert torch.allclose(e.focused_scores, grade(frames[2]), atol=1e-5)
    assert torch.allclose(e.sufficiency, torch.ones(2), atol=1e-4)


def test_strongest_frame_is_farthest_from_the_reconstruction():
    cf = _cf([[0.1, 0.5, 0.9], [0.2, 0.6, 0.7], [0.05, 0.4, 0.5]], [0.6, 0.1, 0.5])
    assert M.strongest_frame(cf).tolist() == [0, 2, 0]
