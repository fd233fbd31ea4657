"""The report writer: attention maps sum to 1, it learns a planted attribute and points at it,
greedy and beam decoding agree on a learnt report, the loss, BLEU-4 on a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.text import bleu_score

from cfexplain.data.reports import tokenize
from cfexplain.explain.reporter import bleu, pointing, pointing_scores, word_maps
from cfexplain.nn.reporter import (
    BOS,
    EOS,
    PAD,
    ReporterNet,
    attention_at,
    build_vocab,
    pad_tokens,
    report_loss,
)

PRESENT, ABSENT = "Lead side marker in the corner.", "No lead marker."


def _planted(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """16 px noise images; half carry a bright 4 px square somewhere (the 'marker')."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.6 - 0.8
    masks = torch.zeros(n, 16, 16, dtype=torch.bool)
    reports = []
    for i in range(n):
        if i % 2:
            r, c = torch.randint(0, 13, (2,), generator=g).tolist()
            x[i, 0, r : r + 4, c : c + 4] = 0.9
            masks[i, r : r + 4, c : c + 4] = True
        reports.append(PRESENT if i % 2 else ABSENT)
    return x, reports, masks


def _model(vocab, **kw) -> ReporterNet:
    torch.manual_seed(0)
    args = dict(width=8, stem_stride=1, levels=1, embed=16, hidden=32, attention=16, dropout=0.0)
    return ReporterNet(vocab, **(args | kw))


@pytest.mark.parametrize("start_grid", [0, 2])
def test_attention_maps_sum_to_one_in_training_decoding_and_at_image_size(start_grid):
    vocab = build_vocab([tokenize(PRESENT), tokenize(ABSENT)])
    model = _model(vocab, stem_stride=2, start_grid=start_grid).eval()
    x = torch.randn(3, 1, 32, 32)
    tokens = pad_tokens([model.encode(tokenize(PRESENT)), model.encode(tokenize(ABSENT))] * 2)[:3]
    logits, alphas = model(x, tokens)
    assert logits.shape == (3, tokens.shape[1] - 1, len(vocab))
    assert alphas.shape == (3, tokens.shape[1] - 1, 8, 8) and model.grid_size((32, 32)) == (8, 8)
    torch.testing.assert_close(alphas.sum((-1, -2)), torch.ones(3, tokens.shape[1] - 1))
    assert (alphas >= 0).all()
    for dec in [*model.greedy(x, max_len=6), *model.beam(x, beam_size=2, max_len=6)]:
        assert dec.attention.shape == (len(dec.words), 8, 8)
        torch.testing.assert_close(dec.attention.sum((-1, -2)), torch.ones(len(dec.words)))
    # The first state is the learned constant, or read from the image's pooled grid.
    h, _ = model._start(model.features(x), (8, 8))
    assert (h[0] != h[1]).any() == bool(start_grid)
    up = attention_at(alphas[0], (32, 32))
    assert up.shape == (tokens.shape[1] - 1, 32, 32)
    torch.testing.assert_close(up.sum((-1, -2)), torch.ones(tokens.shape[1] - 1))


def test_vocab_specials_encoding_and_padding():
    vocab = build_vocab([["b", "a", "a"], ["c"]], min_count=2)
    assert vocab == ["<pad>", "<bos>", "<eos>", "<unk>", "a"]
    model = _model(vocab, max_len=4)
    assert model.encode(["a", "zzz", "a", "a", "a"]) == [BOS, 4, 3, 4, EOS]
    padded = pad_tokens([[1, 4, 2], [1, 2]])
    assert padded.tolist() == [[1, 4, 2], [1, 2, PAD]]
    with pytest.raises(ValueError, match="vocab must start with"):
        ReporterNet(["a", "b"])


def test_the_loss_ignores_padding_and_penalises_staring_at_one_cell():
    tokens = torch.tensor([[BOS, 4, EOS, PAD]])
    logits = torch.full((1, 3, 5), -20.0)
    logits[0, 0, 4] = logits[0, 1, EOS] = 20.0  # right on the two real words
    logits[0, 2, 4] = 20.0  # wrong on the padding: ignored
    even = torch.full((1, 3, 2, 2), 0.25)
    stare = torch.zeros(1, 3, 2, 2)
    stare[..., 0, 0] = 1.0
    assert report_loss(logits, even, tokens, 0.0) < 1e-6
    assert report_loss(logits, even, tokens, 1.0) < 1e-6
    # Both real steps on one cell of four: (2/4 - 2)^2 + 3 (2/4)^2 = 3, over 2^2 steps.
    assert report_loss(logits, stare, tokens, 1.0) == pytest.approx(0.75, abs=1e-5)


def test_bleu4_on_a_known_answer_and_against_torchmetrics():
    ref, hyp = tokenize("the cat is on the mat"), tokenize("the cat is on mat")
    # p1..p4 = 5/5, 3/4, 2/3, 1/2; brevity exp(1 - 6/5).
    expected = math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu([ref], [hyp]) == pytest.approx(expected, rel=1e-9)
    assert bleu([ref], [ref]) == 1.0 and bleu([ref], [["dog"]]) == 0.0
    refs = [
        tokenize("no osteophytes. kl grade 0."),
        tokenize("severe medial narrowing. kl grade 4."),
    ]
    hyps = [
        tokenize("no osteophytes. kl grade 1."),
        tokenize("medial narrowing is severe. kl grade 4."),
    ]
    theirs = bleu_score([" ".join(h) for h in hyps], [[" ".join(r)] for r in refs], n_gram=4)
    assert bleu(refs, hyps) == pytest.approx(float(theirs), rel=1e-6)
    with pytest.raises(ValueError, match="references"):
        bleu([ref], [])


def test_the_reporter_learns_a_planted_marker_and_points_at_it():
    x, reports, masks = _planted(96, seed=0)
    vocab = build_vocab(tokenize(r) for r in reports)
    model = _model(vocab)
    tokens = pad_tokens([model.encode(tokenize(r)) for r in reports])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,), generator=g)
        logits, alphas = model(x[idx], tokens[idx])
        loss = report_loss(logits, alphas, tokens[idx], 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, rt, mt = _planted(40, seed=7)
    decoded = model.greedy(xt)
    right = [d.words == tokenize(r) for d, r in zip(decoded, rt)]
    assert sum(right) / len(right) >= 0.9
    assert [d.words for d in model.beam(xt[:4], beam_size=2)] == [d.words for d in decoded[:4]]
    rows = []
    for dec, m in zip(decoded, mt):
        rows += pointing(word_maps("knee", dec, (16, 16)), {"marker": m}, tolerance=1)
    scores = pointing_scores(rows)
    assert scores["words/marker"] >= 15
    assert scores["pointing/marker"] >= 0.8
    # Far more attention on the square than a uniform map would put there.
    assert scores["mass/marker"] > 2 * scores["area/marker"]
