"""Four-stage ResNet backbone built from torchvision's ResNet blocks.

The backbone returns its stage feature maps (timm's ``forward_features`` / ``feature_info``
idea), so exit heads and the hook-free Grad-CAM can use them without forward hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

StemKind = Literal["small", "standard"]
BlockKind = Literal["basic", "bottleneck"]

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _make_stem(kind: StemKind, in_chans: int, out_chs: int, stride: int) -> tuple[nn.Module, int]:
    """Return the stem and its total stride."""
    if kind == "small":
        stem = nn.Sequential(
            nn.Conv2d(in_chans, out_chs, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )
        return stem, stride
    if kind == "standard":
        stem = nn.Sequential(
            nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        return stem, 4
    raise ValueError(f"unknown stem {kind!r}; expected 'small' or 'standard'")


def _make_stage(block: type[nn.Module], in_chs: int, planes: int, depth: int, stride: int) -> tuple[nn.Sequential, int]:
    """Stack ``depth`` blocks as torchvision's ResNet does; return the stage and its output width."""
    out_chs = planes * block.expansion
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_chs),
        )
    layers = [block(in_chs, planes, stride, downsample)]
    layers += [block(out_chs, planes) for _ in range(depth - 1)]
    return nn.Sequential(*layers), out_chs


class ResNetBackbone(nn.Module):
    """Stem plus four ResNet stages; each stage's output feeds one exit.

    Args:
        widths: planes of the four stages, e.g. ``(64, 128, 256, 512)`` for resnet18.
        depths: blocks per stage, e.g. ``(2, 2, 2, 2)``.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        stem: ``"small"`` (3x3 conv, for 28-32 px images) or ``"standard"`` (7x7/2 conv + max-pool).
        stem_stride: stride of the small stem's conv (ignored by the standard stem).
        strides: stride of each stage's first block.
        block: ``"basic"`` or ``"bottleneck"``.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 2, 2),
        in_chans: int = 3,
        stem: StemKind = "small",
        stem_stride: int = 1,
        strides: Sequence[int] = (1, 2, 2, 2),
        block: BlockKind = "basic",
    ) -> None:
        super().__init__()
        if not (len(widths) == len(depths) == len(strides) == 4):
            raise ValueError("widths, depths and strides must each have 4 entries (one per stage)")
        block_cls = _BLOCKS[block]
        self.stem, reduction = _make_stem(stem, in_chans, widths[0], stem_stride)
        self.stages = nn.ModuleList()
        self.feature_info: list[dict] = []
        in_chs = widths[0]
        for i, (planes, depth, stride) in enumerate(zip(widths, depths, strides, strict=True)):
            stage, in_chs = _make_stage(block_cls, in_chs, planes, depth, stride)
            reduction *= stride
            self.stages.append(stage)
            self.feature_info.append({"num_chs": in_chs, "reduction": reduction, "module": f"stages.{i}"})
        self.min_input_size = reduction
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_stem(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` image -> stem output."""
        return self.stem(x)

    def forward_stage(self, index: int, x: Tensor) -> Tensor:
        """Run stage ``index`` (0-based) on the previous stage's output (the stem's for 0)."""
        return self.stages[index](x)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """``(B, C, H, W)`` image -> the four stage maps, each ``(B, C_k, H / r_k, W / r_k)``."""
        feats = []
        h = self.forward_stem(x)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)
