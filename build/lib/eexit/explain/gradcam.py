"""Hook-free, batched, differentiable Grad-CAM for GAP-based exit heads.

For a head ``A -> z = mean_{h,w} A -> classifier -> y``, the gradient of the target logit
``y_c`` with respect to ``A`` is ``dy_c/dz / (h * w)`` at every position, so Grad-CAM's channel
weights are ``alpha = dy_c/dz / (h * w)`` and ``cam = relu(sum_c alpha_c * A_c)``: no backward
pass through the backbone and no hooks. With ``create_graph=True`` the cam is differentiable
(for the attention-consistency loss). Captum's ``LayerGradCam(relu_attributions=True)`` on the
head's ``attention`` module computes the same map; the tests use it as the oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from eexit.models.heads import CamTarget, ExitHead, HeadOutput


def gradcam(head: ExitHead, out: HeadOutput, target: CamTarget = None, create_graph: bool = False) -> Tensor:
    """Grad-CAM of one exit from tensors its forward pass already computed.

    Args:
        head: the exit head that produced ``out``.
        out: the head's attention ``(B, C, h, w)``, pooled vector and logits.
        target: class indices ``(B,)``, ``None`` for the predicted class, or a callable mapping
            logits ``(B, K)`` to a score per image ``(B,)`` (pytorch-grad-cam's targets).
        create_graph: keep the map differentiable with respect to the network's parameters.

    Returns:
        The non-negative map ``(B, h, w)`` at the resolution of ``A``.
    """
    a = out.attention if create_graph else out.attention.detach()
    return cam_from_gradient(a, head.logit_gradient(out, target, create_graph=create_graph))


def cam_from_gradient(attention: Tensor, logit_grad: Tensor) -> Tensor:
    """Grad-CAM from the attention ``(B, C, h, w)`` and ``dy_c/dz`` ``(B, C)`` -> ``(B, h, w)``.

    ``alpha = dy_c/dz / (h * w)`` (the gradient with respect to ``A`` at any position).
    """
    h, w = attention.shape[-2:]
    return torch.relu(torch.einsum("bc,bchw->bhw", logit_grad / (h * w), attention))


def normalize_per_image(cam: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each map of ``(B, h, w)`` to ``[0, 1]`` by its maximum (all-zero maps stay zero).

    ``eps`` is raised to the smallest normal number of ``cam``'s dtype (in float16 ``1e-12`` is
    0, and an all-zero map would become 0 / 0)."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(max(eps, torch.finfo(cam.dtype).tiny))
    return cam / peak.view(-1, 1, 1)
