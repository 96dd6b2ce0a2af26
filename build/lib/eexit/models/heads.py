"""Exit heads: ``A = attention(F)`` -> global average pool ``z`` -> classifier -> logits.

This shape is what makes Grad-CAM cheap: the gradient of a logit with respect to ``A`` is the
same at every position, ``dy/dA[c, i, j] = (dy/dz[c]) / (h * w)``, so the cam weights need only
the gradient through the classifier on the pooled vector (see ``eexit.explain.gradcam``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

HeadKind = Literal["linear", "mlp"]
CamTarget = Tensor | int | Sequence[int] | Callable[[Tensor], Tensor] | None


@dataclass
class HeadOutput:
    """One exit's tensors.

    Attributes:
        attention: ``A``, the map Grad-CAM explains, ``(B, C, h, w)``.
        pooled: ``z = mean_{h,w} A``, ``(B, C)``.
        logits: ``(B, num_classes)``.
        hidden: the MLP head's hidden activation ``relu(W1 z + b1)`` ``(B, hidden)`` (``None``
            for a linear head); the closed-form logit gradient reuses it.
    """

    attention: Tensor
    pooled: Tensor
    logits: Tensor
    hidden: Tensor | None = None


class ExitHead(nn.Module):
    """A GAP-based exit head.

    Args:
        in_chs: channels of the stage map the head reads.
        num_classes: number of classes.
        kind: ``"linear"`` (one linear layer) or ``"mlp"`` (linear-ReLU-linear; no batch
            statistics, so every image's logits depend on that image alone).
        conv_chs: channels of an optional conv + BN + ReLU before pooling; 0 uses the stage map
            itself as ``A``.
        conv_kernel: kernel size of that conv.
        conv_stride: stride of that conv (2 halves the map before pooling: cheaper, coarser cam).
        hidden: hidden width of the MLP head (default: ``max(64, A's channels)``).
    """

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        kind: HeadKind = "linear",
        conv_chs: int = 0,
        conv_kernel: int = 1,
        hidden: int | None = None,
        conv_stride: int = 1,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown head kind {kind!r}; expected 'linear' or 'mlp'")
        self.kind = kind
        self.num_classes = num_classes
        if conv_chs > 0:
            self.attention: nn.Module = nn.Sequential(
                nn.Conv2d(in_chs, conv_chs, conv_kernel, stride=conv_stride, padding=conv_kernel // 2, bias=False),
                nn.BatchNorm2d(conv_chs),
                nn.ReLU(inplace=True),
            )
            a_chs = conv_chs
        else:
            self.attention = nn.Identity()
            a_chs = in_chs
        self.num_chs = a_chs
        if kind == "linear":
            self.classifier: nn.Module = nn.Linear(a_chs, num_classes)
        else:
            hidden = hidden or max(64, a_chs)
            self.classifier = nn.Sequential(
                nn.Linear(a_chs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )

    def forward_parts(self, features: Tensor) -> HeadOutput:
        """``(B, C_in, h, w)`` stage map -> attention, pooled vector and logits."""
        a = self.attention(features)
        z = a.mean(dim=(2, 3))
        if self.kind == "linear":
            return HeadOutput(a, z, self.classifier(z))
        first, relu, last = self.classifier
        hidden = relu(first(z))
        return HeadOutput(a, z, last(hidden), hidden)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, C_in, h, w)`` stage map -> ``(B, num_classes)`` logits."""
        return self.forward_parts(features).logits

    def logit_gradient(self, out: HeadOutput, target: CamTarget, create_graph: bool = False) -> Tensor:
        """Gradient of the target score with respect to the pooled vector, ``(B, C)``.

        Args:
            out: this head's output for the batch.
            target: class indices ``(B,)`` (a tensor, a list or NumPy array of integers, or one
                integer for every image); ``None`` for the predicted class; or a callable mapping
                logits ``(B, K)`` to one score per image ``(B,)``.
            create_graph: keep the result differentiable (for a training loss).

        Raises:
            TypeError: class indices that are not integers.
            ValueError: class indices of another batch size, or (on the CPU) outside ``[0, K)``.
        """
        if isinstance(target, Tensor) or not callable(target):
            classes = out.logits.argmax(dim=1) if target is None else class_indices(target, out.logits)
            grad = self._class_gradient(out.pooled, classes, out.hidden)
            return grad if create_graph else grad.detach()
        # a callable target: let autograd differentiate it through the classifier on the pooled
        # vector (under inference mode too: its tensors are copied out of it, which costs a (B, C)
        # copy, and autograd runs outside it)
        with torch.inference_mode(False), torch.enable_grad():
            if create_graph and out.pooled.requires_grad:
                z, logits = out.pooled, out.logits
            else:
                pooled = out.pooled.detach()
                z = (pooled.clone() if pooled.is_inference() else pooled).requires_grad_(True)
                logits = self.classifier(z)
            (grad,) = torch.autograd.grad(target(logits).sum(), z, create_graph=create_graph)
        return grad

    def _class_gradient(self, z: Tensor, target: Tensor, hidden: Tensor | None = None) -> Tensor:
        """Closed-form ``dy_c/dz`` ``(B, C)`` for class indices ``(B,)``.

        Linear head: ``W[c]``. MLP head ``W2 relu(W1 z + b1) + b2``: ``(W2[c] * 1[h > 0]) @ W1``,
        with ``h`` the forward pass's ``hidden`` when given (``relu`` keeps its sign pattern),
        else recomputed from ``z``. Plain tensor algebra, so it works under
        ``torch.inference_mode`` and stays differentiable.
        """
        if self.kind == "linear":
            return self.classifier.weight[target]
        first, _, last = self.classifier
        if hidden is None:
            hidden = first(z)
        # 1[h > 0] as sign(relu(h)): one float op, faster than a comparison to bool and a cast
        active = hidden.detach().clamp_min(0.0).sign_()
        return (last.weight[target] * active) @ first.weight


def class_indices(target: Tensor | int | Sequence[int], logits: Tensor) -> Tensor:
    """Class indices ``(B,)`` int64 on the logits' device from a tensor, a sequence or NumPy array
    of integers, or one integer for every image; refused with a message otherwise (a float
    would be truncated, -1 would silently mean the last class)."""
    b, k = logits.shape
    refused = TypeError(f"targets must be class indices (integers) or a callable, got {type(target).__name__}")
    if isinstance(target, bool | str | bytes) or not (
        isinstance(target, numbers.Integral | Tensor) or hasattr(target, "__len__")
    ):
        raise refused
    try:
        # Python numbers and arrays are checked on the host, before they move to the logits' device
        t = target if isinstance(target, Tensor) else torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise refused from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"targets must be integer class indices, got {t.dtype}")
    if logits.device.type == "cpu":
        t = t.cpu()
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"expected {b} class indices (one per image), got shape {tuple(t.shape)}")
    # the range check reads the values back: skipped for a tensor already on a GPU, where it
    # would stall every call (a training step's labels; cross-entropy refuses bad ones there)
    if b and t.device.type == "cpu" and not bool(((t >= 0) & (t < k)).all()):
        raise ValueError(f"class indices must be in [0, {k}), got values from {int(t.min())} to {int(t.max())}")
    return t.to(device=logits.device, dtype=torch.long)
