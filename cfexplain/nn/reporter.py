"""The report writer (MDNet-style, Zhang et al. 2017): a small ResNet gives a grid of spatial
features; an LSTM writes the report word by word, each word from a soft attention over the grid
(Show, Attend and Tell, Xu et al. 2015). The attention of a word is its evidence map.

The vocabulary is a constructor argument, so the safetensors file alone (weights, class path
and kwargs) rebuilds the model. Tokens: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int = 1) -> list[str]:
    """Special tokens, then the words seen at least ``min_count`` times, sorted."""
    counts: dict[str, int] = {}
    for tokens in token_lists:
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
    words = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIALS)
    return [*SPECIALS, *words]


class ReporterNet(nn.Module):
    """``x [N, C, H, W]`` and tokens ``[N, T]`` -> word logits ``[N, T, V]`` and attention
    ``[N, T, h, w]`` (each map sums to 1 over the grid).

    Args:
        vocab: the tokens, specials first (:func:`build_vocab`).
        in_channels: image channels.
        width: channels of the stem; each of the ``levels`` residual stages after it halves
            the resolution (channels ``2 * width``, then ``4 * width``).
        levels: halvings after the stem (``stem_stride=2, levels=1``: a 16 x 16 grid at 64 px).
        stem_stride: stride of the 3x3 stem.
        blocks: residual blocks per stage (fewer: a smaller receptive field per grid cell, so
            the attention has to find the evidence rather than a cell that sees all of it).
        embed: word embedding size.
        hidden: LSTM state size.
        attention: size of the attention's keys and queries (scaled dot-product scores).
        max_len: longest report decoded (tokens, ``<eos>`` included).
        dropout: dropout before the word logits.
        start_grid: the LSTM's first state from the image (Show, Attend and Tell starts it
            from the mean feature): here from the grid pooled to ``start_grid`` x
            ``start_grid``, which keeps the layout (which side the fibula is on decides
            which compartment is medial); 0: a learned constant start.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        in_channels: int = 1,
        width: int = 16,
        levels: int = 1,
        stem_stride: int = 2,
        blocks: int = 2,
        embed: int = 64,
        hidden: int = 192,
        attention: int = 32,
        max_len: int = 64,
        dropout: float = 0.1,
        start_grid: int = 0,
    ) -> None:
        super().__init__()
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocab must start with {SPECIALS}, got {list(vocab[:4])}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.in_channels, self.max_len = in_channels, max_len
        self.strides = [stem_stride] + [2] * levels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c = width
        for i in range(levels):
            c_out = width * 2 ** min(i + 1, 2)
            down = nn.Sequential(
                nn.Conv2d(c, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out)
            )
            layers += [BasicBlock(c, c_out, stride=2, downsample=down)]
            layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
            c = c_out
        self.encoder = nn.Sequential(*layers)
        # Where a grid cell is (x, y in [-1, 1]) joins its features: the words medial and
        # lateral depend on where the evidence lies.
        self.feature_dim = c + 2
        self.embed = nn.Embedding(len(self.vocab), embed, padding_idx=PAD)
        self.att_feat = nn.Linear(self.feature_dim, attention)
        self.att_hidden = nn.Linear(hidden, attention)
        self.att_scale = attention**-0.5
        self.gate = nn.Linear(hidden, self.feature_dim)
        self.cell = nn.LSTMCell(embed + self.feature_dim, hidden)
        self.h0 = nn.Parameter(torch.zeros(hidden))
        self.c0 = nn.Parameter(torch.zeros(hidden))
        self.start_grid = start_grid
        if start_grid:
            self.start = nn.Linear(self.feature_dim * start_grid**2, 2 * hidden)
        self.out_hidden = nn.Linear(hidden, embed)
        self.out_context = nn.Linear(self.feature_dim, embed)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(embed, len(self.vocab))

    # ------------------------------------------------------------------------- pieces

    def features(self, x: Tensor) -> Tensor:
        """The grid ``[N, h * w, D]`` (row-major) of images ``[N, C, H, W]``."""
        assert x.ndim == 4 and x.shape[1] == self.in_channels, (
            f"expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
        )
        f = self.encoder(self.stem(x))
        n, _, h, w = f.shape
        ys = torch.linspace(-1, 1, h, device=f.device)
        xs = torch.linspace(-1, 1, w, device=f.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0).expand(n, 2, h, w)
        return torch.cat([f, grid.to(f.dtype)], 1).flatten(2).transpose(1, 2)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the attention grid for images of ``image_size``."""
        h, w = image_size
        for s in self.strides:
            h, w = (h - 1) // s + 1, (w - 1) // s + 1
        return h, w

    def _start(self, feats: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The first ``(h, c)`` of the images whose grid ``feats [N, h * w, D]`` is."""
        n = feats.shape[0]
        h, c = self.h0.expand(n, -1), self.c0.expand(n, -1)
        if self.start_grid:
            g = feats.transpose(1, 2).unflatten(-1, grid)
            pooled = F.adaptive_avg_pool2d(g, self.start_grid).flatten(1)
            dh, dc = torch.tanh(self.start(pooled)).chunk(2, -1)
            h, c = h + dh, c + dc
        return h.contiguous(), c.contiguous()

    def _step(
        self, feats: Tensor, keys: Tensor, word: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """One word: logits ``[N, V]``, attention ``[N, P]`` (sums to 1), the new state."""
        h, c = state
        query = self.att_hidden(h)
        # Broadcast products, not einsum: batched mat-vecs of this size are slower on a CPU.
        alpha = ((keys * query[:, None]).sum(-1) * self.att_scale).softmax(-1)
        context = (alpha[..., None] * feats).sum(1) * torch.sigmoid(self.gate(h))
        e = self.embed(word)
        h, c = self.cell(torch.cat([e, context], -1), (h, c))
        deep = torch.tanh(e + self.out_hidden(h) + self.out_context(context))
        return self.out(self.drop(deep)), alpha, (h, c)

    # ------------------------------------------------------------------------- training

    def forward(self, x: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``tokens [N, T]`` start with ``<bos>``; the logits at ``t`` predict
        ``tokens[:, t + 1]`` (``[N, T - 1, V]``), with the attention of each ``[N, T - 1, h, w]``."""
        assert tokens.ndim == 2 and tokens.shape[0] == x.shape[0], (
            f"expected tokens [{x.shape[0]}, T], got {tuple(tokens.shape)}"
        )
        feats = self.features(x)
        keys = self.att_feat(feats)
        h, w = self.grid_size(x.shape[-2:])
        state = self._start(feats, (h, w))
        logits, alphas = [], []
        for t in range(tokens.shape[1] - 1):
            out, alpha, state = self._step(feats, keys, tokens[:, t], state)
            logits.append(out)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1).unflatten(-1, (h, w))

    # ------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def greedy(self, x: Tensor, max_len: int | None = None) -> list[Decoded]:
        """The most likely word at each step, for each image of ``x [N, C, H, W]``."""
        n, limit = x.shape[0], max_len or self.max_len
        feats = self.features(x)
        keys = self.att_feat(feats)
        grid = self.grid_size(x.shape[-2:])
        state = self._start(feats, grid)
        word = torch.full((n,), BOS, dtype=torch.long, device=x.device)
        words, alphas = [], []
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(limit):
            out, alpha, state = self._step(feats, keys, word, state)
            word = out.argmax(-1)
            words.append(word)
            alphas.append(alpha)
            done |= word == EOS
            if done.all():
                break
        ids, maps = torch.stack(words, 1).cpu(), torch.stack(alphas, 1).cpu()
        return [self._decoded(ids[i].tolist(), maps[i], grid) for i in range(n)]

    @torch.no_grad()
    def beam(self, x: Tensor, beam_size: int = 3, max_len: int | None = None) -> list[Decoded]:
        """Beam search (``beam_size`` hypotheses, summed log-probabilities) per image."""
        limit, grid = max_len or self.max_len, self.grid_size(x.shape[-2:])
        results = []
        for i in range(x.shape[0]):
            feats = self.features(x[i : i + 1])
            keys = self.att_feat(feats)
            # Hypotheses: (score, words, attention maps, state); finished ones move aside.
            live = [(0.0, [BOS], [], self._start(feats, grid))]
            finished: list[tuple[float, list[int], list[Tensor]]] = []
            for _ in range(limit):
                grown = []
                for score, words, maps, state in live:
                    out, alpha, new = self._step(feats, keys, torch.tensor([words[-1]]), state)
                    logp = out.log_softmax(-1)[0]
                    top = logp.topk(beam_size)
                    for lp, w in zip(top.values.tolist(), top.indices.tolist()):
                        grown.append((score + lp, [*words, w], [*maps, alpha[0]], new))
                grown.sort(key=lambda g: -g[0])
                live = []
                for g in grown[:beam_size]:
                    (finished.append(g[:3]) if g[1][-1] == EOS else live.append(g))
                if not live or len(finished) >= beam_size:
                    break
            best = max(finished or [g[:3] for g in live], key=lambda g: g[0])
            results.append(self._decoded(best[1][1:], torch.stack(best[2]).cpu(), grid))
        return results

    def _decoded(self, ids: list[int], alphas: Tensor, grid: tuple[int, int]) -> Decoded:
        """Words up to ``<eos>`` and their attention maps ``[T, h, w]``."""
        n = ids.index(EOS) if EOS in ids else len(ids)
        return Decoded([self.vocab[i] for i in ids[:n]], alphas[:n].reshape(n, *grid))

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``<bos>`` + token ids + ``<eos>``, cut to ``max_len`` (default: the model's) + 1."""
        limit = max_len or self.max_len
        ids = [self.index.get(t, UNK) for t in tokens][: limit - 1]
        return [BOS, *ids, EOS]


@dataclass
class Decoded:
    """A generated report: ``words`` and the attention map of each ``[T, h, w]`` (each sums to 1)."""

    words: list[str]
    attention: Tensor


def pad_tokens(ids: Sequence[Sequence[int]]) -> Tensor:
    """Token id lists padded with ``<pad>`` to ``[N, T_max]``."""
    out = torch.full((len(ids), max(len(s) for s in ids)), PAD, dtype=torch.long)
    for i, s in enumerate(ids):
        out[i, : len(s)] = torch.tensor(s)
    return out


def report_loss(
    logits: Tensor, alphas: Tensor, tokens: Tensor, attention_weight: float = 1.0
) -> Tensor:
    """Cross-entropy of the next words (``<pad>`` ignored) + ``attention_weight`` x the doubly
    stochastic penalty of Show-Attend-Tell: over a report, the attention should cover the grid
    evenly rather than stare at one cell (0: everywhere alike, near 1: all on one cell).

    ``logits [N, T-1, V]``, ``alphas [N, T-1, h, w]``, ``tokens [N, T]``.
    """
    target = tokens[:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD)
    if attention_weight == 0:
        return ce
    keep = (target != PAD).to(alphas.dtype)[..., None, None]
    cover = (alphas * keep).sum(1).flatten(1)  # [N, h*w]
    # Each cell's share is steps / cells when the maps cover the image evenly; divided by
    # steps**2 the penalty lies in [0, 1) whatever the report's length and the grid's size.
    steps = keep.flatten(1).sum(1, keepdim=True)
    penalty = ((steps / cover.shape[1] - cover) ** 2).sum(1) / steps[:, 0] ** 2
    return ce + attention_weight * penalty.mean()


def attention_at(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Attention maps ``[..., h, w]`` brought to image ``size`` ``[..., H, W]`` (bilinear),
    renormalised so that each still sums to 1."""
    lead = maps.shape[:-2]
    up = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear")
    up = up.clamp_min(0).reshape(*lead, *size)
    return up / up.flatten(-2).sum(-1)[..., None, None].clamp_min(1e-12)


def load_reporter(stage_dir: str | Path, device: str | torch.device = "cpu") -> ReporterNet:
    """The report writer of a finished ``reporter`` stage, eval mode."""
    from cfexplain.utils.artifacts import Artifact, load_model

    model = load_model(Artifact.load(stage_dir).path("weights"), map_location=device)
    assert isinstance(model, ReporterNet)
    return model
