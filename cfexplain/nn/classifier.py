"""The classifier to explain: a small ResNet with BatchNorm, global average pooling and a linear head.

Built from torchvision's ``BasicBlock`` so that zennit's ResNet canonizer recognises the skip
connections (LRP), and ending in GAP + linear so that CAM and grad-CAM apply. With
``attention=True`` the head reads attended descriptors instead (``cfexplain.nn.attention``):
grad-CAM still applies, CAM does not (the head no longer sits on global average pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from cfexplain.nn.attention import AttentionEstimator


class ResNetClassifier(nn.Module):
    """``x [N, C, H, W] -> logits [N, num_classes]``.

    Args:
        in_channels: image channels (1 radiograph, 3 histology).
        num_classes: output logits (2 for a binary task: softmax[:, 1] is the positive probability).
        width: channels of the first stage; stage ``i`` has ``width * 2**i``.
        blocks: residual blocks per stage; every stage after the first halves the resolution.
        stem_stride: stride of the 3x3 stem (2 halves the cost at large inputs).
        dropout: dropout before the linear head.
        attention: trainable attention (Jetley et al. 2018) at the outputs of
            ``attention_stages``; the head then reads their attended descriptors, concatenated,
            instead of the pooled last feature map. Off: the model and its checkpoints are as
            without the option.
        attention_stages: stage indices (negative counts from the end) with an attention
            estimator; ``None`` is the last two stages (the only one for a one-stage model).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1, 1),
        stem_stride: int = 1,
        dropout: float = 0.0,
        attention: bool = False,
        attention_stages: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (binary tasks use 2 logits), got {num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stages.append(self._stage(c_in, c_out, n, stride=1 if i == 0 else 2))
            c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.attention = bool(attention)
        self.attention_stages: tuple[int, ...] = ()
        head_in = c_in
        if self.attention:
            self.attention_stages = _stage_indices(attention_stages, len(blocks))
            # g is the pooled last stage (C_last); every level's descriptor has that size.
            self.attend = nn.ModuleList(
                AttentionEstimator(width * 2**i, c_in) for i in self.attention_stages
            )
            head_in = c_in * len(self.attention_stages)
        self.fc = nn.Linear(head_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as identity: stable early training
        for estimator in getattr(self, "attend", ()):
            # u = 0: attention starts uniform, so the head starts on plain average pooling.
            nn.init.zeros_(estimator.u.weight)

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or c_in != c_out:
            down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        return nn.Sequential(
            BasicBlock(c_in, c_out, stride=stride, downsample=down),
            *[BasicBlock(c_out, c_out) for _ in range(n - 1)],
        )

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional stage: its output feeds GAP, so CAM and grad-CAM read it.

        With attention it still feeds every output (through ``g`` and the last level), so
        grad-CAM reads it; CAM's head-weight shortcut no longer holds there.
        """
        return self.layers[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map ``[N, C_last, h, w]``."""
        return self.layers(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == self.in_channels, (
            f"expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
        )
        if self.attention:
            return self.forward_attention(x)[0]
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))

    def forward_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x [N, C, H, W] -> (logits [N, K], maps)``: one attention map ``[N, 1, h_s, w_s]`` per
        level in ``attention_stages``, each summing to 1 per image."""
        if not self.attention:
            raise ValueError(
                "this ResNetClassifier has no attention modules (built with attention=False)"
            )
        h, outs = self.stem(x), []
        for stage in self.layers:
            h = stage(h)
            outs.append(h)
        g = torch.flatten(self.pool(outs[-1]), 1)
        maps, descriptors = [], []
        for i, estimator in zip(self.attention_stages, self.attend, strict=True):
            a, g_a = estimator(outs[i], g)
            maps.append(a)
            descriptors.append(g_a)
        return self.fc(self.dropout(torch.cat(descriptors, 1))), maps

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention maps ``[N, 1, h_s, w_s]`` of ``x [N, C, H, W]``, one per attention level."""
        return self.forward_attention(x)[1]


def _stage_indices(stages: Sequence[int] | None, n_stages: int) -> tuple[int, ...]:
    """``attention_stages`` as sorted non-negative stage indices; the error names the field."""
    if stages is None:
        return tuple(range(max(0, n_stages - 2), n_stages))
    out = set()
    for s in stages:
        if not -n_stages <= int(s) < n_stages:
            raise ValueError(
                f"attention_stages: stage {s} does not exist; the model has {n_stages} stages "
                f"(indices 0..{n_stages - 1} or -{n_stages}..-1)"
            )
        out.add(int(s) % n_stages)
    if not out:
        raise ValueError("attention_stages: empty; give at least one stage index (or null)")
    return tuple(sorted(out))


class BinaryLogitAdapter(nn.Module):
    """Turn a one-logit binary model ``[N, 1]`` into two logits ``[N, 2] = [0, z]``.

    softmax([0, z])[1] = sigmoid(z), so the positive-class probability is unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def load_external(
    target: str | None = None,
    kwargs: dict | None = None,
    weights: str | None = None,
    torchscript: str | None = None,
    field: str = "classifier",
) -> tuple[nn.Module, str]:
    """The user's own classifier: a TorchScript file, or ``target(**kwargs)`` with ``weights``.

    Returns ``(model in eval mode, a one-line description)``. Weights are a safetensors file or
    a torch state dict (loaded with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper is
    unwrapped). Errors (``ConfigError``, or ``FileNotFoundError`` for a missing file) name the
    config fields under ``field`` (``classifier.weights``, ...).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cfexplain.utils.artifacts import import_target
    from cfexplain.utils.cli import ConfigError

    if torchscript:
        path = Path(torchscript)
        if not path.is_file():
            raise FileNotFoundError(f"{field}.torchscript: no such file {path}")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise ConfigError(f"{field}.torchscript: {path} is not a TorchScript file ({e})") from e
        return model.eval(), f"TorchScript {path}"
    if not target:
        raise ConfigError(
            f"{field}=external needs {field}.target=module.Class (or {field}.torchscript=file)"
        )
    model = import_target(target)(**(kwargs or {}))
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{field}.weights: no such file {path}")
        if path.suffix == ".safetensors":
            try:
                state = load_file(str(path))
            except SafetensorError as e:
                raise ConfigError(
                    f"{field}.weights: {path} is not a readable safetensors file, truncated or "
                    f"corrupt ({e})"
                ) from e
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConfigError(
                    f"{field}.weights: cannot read {path} as a state dict ({e})"
                ) from e
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ConfigError(
                f"{field}.weights: {path} holds a {type(state).__name__}, expected a state dict"
            )
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{field}.weights: {path} does not fit {target}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
            )
    return model.eval(), f"{target}({kwargs or {}}) weights={weights}"


@torch.no_grad()
def check_classifier(model: nn.Module, x: torch.Tensor, num_classes: int, source: str) -> bool:
    """One forward pass on real inputs ``x [N, C, H, W]``; True when the model gives one binary logit.

    Raises a ValueError naming the model, the input shape and the output shape expected.
    """
    try:
        out = model(x)
    except Exception as e:
        raise ValueError(f"{source}: forward pass on images {tuple(x.shape)} failed: {e}") from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{source}: images {tuple(x.shape)} gave output {shape}, expected logits [{x.shape[0]}, {num_classes}]"
        )
    if out.shape[1] == num_classes:
        return False
    if num_classes == 2 and out.shape[1] == 1:
        return True
    raise ValueError(
        f"{source}: images {tuple(x.shape)} gave output {tuple(out.shape)}, expected logits [{x.shape[0]}, {num_classes}] "
        f"({num_classes} classes in the data)"
    )


def load_classifier(stage_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The classifier of a finished ``classifier`` stage, in eval mode, ``[N,C,H,W] -> logits [N,K]``."""
    from cfexplain.utils.artifacts import Artifact, load_model

    art = Artifact.load(stage_dir)
    if "torchscript" in art.files:
        model = torch.jit.load(str(art.path("torchscript")), map_location=device)
    else:
        model = load_model(art.path("weights"), map_location=device)
    if art.info.get("single_logit"):
        model = BinaryLogitAdapter(model)
    return model.to(device).eval()
