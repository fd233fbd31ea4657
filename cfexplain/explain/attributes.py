"""StyleSpace attributes (Lang et al. 2021, "Explaining in Style"): single style coordinates whose
change moves the classifier most, found by AttFind on our G without retraining it.

StyleSpace (Wu et al. 2021) is the output of every modulated layer's ``affine``,
``s = [affine_l(w)]_l``: ``G.synthesis.styles(w)`` gives it per layer, :func:`to_styles` as one
flat ``[N, S]`` vector, and :func:`render` draws ``G`` from it (``render(G, to_styles(G, w))
== G.synthesis(w)``). AttFind shifts each coordinate ``j`` by ``±d σ_j`` (``σ``: its std over G
samples) for a set of images, records the change of the classifier's log-odds of each class
(:func:`shift_effects`), and per class greedily keeps the coordinate with the largest mean
change over the images that the attributes chosen so far do not yet flip (:func:`att_find`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cfexplain.utils.artifacts import save_tensors, write_text

ATTRIBUTES_FILE = "attributes.safetensors"
TABLE_FILE = "attributes.csv"
TABLE_COLUMNS = (
    "class",
    "rank",
    "layer",
    "channel",
    "sign",
    "effect",
    "flip_share",
    "flip_share_remaining",
    "coordinate",
)


# ----------------------------------------------------------------------------- StyleSpace


@dataclass(frozen=True)
class StyleLayout:
    """Where each modulated layer's coordinates sit in the flat StyleSpace vector."""

    layers: tuple[str, ...]  # "b4.conv1", "b4.torgb", "b8.conv0", ...
    channels: tuple[int, ...]

    @property
    def size(self) -> int:
        """S, the number of style coordinates."""
        return sum(self.channels)

    @property
    def offsets(self) -> list[int]:
        out, at = [], 0
        for c in self.channels:
            out.append(at)
            at += c
        return out

    def locate(self, coordinate: int) -> tuple[str, int]:
        """``(layer name, channel)`` of a flat coordinate."""
        if not 0 <= coordinate < self.size:
            raise IndexError(f"style coordinate {coordinate} outside 0..{self.size - 1}")
        for name, start, c in zip(self.layers, self.offsets, self.channels):
            if coordinate < start + c:
                return name, coordinate - start
        raise AssertionError("unreachable")

    def mask(self, which: str = "all") -> Tensor:
        """``[S]`` bool: the coordinates searched (``all``; ``conv``: without the ToRGB layers,
        whose styles scale colours rather than change content)."""
        if which not in ("all", "conv"):
            raise ValueError(f"layers must be 'all' or 'conv', got {which!r}")
        keep = [which == "all" or not n.endswith("torgb") for n in self.layers]
        return torch.cat([torch.full((c,), k) for k, c in zip(keep, self.channels)])


def style_layout(G: nn.Module) -> StyleLayout:
    """The :class:`StyleLayout` of a :class:`~cfexplain.nn.stylegan2.Generator`."""
    names, channels = [], []
    for res, block in zip(G.synthesis.block_resolutions, G.synthesis.blocks()):
        convs = ["conv1"] if block.in_channels == 0 else ["conv0", "conv1"]
        for name, layer in zip([*convs, "torgb"], block.layers()):
            names.append(f"b{res}.{name}")
            channels.append(int(layer.affine.out_features))
    return StyleLayout(tuple(names), tuple(channels))


def to_styles(G: nn.Module, w: Tensor) -> Tensor:
    """``w [N, num_ws, w_dim]`` -> flat StyleSpace ``s [N, S]``."""
    return torch.cat(G.synthesis.styles(w), dim=1)


def render(G: nn.Module, s: Tensor, noise_mode: str = "const") -> Tensor:
    """``G`` drawn from flat StyleSpace ``s [N, S]``: images ``[N, C, H, W]``."""
    layout = style_layout(G)
    assert s.ndim == 2 and s.shape[1] == layout.size, (
        f"expected styles [N, {layout.size}], got {tuple(s.shape)}"
    )
    return G.synthesis.from_styles(list(s.split(list(layout.channels), dim=1)), noise_mode)


@torch.no_grad()
def style_std(G: nn.Module, n: int = 2000, seed: int = 0, batch: int = 500) -> Tensor:
    """``[S]`` std of every style coordinate over ``n`` samples of G's mapping (no synthesis)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    z = torch.randn(n, G.z_dim, generator=gen).to(device)
    s = torch.cat([to_styles(G, G.mapping(b)) for b in z.split(batch)])
    return s.std(dim=0).float().cpu()


# ----------------------------------------------------------------------------- scoring


def log_odds(logits: Tensor) -> Tensor:
    """``[..., K]`` log p_k / (1 - p_k) of every class (for two classes: the logit difference)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    rest = torch.stack(
        [torch.logsumexp(logp[..., [j for j in range(logp.shape[-1]) if j != k]], -1)
         for k in range(logp.shape[-1])],
        dim=-1,
    )  # fmt: skip
    return logp - rest


@dataclass
class Effects:
    """f's response to every single-coordinate shift of every image.

    ``base [N, K]`` log-odds of each class for G(s); ``shifted [N, M, 2, K]`` for G(s ± d σ_j e_j)
    (``[..., 0, :]`` minus, ``[..., 1, :]`` plus) of the ``M`` scored ``coordinates``.
    """

    base: Tensor
    shifted: Tensor
    coordinates: Tensor  # [M] flat StyleSpace index of each scored coordinate
    shift: float

    def delta(self, cls: int) -> Tensor:
        """``[N, M, 2]`` change of class ``cls``'s log-odds."""
        return self.shifted[..., cls] - self.base[:, None, None, cls]

    def flips_to(self, cls: int) -> Tensor:
        """``[N, M, 2]`` bool: the shifted image is classified ``cls``."""
        return self.shifted.argmax(-1) == cls


@torch.no_grad()
def shift_effects(
    G: nn.Module,
    classifier: nn.Module,
    s: Tensor,
    std: Tensor,
    shift: float = 3.0,
    coordinates: Tensor | None = None,
    batch: int = 128,
    progress: bool = True,
) -> Effects:
    """Classifier log-odds for every image ``s [N, S]`` with each coordinate (of ``coordinates``,
    default all) moved by ``±shift · std``. ``N · 2M`` renders, ``batch`` per G and f pass."""
    S = s.shape[1]
    coords = torch.arange(S) if coordinates is None else coordinates.long().cpu()
    device = s.device
    step = (shift * std.float()).to(device)
    # One row per (coordinate, sign): the shift to add to an image's styles.
    rows = torch.cat([coords, coords])
    signs = torch.cat([-torch.ones(len(coords)), torch.ones(len(coords))]).to(device)
    base = torch.cat([log_odds(classifier(render(G, b))) for b in s.split(batch)])
    out = torch.empty(len(s), 2, len(coords), base.shape[1])
    bar = tqdm(total=len(s) * len(rows), desc="attfind", unit="img", disable=not progress)
    for n in range(len(s)):
        parts = []
        for sb in one_at_a_time(s[n], rows, signs, step, batch):
            parts.append(log_odds(classifier(render(G, sb))).cpu())
            bar.update(len(sb))
        out[n] = torch.cat(parts).view(2, len(coords), -1)
    bar.close()
    return Effects(base.cpu(), out.transpose(1, 2).contiguous(), coords, float(shift))


def one_at_a_time(
    s: Tensor, rows: Tensor, signs: Tensor, step: Tensor, batch: int
) -> Iterator[Tensor]:
    """Batches of one image's styles ``s [S]``, row ``i`` with coordinate ``rows[i]`` moved by
    ``signs[i] · step[rows[i]]`` and every other coordinate as it is."""
    for r, sg in zip(rows.split(batch), signs.split(batch)):
        r = r.to(s.device)
        sb = s.expand(len(r), len(s)).clone()
        sb[torch.arange(len(r)), r] += sg.to(s.device) * step[r]
        yield sb


def screen_coordinates(
    G: nn.Module,
    classifier: nn.Module,
    s: Tensor,
    std: Tensor,
    keep: int,
    coordinates: Tensor | None = None,
    batch: int = 64,
) -> Tensor:
    """The ``keep`` coordinates (of ``coordinates``, default all) with the largest first-order
    estimate of AttFind's score: ``max_class |mean_n ∂ log-odds / ∂s_j| · σ_j``, from one
    backward pass per class and batch. Exact scoring (:func:`shift_effects`) of these alone
    is what makes a large StyleSpace affordable; what a linear estimate misses is missed."""
    S = s.shape[1]
    coords = torch.arange(S) if coordinates is None else coordinates.long().cpu()
    total: Tensor | None = None
    for sb in s.split(batch):
        sb = sb.detach().requires_grad_(True)
        with torch.enable_grad():
            lo = log_odds(classifier(render(G, sb)))
            grads = [
                torch.autograd.grad(lo[:, c].sum(), sb, retain_graph=c < lo.shape[1] - 1)[0]
                for c in range(lo.shape[1])
            ]
        part = torch.stack([g.sum(0) for g in grads]).cpu()  # [K, S]
        total = part if total is None else total + part
    assert total is not None, "no images to screen"
    score = (total / len(s)).abs().amax(0) * std.float().cpu()  # [S]
    order = score[coords].argsort(descending=True)[:keep]
    return coords[order].sort().values


# ----------------------------------------------------------------------------- AttFind


@dataclass
class Attribute:
    """One style coordinate and the direction that raises class ``cls``."""

    cls: int
    rank: int
    coordinate: int
    layer: str
    channel: int
    sign: int  # +1: raise the coordinate, -1: lower it
    effect: float  # mean change of cls's log-odds over the class's images
    flip_share: float  # share of those images this attribute alone flips to cls
    flip_share_remaining: float  # ... of the images not yet flipped when it was chosen

    def label(self, classes: Sequence[str] | None = None) -> str:
        arrow = "+" if self.sign > 0 else "-"
        to = classes[self.cls] if classes else str(self.cls)
        return f"{self.layer}[{self.channel}]{arrow} -> {to}"


def att_find(
    effects: Effects, layout: StyleLayout, k: int = 8, classes: Sequence[int] | None = None
) -> list[Attribute]:
    """AttFind (Lang et al. 2021, Alg. 1): per class, the ``k`` (coordinate, sign) with the
    largest mean change of the class's log-odds over the images not classified as it and not
    yet flipped to it by the attributes chosen before; a coordinate is chosen once per class.
    When every image is flipped, the rest are ranked over all of the class's images."""
    K = effects.base.shape[1]
    out: list[Attribute] = []
    for c in range(K) if classes is None else classes:
        pred = effects.base.argmax(1)
        images = pred != c
        if not images.any():
            images = torch.ones_like(images)  # every image is already c: rank by mean effect
        delta, flips = effects.delta(c)[images], effects.flips_to(c)[images]
        remaining = torch.ones(len(delta), dtype=torch.bool)
        taken = torch.zeros(delta.shape[1], dtype=torch.bool)
        for rank in range(min(k, delta.shape[1])):
            pool = remaining if remaining.any() else torch.ones_like(remaining)
            score = delta[pool].mean(0)  # [M, 2]
            score[taken] = -math.inf
            m, sg = divmod(int(score.argmax()), 2)
            coord = int(effects.coordinates[m])
            layer, channel = layout.locate(coord)
            out.append(
                Attribute(
                    cls=int(c),
                    rank=rank,
                    coordinate=coord,
                    layer=layer,
                    channel=channel,
                    sign=1 if sg == 1 else -1,
                    effect=float(delta[:, m, sg].mean()),
                    flip_share=float(flips[:, m, sg].float().mean()),
                    flip_share_remaining=float(flips[pool, m, sg].float().mean()),
                )
            )
            taken[m] = True
            remaining &= ~flips[:, m, sg]
    return out


# ----------------------------------------------------------------------------- files


@dataclass
class AttributeSet:
    """What ``attributes.safetensors`` holds: the attributes, every coordinate's std and the
    shift ``d`` (in std units) they were found with."""

    attributes: list[Attribute]
    std: Tensor  # [S]
    shift: float
    layout: StyleLayout
    info: dict[str, Any] = field(default_factory=dict)

    def of_class(self, cls: int) -> list[Attribute]:
        return sorted([a for a in self.attributes if a.cls == cls], key=lambda a: a.rank)

    def step(self, a: Attribute) -> float:
        """The style change ``sign · d · σ`` of attribute ``a``."""
        return a.sign * self.shift * float(self.std[a.coordinate])

    def save(self, folder: str | Path) -> Path:
        """``attributes.safetensors`` and the table ``attributes.csv`` in ``folder`` (atomic)."""
        folder = Path(folder)
        cols = {k: [getattr(a, k) for a in self.attributes] for k in Attribute.__annotations__}
        tensors = {
            "std": self.std.float().contiguous(),
            "shift": torch.tensor([self.shift]),
            **{
                k: torch.tensor(cols[k], dtype=torch.float32 if k.startswith(("eff", "flip")) else torch.int64)
                for k in ("cls", "rank", "coordinate", "channel", "sign", "effect", "flip_share", "flip_share_remaining")
            },
        }  # fmt: skip
        meta = {
            "layers": json.dumps(list(self.layout.layers)),
            "channels": json.dumps(list(self.layout.channels)),
            "info": json.dumps(self.info, default=str),
        }
        write_text(folder / TABLE_FILE, table_csv(self.attributes))
        return save_tensors(folder / ATTRIBUTES_FILE, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> AttributeSet:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no attributes file")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        try:
            layout = StyleLayout(
                tuple(json.loads(meta["layers"])), tuple(json.loads(meta["channels"]))
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: no style layout in its metadata ({e})") from e
        attrs = [
            Attribute(
                cls=int(t["cls"][i]),
                rank=int(t["rank"][i]),
                coordinate=int(t["coordinate"][i]),
                layer=layout.locate(int(t["coordinate"][i]))[0],
                channel=int(t["channel"][i]),
                sign=int(t["sign"][i]),
                effect=float(t["effect"][i]),
                flip_share=float(t["flip_share"][i]),
                flip_share_remaining=float(t["flip_share_remaining"][i]),
            )
            for i in range(len(t["cls"]))
        ]
        info = json.loads(meta.get("info", "{}"))
        return cls(attrs, t["std"], float(t["shift"][0]), layout, info)


def table_csv(attributes: Sequence[Attribute]) -> str:
    """The attribute table: one row per attribute, columns :data:`TABLE_COLUMNS`."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(TABLE_COLUMNS)
    for a in attributes:
        w.writerow(
            [a.cls, a.rank, a.layer, a.channel, "+" if a.sign > 0 else "-",
             f"{a.effect:.4f}", f"{a.flip_share:.4f}", f"{a.flip_share_remaining:.4f}", a.coordinate]
        )  # fmt: skip
    return buf.getvalue()


def table_markdown(attributes: Sequence[Attribute], classes: Sequence[str]) -> str:
    head = "| class | rank | layer | channel | sign | effect (Δ log-odds) | flipped alone |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for a in attributes:
        lines.append(
            f"| {classes[a.cls]} | {a.rank + 1} | {a.layer} | {a.channel} | "
            f"{'+' if a.sign > 0 else '-'} | {a.effect:.3f} | {a.flip_share:.3f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- a trained run

SOURCES = ("encoded", "samples")


@torch.no_grad()
def run_styles(
    run: Any, source: str, split: str, limit: int, seed: int, batch: int, refine_steps: int = 0
) -> Tensor:
    """``s [N, S]`` of ``limit`` images of a trained run: its ``split`` encoded through E and
    refined by ``refine_steps`` (``encoded``; as the counterfactual gets them), or G's own
    samples (``samples``)."""
    from cfexplain.explain.counterfactual import project
    from cfexplain.utils.cli import ConfigError

    G = run.generator
    if source == "encoded":
        ds = run.dataset(split)
        n = min(limit, len(ds))
        x = torch.stack([ds[i]["image"] for i in range(n)]).to(run.device)
        perceptual = run.perceptual if refine_steps > 0 else None
        w = project(G, run.encoder, x, refine_steps, perceptual, batch)
    elif source == "samples":
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(limit, G.z_dim, generator=gen).to(run.device)
        w = torch.cat([G.mapping(b) for b in z.split(batch)])
    else:
        raise ConfigError(f"source={source}: choose one of {', '.join(SOURCES)}")
    return to_styles(G, w)


def find_for_run(
    run: Any,
    *,
    source: str = "encoded",
    split: str = "test",
    limit: int = 64,
    k: int = 8,
    shift: float = 3.0,
    layers: str = "all",
    std_samples: int = 2000,
    batch: int = 128,
    seed: int = 0,
    screen: int | None = None,
    refine_steps: int = 0,
) -> tuple[AttributeSet, Effects]:
    """AttFind on a trained run's G and classifier (every class), and the effects it ranked;
    ``screen``: score only that many coordinates exactly, chosen by :func:`screen_coordinates`;
    ``refine_steps``: encoded images' latents refined as the counterfactual's are."""
    G, f = run.generator, run.classifier
    layout = style_layout(G)
    std = style_std(G, std_samples, seed)
    s = run_styles(run, source, split, limit, seed, batch, refine_steps)
    try:
        coords = layout.mask(layers).nonzero()[:, 0]
    except ValueError as e:
        from cfexplain.utils.cli import ConfigError

        raise ConfigError(f"layers={layers}: {e}") from e
    if screen is not None and screen < len(coords):
        coords = screen_coordinates(G, f, s, std, screen, coords, batch)
    effects = shift_effects(G, f, s, std.to(s.device), shift, coords, batch)
    found = att_find(effects, layout, k)
    info = {
        "source": source,
        "split": split if source == "encoded" else None,
        "refine_steps": refine_steps if source == "encoded" else None,
        "images": len(s),
        "k": k,
        "layers": layers,
        "coordinates_scored": len(coords),
        "screen": screen,
        "std_samples": std_samples,
        "seed": seed,
        "classes": run.classes,
        "predicted": [int((effects.base.argmax(1) == c).sum()) for c in range(len(run.classes))],
    }
    return AttributeSet(found, std, float(shift), layout, info), effects


# ----------------------------------------------------------------------------- per image


@dataclass
class AttributeStrips:
    """Each image's top attributes for a class, walked from ``-d`` to ``+d`` (``steps [F]``, in
    units of the attribute's shift; the frame at 0 is the reconstruction, at +1 the attribute's
    counterfactual)."""

    reconstruction: Tensor  # [N, C, H, W] G(s)
    recon_probs: Tensor  # [N] f's probability of the target for G(s)
    frames: Tensor  # [N, T, F, C, H, W]
    probs: Tensor  # [N, T, F]
    steps: Tensor  # [F]
    attributes: list[list[Attribute]]  # [N][T], ranked by the change of p at +1
    target: int

    def difference(self) -> Tensor:
        """``[N, 1, H, W]``: the top attribute's counterfactual (+d) minus the reconstruction."""
        last = self.frames[:, 0, -1]
        return (last - self.reconstruction).float().sum(1, keepdim=True)


@torch.no_grad()
def attribute_strips(
    G: nn.Module,
    classifier: nn.Module,
    s: Tensor,
    found: AttributeSet,
    target: int,
    top: int = 4,
    num_frames: int = 5,
    max_batch: int = 64,
) -> AttributeStrips:
    """The ``top`` attributes of class ``target`` that raise its probability most for each image
    ``s [N, S]`` (each tried at +d), each walked over ``num_frames`` steps in [-d, +d]."""
    candidates = found.of_class(target)
    if not candidates:
        raise ValueError(f"no attributes for class {target} (the set has classes "
                         f"{sorted({a.cls for a in found.attributes})})")  # fmt: skip
    n, device = len(s), s.device

    def probs_of(styles: Tensor) -> tuple[Tensor, Tensor]:
        imgs, ps = [], []
        for b in styles.split(max_batch):
            x = render(G, b)
            imgs.append(x)
            ps.append(torch.softmax(classifier(x).float(), 1)[:, target])
        return torch.cat(imgs), torch.cat(ps)

    rec, p0 = probs_of(s)
    coords = torch.tensor([a.coordinate for a in candidates], device=device)
    steps_c = torch.tensor([found.step(a) for a in candidates], device=device)
    tried = s[:, None].repeat(1, len(candidates), 1)  # [N, A, S]
    tried[:, torch.arange(len(candidates)), coords] += steps_c
    _, p_tried = probs_of(tried.flatten(0, 1))
    gain = p_tried.view(n, -1) - p0[:, None]
    t = min(top, len(candidates))
    order = gain.argsort(dim=1, descending=True)[:, :t].cpu()  # [N, T]
    steps = torch.linspace(-1.0, 1.0, num_frames)
    if num_frames % 2:
        steps[num_frames // 2] = 0.0
    chosen = coords[order.to(device)]  # [N, T]
    amount = steps_c[order.to(device)][..., None] * steps.to(device)  # [N, T, F]
    walked = s[:, None, None].repeat(1, t, num_frames, 1)  # [N, T, F, S]
    idx = chosen[..., None].expand(-1, -1, num_frames)
    walked.scatter_add_(3, idx[..., None], amount[..., None])
    frames, p = probs_of(walked.flatten(0, 2))
    return AttributeStrips(
        reconstruction=rec,
        recon_probs=p0,
        frames=frames.view(n, t, num_frames, *frames.shape[1:]),
        probs=p.view(n, t, num_frames),
        steps=steps,
        attributes=[[candidates[int(j)] for j in row] for row in order],
        target=int(target),
    )
