"""Attention consistency of each early exit against HEAVY: KL, cosine and top-region IoU.

All exits explain the same class per image (HEAVY's prediction unless given), their cams are
resampled to the largest cam's size, and compared with HEAVY's:

* ``kl``: ``KL(P_HEAVY || P_k)`` of the cams turned into distributions as the training loss does
  by default (``eexit.losses.cam_to_distribution`` with ``eps`` 1e-3 and no temperature; lower =
  more consistent). The metric keeps these settings whatever ``model.loss.eps`` or
  ``temperature`` a model was trained with, so that the KLs of different models compare;
* ``cosine``: cosine similarity of the raw maps (1 = same shape);
* ``iou_top20``: IoU of the two maps' top-20% regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eexit.evaluation.localization import has_evidence, overlap_scores, top_fraction_mask
from eexit.explain.gradcam import gradcam
from eexit.losses import attention_kl, cam_to_distribution
from eexit.models.net import MultiExitNet
from eexit.types import ExitLevel


@torch.no_grad()
def exit_cams(net: MultiExitNet, x: Tensor, classes: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Every exit's logits and its Grad-CAM for one class per image, from one forward pass.

    Args:
        net: the network (eval mode).
        x: images ``(B, C, H, W)``.
        classes: class per image ``(B,)``; ``None`` explains HEAVY's prediction at every exit.

    Returns:
        logits ``[(B, K)] * 4`` and cams ``[(B, h_k, w_k)] * 4``.
    """
    outs = net.forward_heads(x)
    if classes is None:
        classes = outs[ExitLevel.HEAVY].logits.argmax(dim=1)
    cams = [gradcam(head, o, classes) for head, o in zip(net.heads, outs, strict=True)]
    return [o.logits for o in outs], cams


def _resample(cam: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def consistency_scores(
    cams: list[Tensor], top_fraction: float = 0.2, eps: float = 1e-3
) -> dict[str, dict[str, Tensor]]:
    """Per-image consistency of every early exit's cam with HEAVY's.

    Args:
        cams: four maps ``(B, h_k, w_k)``, cheapest first, explaining the same classes.
        top_fraction: share of pixels in the compared top regions.
        eps: see ``cam_to_distribution``.

    Returns:
        ``{exit: {"kl": (B,), "cosine": (B,), "iou_top20": (B,)}}`` for TINY, LIGHT, MEDIUM
        (the IoU key names the percentage actually used). An all-zero cam (no evidence for the
        class) has no top region: its IoU is 0, as is every IoU against an all-zero HEAVY cam
        (their raster-order "top pixels" would otherwise overlap any cam on the first rows).
    """
    if len(cams) != len(ExitLevel):
        raise ValueError(f"expected {len(ExitLevel)} cams, got {len(cams)}")
    size = max((tuple(c.shape[-2:]) for c in cams), key=lambda s: s[0] * s[1])
    heavy = _resample(cams[ExitLevel.HEAVY].float(), size)
    teacher = cam_to_distribution(heavy, None, eps)
    heavy_top = top_fraction_mask(heavy, top_fraction)
    heavy_found = has_evidence(heavy)
    iou_key = f"iou_top{round(100 * top_fraction)}"
    out = {}
    for level in list(ExitLevel)[:-1]:
        cam = _resample(cams[level].float(), size)
        out[level.key] = {
            "kl": attention_kl(teacher, cam_to_distribution(cam, None, eps)),
            "cosine": F.cosine_similarity(cam.flatten(1), heavy.flatten(1), dim=1, eps=1e-12),
            iou_key: overlap_scores(top_fraction_mask(cam, top_fraction), heavy_top)["iou"]
            * (heavy_found & has_evidence(cam)),
        }
    return out


@torch.no_grad()
def consistency_metrics(net: MultiExitNet, batches, top_fraction: float = 0.2, eps: float = 1e-3) -> dict[str, float]:
    """Mean consistency scores of every early exit over ``(x, y)`` batches, plus each exit's
    accuracy.

    Returns:
        ``{"kl/tiny": ..., "cosine/tiny": ..., "iou_top20/tiny": ..., "acc/heavy": ...}``.
    """
    sums: dict[str, float] = {}
    n = 0
    for x, y in batches:
        logits, cams = exit_cams(net, x)
        for exit_key, scores in consistency_scores(cams, top_fraction, eps).items():
            for name, v in scores.items():
                sums[f"{name}/{exit_key}"] = sums.get(f"{name}/{exit_key}", 0.0) + float(v.sum())
        for level in ExitLevel:
            key = f"acc/{level.key}"
            sums[key] = sums.get(key, 0.0) + float((logits[level].argmax(1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("no images to measure attention consistency on")
    return {k: v / n for k, v in sums.items()}
