"""Localisation of saliency maps against ground-truth masks, batched.

A map is turned into a region by keeping its top ``fraction`` of pixels (exactly
``max(1, round(fraction * N))`` pixels per image, ties broken by position), then compared with
the mask: IoU, Dice, precision and recall. The pointing game asks whether the map's maximum
falls inside the mask; the energy retained is the share of the map's mass inside the mask.
In ``localization_metrics`` an all-zero map (Grad-CAM's ReLU removed everything) localises
nothing and scores 0 on every measure: its "top pixels" and "maximum" would be the first pixels
in raster order, which hit a mask there by chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KEEP_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)


def _check(saliency: Tensor, target: Tensor) -> None:
    if saliency.dim() != 3 or target.shape != saliency.shape:
        raise ValueError(
            f"saliency and target must both be (B, H, W); got {tuple(saliency.shape)} and {tuple(target.shape)}"
        )


def _ratio(num: Tensor, den: Tensor, empty: float = 0.0) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, empty))


def has_evidence(saliency: Tensor) -> Tensor:
    """``(B,)`` bool: whether each map ``(B, H, W)`` is anywhere above 0. An all-zero map points
    nowhere (its raster-order "top pixels" and "maximum" would be the first ones): the scores
    built on its top region count it as 0."""
    return saliency.flatten(1).amax(dim=1) > 0


def top_fraction_mask(saliency: Tensor, fraction: float) -> Tensor:
    """Keep the top ``fraction`` of each map's pixels.

    Args:
        saliency: ``(B, H, W)`` maps.
        fraction: in ``(0, 1]``.

    Returns:
        ``(B, H, W)`` bool with exactly ``max(1, round(fraction * H * W))`` pixels set per map.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    b, h, w = saliency.shape
    k = max(1, round(fraction * h * w))
    idx = torch.argsort(saliency.reshape(b, -1).float(), dim=1, descending=True, stable=True)[:, :k]
    keep = torch.zeros(b, h * w, dtype=torch.bool, device=saliency.device)
    keep.scatter_(1, idx, True)
    return keep.view(b, h, w)


def overlap_scores(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """IoU, Dice, precision and recall of binary regions ``(B, H, W)`` -> each ``(B,)``.

    Two empty regions have IoU and Dice 1; an empty prediction has precision 0; an empty
    target has recall 0.
    """
    _check(pred, target)
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float()
    ps, ts = p.sum(1).float(), t.sum(1).float()
    return {
        "iou": _ratio(inter, union, empty=1.0),
        "dice": _ratio(2 * inter, ps + ts, empty=1.0),
        "precision": _ratio(inter, ps),
        "recall": _ratio(inter, ts),
    }


def pointing_game(saliency: Tensor, target: Tensor, tolerance: int = 0) -> Tensor:
    """Whether each map's maximum (first one, in raster order) lies in the mask.

    Args:
        saliency: ``(B, H, W)``.
        target: ``(B, H, W)`` bool.
        tolerance: pixels by which the mask is dilated first (0 = exact hit).

    Returns:
        ``(B,)`` bool.
    """
    _check(saliency, target)
    t = target.float()
    if tolerance > 0:
        t = F.max_pool2d(t.unsqueeze(1), 2 * tolerance + 1, stride=1, padding=tolerance).squeeze(1)
    peak = saliency.flatten(1).argmax(dim=1, keepdim=True)
    return t.flatten(1).gather(1, peak).squeeze(1) > 0


def energy_retained(saliency: Tensor, target: Tensor) -> Tensor:
    """Share of each non-negative map's mass inside the mask ``(B,)``; 0 for an all-zero map."""
    _check(saliency, target)
    s = saliency.clamp_min(0).flatten(1).float()
    return _ratio((s * target.flatten(1).float()).sum(1), s.sum(1))


def localization_metrics(
    saliency: Tensor, target: Tensor, fractions: tuple[float, ...] = KEEP_FRACTIONS
) -> dict[str, Tensor]:
    """Every localisation score per image.

    Args:
        saliency: ``(B, H, W)`` maps (resample to the mask's size first).
        target: ``(B, H, W)`` bool masks.
        fractions: keep-fractions for the thresholded scores.

    Returns:
        ``{"iou@10": (B,), "dice@10", "precision@10", "recall@10", ..., "pointing_game",
        "energy"}`` with the percentage of pixels kept after ``@``; all 0 for an all-zero map.
    """
    _check(saliency, target)
    found = has_evidence(saliency)  # all-zero maps point nowhere: 0 on every score
    out: dict[str, Tensor] = {}
    for f in fractions:
        scores = overlap_scores(top_fraction_mask(saliency, f), target)
        out.update({f"{name}@{round(100 * f)}": v * found for name, v in scores.items()})
    out["pointing_game"] = (pointing_game(saliency, target) & found).float()
    out["energy"] = energy_retained(saliency, target)
    return out
