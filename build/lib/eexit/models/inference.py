"""An inference copy of a trained network: BatchNorm folded into its convolutions, channels-last.

On the CPU, the early stages of a narrow network (few channels, large maps) cost far more time
than their FLOPs: memory traffic, layout reorders inside oneDNN and the separate BatchNorm pass
dominate. Folding each BatchNorm into the convolution before it (``fuse_conv_bn_eval``) and
storing weights and activations channels-last removes most of that, so that the time of each
exit follows its FLOPs. Measured on the 2-core CPU machine (default narrow model, Fashion-MNIST
test images, batches of 256, best of 4 interleaved rounds), time of each exit over HEAVY's:
0.27 / 0.36 / 0.49 as trained, 0.20 / 0.28 / 0.40 for this copy, against FLOPs ratios of
0.20 / 0.26 / 0.41.

On a float32 CPU input the copy also runs each ``conv -> ReLU`` (stems, head attention convs)
and each ResNet basic block's ``conv -> + identity -> ReLU`` as one oneDNN call with the
pointwise operations fused into the convolution (``torch.ops.mkldnn._convolution_pointwise``,
the kernels ``torch.compile`` emits for the same pattern): the ReLU and residual passes over
large early maps are the part of the narrow stages' time that FLOPs do not see (the TINY path
ran 7-20% faster with them fused, HEAVY 1-8%, same values). ``FlopCounterMode`` counts these
calls as the convolutions they are. Elsewhere (other devices, dtypes, autograd, ONNX export)
the same modules run the plain ops.

The copy computes the same function up to float rounding (logits within about 1e-5); the
attention maps Grad-CAM explains are unchanged in meaning (a head's ``conv -> BN -> ReLU``
becomes ``fused conv -> ReLU``), so cams and routing features follow.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils import flop_counter
from torchvision.models.resnet import BasicBlock

from eexit.models.net import MultiExitNet


def without_autocast(device: torch.device | None) -> contextlib.AbstractContextManager:
    """A context that turns off an enclosing ``torch.autocast`` on ``device`` (nothing to do
    otherwise): the routed path and the router's explanations run in the network's own dtype, as
    the routers' knobs were fitted (under a server's bfloat16 autocast, the routed engine failed
    with an index_put dtype mismatch)."""
    kind = device.type if device is not None else None
    if kind in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place.

    Handles the two patterns of this package: ``nn.Sequential(conv, bn, ...)`` (stems,
    downsample branches, head attention) and torchvision's ResNet blocks (``conv1``/``bn1``,
    ``conv2``/``bn2``, ``conv3``/``bn3``). Each folded BatchNorm is replaced by ``nn.Identity``.

    Returns:
        How many BatchNorms were folded.
    """
    folded = 0
    for child in module.children():
        folded += fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
                folded += 1
    for n in (1, 2, 3):
        conv, bn = getattr(module, f"conv{n}", None), getattr(module, f"bn{n}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, f"conv{n}", fuse_conv_bn_eval(conv, bn))
            setattr(module, f"bn{n}", nn.Identity())
            folded += 1
    return folded


_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)


def _fusable(x: Tensor) -> bool:
    """Whether the oneDNN fused kernels apply to ``x`` (float32 CPU, no autograd, not exporting or
    compiling)."""
    return (
        _POINTWISE is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
        and torch.backends.mkldnn.is_available()
        and not torch.onnx.is_in_onnx_export()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        # torch.compile: Inductor's recompile for a new batch size did not expect the strides of
        # the fused ops' outputs (an AssertionError on the second size); compiled, the plain ops
        and not torch.compiler.is_compiling()
    )


def _conv_args(conv: nn.Conv2d) -> tuple:
    return conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


class ConvReLU(nn.Module):
    """``relu(conv(x))``, one fused oneDNN call where ``_fusable``.

    Args:
        conv: a zero-padded ``Conv2d`` (BatchNorm already folded into it).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        if _fusable(x):
            return _POINTWISE(x, *_conv_args(self.conv), "relu", [], "")
        return torch.relu(self.conv(x))


class FusedBasicBlock(nn.Module):
    """A folded torchvision ``BasicBlock``: ``relu(conv2(relu(conv1(x))) + identity(x))`` with
    ``conv1 -> ReLU`` and ``conv2 -> + identity -> ReLU`` each one fused oneDNN call where
    ``_fusable``.

    Args:
        block: a ``BasicBlock`` whose BatchNorms are folded (``fold_batchnorm``).
    """

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1, self.conv2, self.downsample = block.conv1, block.conv2, block.downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H', W')``."""
        identity = x if self.downsample is None else self.downsample(x)
        if _fusable(x):
            h = _POINTWISE(x, *_conv_args(self.conv1), "relu", [], "")
            return _POINTWISE.binary(h, identity, *_conv_args(self.conv2), "add", 1.0, "relu", [], None)
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + identity)


def _fusable_conv(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _is_folded_basic_block(block: nn.Module) -> bool:
    return (
        isinstance(block, BasicBlock)
        and isinstance(block.bn1, nn.Identity)
        and isinstance(block.bn2, nn.Identity)
        and _fusable_conv(block.conv1)
        and _fusable_conv(block.conv2)
    )


def fuse_pointwise(module: nn.Module) -> int:
    """Replace, in place, each ``Conv2d -> ReLU`` of an ``nn.Sequential`` (``Identity`` modules
    left by ``fold_batchnorm`` in between are skipped) by ``ConvReLU``, and each folded
    ``BasicBlock`` by ``FusedBasicBlock``. Call after ``fold_batchnorm``.

    Returns:
        How many convolutions now carry a fused pointwise operation.
    """
    fused = 0
    for name, child in module.named_children():
        if _is_folded_basic_block(child):
            setattr(module, name, FusedBasicBlock(child))
            fused += 2
            if child.downsample is not None:
                fused += fuse_pointwise(child.downsample)
            continue
        fused += fuse_pointwise(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        for i, conv in enumerate(layers):
            if not _fusable_conv(conv):
                continue
            j = i + 1
            while j < len(layers) and isinstance(layers[j], nn.Identity):
                j += 1
            if j < len(layers) and isinstance(layers[j], nn.ReLU):
                module[i], module[j] = ConvReLU(conv), nn.Identity()
                fused += 1
    return fused


def fused_conv_geometry(second, third, *args) -> tuple:
    """``(weight shape, padding, stride, dilation)`` of a ``mkldnn._convolution_pointwise`` call,
    from its arguments after the input as ``FlopCounterMode`` formulas receive them (shapes in
    place of tensors): ``(W, B, padding, stride, dilation, ...)``, or for the ``.binary``
    overload ``(other, W, B, padding, stride, dilation, ...)``, W being the 4-d shape."""
    if third is not None and len(third) == 4:
        return third, *args[1:4]
    return second, *args[:3]


def _register_flop_formulas() -> None:
    """Let ``FlopCounterMode`` count the fused calls as the convolutions they are."""
    if _POINTWISE is None:
        return

    def formula(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
        w_shape = fused_conv_geometry(second, third, *args)[0]
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    packet = torch.ops.mkldnn._convolution_pointwise
    if packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(packet)(formula)


_register_flop_formulas()


def inference_copy(net: MultiExitNet, channels_last: bool = True) -> MultiExitNet:
    """A copy of ``net`` for inference only (eval mode, no gradients): BatchNorm folded,
    pointwise operations fused into the convolutions (``fuse_pointwise``) and weights
    channels-last (feed it channels-last inputs, ``x.contiguous(memory_format=
    torch.channels_last)``, for the full gain). ``net`` itself is left as it is.

    Args:
        net: a trained network.
        channels_last: also convert the weights to ``torch.channels_last``.
    """
    fast = copy.deepcopy(net).eval()
    fold_batchnorm(fast)
    fuse_pointwise(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast


__all__ = ["ConvReLU", "FusedBasicBlock", "fold_batchnorm", "fuse_pointwise", "fused_conv_geometry", "inference_copy"]
