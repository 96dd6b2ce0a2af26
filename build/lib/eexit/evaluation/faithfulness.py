"""Deletion and insertion curves of saliency maps (Petsiuk et al., RISE), batched.

Deletion replaces pixels with a baseline, most relevant first, and follows the model's score of
the explained class: a faithful map makes it fall fast (low area under the curve). Insertion
starts from the baseline image and puts the pixels back, most relevant first: a faithful map
makes the score rise fast (high area). Several steps go through the model in one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(images (n, C, H, W), classes (n,)) -> (n,)`` score of each image's class (e.g. softmax)."""


@dataclass
class FaithfulnessResult:
    """Deletion and insertion results of a batch.

    Attributes:
        deletion_auc: ``(B,)`` area under the deletion curve (lower = more faithful).
        insertion_auc: ``(B,)`` area under the insertion curve (higher = more faithful).
        deletion_curve: ``(B, steps + 1)`` score after removing ``i / steps`` of the pixels.
        insertion_curve: ``(B, steps + 1)`` score after inserting ``i / steps`` of the pixels.
    """

    deletion_auc: Tensor
    insertion_auc: Tensor
    deletion_curve: Tensor
    insertion_curve: Tensor


def pixel_ranks(saliency: Tensor, size: tuple[int, int]) -> Tensor:
    """Rank of every pixel, 0 = most relevant, after resampling the maps to ``size``.

    Args:
        saliency: ``(B, h, w)`` maps.
        size: ``(H, W)`` of the images.

    Returns:
        ``(B, H * W)`` long ranks (ties broken by position).
    """
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be (B, h, w); got {tuple(saliency.shape)}")
    if tuple(saliency.shape[-2:]) != tuple(size):
        saliency = F.interpolate(saliency.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    order = torch.argsort(saliency.flatten(1).float(), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def blurred(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """A heavily blurred copy ``(B, C, H, W)`` (a common insertion start)."""
    from torchvision.transforms.functional import gaussian_blur

    k = min(kernel_size, 2 * (min(images.shape[-2:]) // 2) - 1)
    return gaussian_blur(images, [k, k], [sigma, sigma]) if k >= 3 else images.clone()


@torch.no_grad()
def deletion_insertion(
    score_fn: ScoreFn,
    images: Tensor,
    saliency: Tensor,
    classes: Tensor,
    steps: int = 20,
    baseline: Tensor | float = 0.0,
    max_batch: int = 1024,
) -> FaithfulnessResult:
    """Deletion and insertion curves and their areas for a batch of maps.

    Args:
        score_fn: the model's score of a class, see ``ScoreFn``.
        images: ``(B, C, H, W)`` model inputs.
        saliency: ``(B, h, w)`` maps (resampled bilinearly to ``(H, W)``).
        classes: ``(B,)`` the class each map explains.
        steps: curve points after the start (``i / steps`` of the pixels for ``i = 0..steps``).
        baseline: the value of a removed pixel, a scalar or ``(B, C, H, W)`` (0 is the data
            mean for normalised inputs; ``blurred(images)`` is another common choice). The
            insertion curve starts from it.
        max_batch: most images per forward pass (curve points are stacked up to this; larger
            batches go through in groups).

    Returns:
        ``FaithfulnessResult``; areas by the trapezoid rule over ``[0, 1]``.
    """
    if images.dim() != 4 or saliency.shape[0] != images.shape[0] or classes.shape != images.shape[:1]:
        raise ValueError(
            f"expected images (B, C, H, W), saliency (B, h, w) and classes (B,); got "
            f"{tuple(images.shape)}, {tuple(saliency.shape)}, {tuple(classes.shape)}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    b, _, h, w = images.shape
    base = torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)
    if b == 0:
        empty = images.new_zeros((0, steps + 1), dtype=torch.float32)
        return FaithfulnessResult(empty[:, 0], empty[:, 0], empty, empty.clone())
    ranks = pixel_ranks(saliency, (h, w)).view(b, 1, h, w)
    counts = [round(i * h * w / steps) for i in range(steps + 1)]
    parts = []
    for lo in range(0, b, max_batch):  # more images than max_batch: one group at a time
        hi = min(lo + max_batch, b)
        parts.append(_curves(score_fn, images[lo:hi], ranks[lo:hi], base[lo:hi], classes[lo:hi], counts, max_batch))
    deletion = torch.cat([d for d, _ in parts]).float()
    insertion = torch.cat([i for _, i in parts]).float()
    dx = 1.0 / steps
    return FaithfulnessResult(
        torch.trapezoid(deletion, dx=dx, dim=1), torch.trapezoid(insertion, dx=dx, dim=1), deletion, insertion
    )


def _curves(
    score_fn: ScoreFn, images: Tensor, ranks: Tensor, base: Tensor, classes: Tensor, counts: list[int], max_batch: int
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion curves ``(b, len(counts))`` of at most ``max_batch`` images, with as
    many curve points per forward pass as fit in ``max_batch``."""
    b = images.shape[0]
    per_pass = max(1, max_batch // b)
    curves: dict[str, list[Tensor]] = {"deletion": [], "insertion": []}
    for start in range(0, len(counts), per_pass):
        chunk = counts[start : start + per_pass]
        removed = torch.cat([ranks < k for k in chunk])  # (len * b, 1, H, W)
        x = images.repeat(len(chunk), 1, 1, 1)
        bx = base.repeat(len(chunk), 1, 1, 1)
        cls = classes.repeat(len(chunk))
        curves["deletion"].append(score_fn(torch.where(removed, bx, x), cls).view(len(chunk), b))
        curves["insertion"].append(score_fn(torch.where(removed, x, bx), cls).view(len(chunk), b))
    return torch.cat(curves["deletion"]).T, torch.cat(curves["insertion"]).T


def softmax_score(model: Callable[[Tensor], Tensor]) -> ScoreFn:
    """A ``ScoreFn`` from a logits model: the softmax probability of the given class."""

    def score(x: Tensor, classes: Tensor) -> Tensor:
        return torch.softmax(model(x), dim=1).gather(1, classes.view(-1, 1)).squeeze(1)

    return score


def exit_faithfulness(
    net, images: Tensor, steps: int = 20, baseline: str = "mean", seed: int = 0, max_batch: int = 1024
) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """Deletion and insertion AUC of every exit's Grad-CAM (for its own prediction), and of a
    random map of the same size for reference.

    Args:
        net: a ``MultiExitNet`` in eval mode.
        images: ``(B, C, H, W)`` normalised images.
        steps: curve points.
        baseline: ``"mean"`` (removed pixels become 0, the data mean) or ``"blur"``.
        seed: seed of the random maps.
        max_batch: images per forward pass.

    Returns:
        ``{"deletion_auc/{exit}", "insertion_auc/{exit}", "deletion_auc_random/{exit}",
        "insertion_auc_random/{exit}": mean}`` and the mean curves
        ``{"deletion"|"insertion": {exit: [steps + 1 values]}}``.
    """
    from eexit.types import ExitLevel

    if baseline not in ("mean", "blur"):
        raise ValueError(f"baseline must be 'mean' or 'blur', got {baseline!r}")
    base: Tensor | float = blurred(images) if baseline == "blur" else 0.0
    with torch.no_grad():
        out = net(images, with_cams=True)
    g = torch.Generator().manual_seed(seed)
    metrics: dict[str, float] = {}
    curves: dict[str, dict[str, list[float]]] = {"deletion": {}, "insertion": {}}
    for level in ExitLevel:
        classes = out.logits[level].argmax(dim=1)
        score = softmax_score(lambda z, level=level: net.predict_exit(z, level))
        cam = out.cams[level]
        res = deletion_insertion(score, images, cam, classes, steps, base, max_batch)
        rnd = deletion_insertion(
            score, images, torch.rand(cam.shape, generator=g).to(cam.device), classes, steps, base, max_batch
        )
        k = level.key
        metrics[f"deletion_auc/{k}"] = float(res.deletion_auc.mean())
        metrics[f"insertion_auc/{k}"] = float(res.insertion_auc.mean())
        metrics[f"deletion_auc_random/{k}"] = float(rnd.deletion_auc.mean())
        metrics[f"insertion_auc_random/{k}"] = float(rnd.insertion_auc.mean())
        curves["deletion"][k] = res.deletion_curve.mean(0).tolist()
        curves["insertion"][k] = res.insertion_curve.mean(0).tolist()
    return metrics, curves
