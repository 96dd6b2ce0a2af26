"""Registered multi-exit networks."""

from __future__ import annotations

from collections.abc import Sequence

from eexit.models.backbone import BlockKind, ResNetBackbone, StemKind
from eexit.models.heads import ExitHead, HeadKind
from eexit.models.net import MultiExitNet
from eexit.models.registry import register_model


def build_multi_exit(
    widths: Sequence[int],
    depths: Sequence[int],
    num_classes: int = 10,
    in_chans: int = 3,
    stem: StemKind = "small",
    stem_stride: int = 1,
    strides: Sequence[int] = (1, 2, 2, 2),
    block: BlockKind = "basic",
    head: HeadKind = "mlp",
    head_conv: int | Sequence[int] = 0,
    head_conv_kernel: int = 3,
    head_conv_stride: int = 1,
    head_hidden: int | None = None,
    name: str = "custom",
) -> MultiExitNet:
    """Build a backbone and its four exit heads.

    Args:
        widths: planes per stage.
        depths: blocks per stage.
        num_classes: classes of every exit.
        in_chans: input channels.
        stem: ``"small"`` or ``"standard"``.
        stem_stride: stride of the small stem.
        strides: stride of each stage.
        block: ``"basic"`` or ``"bottleneck"``.
        head: ``"linear"`` or ``"mlp"``.
        head_conv: channels of the conv before pooling in each head (one value for all or one
            per exit); 0 pools the stage map directly.
        head_conv_kernel: kernel size of that conv.
        head_conv_stride: stride of that conv.
        head_hidden: hidden width of MLP heads.
        name: registry name recorded in the spec.
    """
    spec = {
        "name": name,
        "widths": list(widths),
        "depths": list(depths),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "stem": stem,
        "stem_stride": stem_stride,
        "strides": list(strides),
        "block": block,
        "head": head,
        "head_conv": head_conv if isinstance(head_conv, int) else list(head_conv),
        "head_conv_kernel": head_conv_kernel,
        "head_conv_stride": head_conv_stride,
        "head_hidden": head_hidden,
    }
    backbone = ResNetBackbone(widths, depths, in_chans, stem, stem_stride, strides, block)
    convs = [head_conv] * 4 if isinstance(head_conv, int) else list(head_conv)
    if len(convs) != 4:
        raise ValueError(f"head_conv needs 1 or 4 values, got {len(convs)}")
    heads = [
        ExitHead(
            info["num_chs"], num_classes, head, conv, head_conv_kernel, hidden=head_hidden, conv_stride=head_conv_stride
        )
        for info, conv in zip(backbone.feature_info, convs, strict=True)
    ]
    return MultiExitNet(backbone, heads, spec)


@register_model
def resnet_narrow(**kwargs) -> MultiExitNet:
    """CPU-friendly narrow ResNet (32-64-128-256 planes, one basic block per stage)."""
    kwargs.setdefault("widths", (32, 64, 128, 256))
    kwargs.setdefault("depths", (1, 1, 1, 1))
    return build_multi_exit(name="resnet_narrow", **kwargs)


@register_model
def resnet18(**kwargs) -> MultiExitNet:
    """ResNet-18 widths and depths (64-128-256-512 planes, two basic blocks per stage)."""
    kwargs.setdefault("widths", (64, 128, 256, 512))
    kwargs.setdefault("depths", (2, 2, 2, 2))
    return build_multi_exit(name="resnet18", **kwargs)


@register_model
def resnet_micro(**kwargs) -> MultiExitNet:
    """A very small network for tests and smoke runs (8-8-16-16 planes)."""
    kwargs.setdefault("widths", (8, 8, 16, 16))
    kwargs.setdefault("depths", (1, 1, 1, 1))
    return build_multi_exit(name="resnet_micro", **kwargs)
