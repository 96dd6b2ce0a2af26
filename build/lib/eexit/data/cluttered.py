"""Cluttered scenes: real objects pasted on larger canvases, with controlled distractors,
background texture and target contrast, deterministic from a seed, with the target's pixel mask.

The layout is synthetic (objects are pasted, not photographed in context); what it gives is
ground truth for localisation metrics and graded complexity levels to route by.

Each scene holds one *target* object (its label is the scene's label) pasted last, so it is
never occluded, on a background of the level's texture, with the level's number of
*distractors* (objects of other classes, scaled 0.6-1.0x) placed away from the target where
the canvas allows. The target's intensity is multiplied by the level's ``contrast``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ClutterLevel:
    """One complexity level.

    Attributes:
        distractors: number of distractor objects.
        texture: amplitude of the background texture in ``[0, 1]`` intensity units.
        contrast: factor on the target's intensity (1 = as in the source image).
    """

    distractors: int
    texture: float
    contrast: float

    def __post_init__(self) -> None:
        # scenes promise intensities in [0, 1] and a visible target
        if isinstance(self.distractors, bool) or not isinstance(self.distractors, int) or self.distractors < 0:
            raise ValueError(f"distractors must be an integer >= 0, got {self.distractors!r}")
        if not 0.0 <= self.texture <= 1.0:
            raise ValueError(f"texture must be in [0, 1] (intensity units), got {self.texture!r}")
        if not 0.0 < self.contrast <= 1.0:
            raise ValueError(
                f"contrast must be in (0, 1] (0 hides the target, above 1 leaves [0, 1]), got {self.contrast!r}"
            )


LEVELS: tuple[ClutterLevel, ...] = (
    ClutterLevel(0, 0.0, 1.0),
    ClutterLevel(1, 0.15, 0.9),
    ClutterLevel(2, 0.3, 0.75),
    ClutterLevel(4, 0.45, 0.6),
)
"""Default levels, from a clean canvas to four distractors on strong texture at low contrast."""


@dataclass
class ClutteredScenes:
    """A generated set of scenes.

    Attributes:
        images: ``(n, C, S, S)`` in ``[0, 1]`` intensity units (normalise before the network).
        masks: ``(n, S, S)`` bool, the target's visible pixels.
        labels: ``(n,)`` the target's class.
        levels: ``(n,)`` index into the levels used.
        boxes: ``(n, 4)`` the target's ``(top, left, height, width)``.
        source_index: ``(n,)`` index of the target in the source objects.
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    levels: Tensor
    boxes: Tensor
    source_index: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _texture(channels: int, size: int, amplitude: float, g: torch.Generator) -> Tensor:
    """``(C, S, S)`` background in ``[0, amplitude]``: a random grating plus smooth noise."""
    if amplitude <= 0:
        return torch.zeros(channels, size, size)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    angle, period, phase = (torch.rand(3, generator=g) * torch.tensor([math.pi, 6.0, 2 * math.pi])).tolist()
    grating = 0.5 + 0.5 * torch.sin(
        (xs * math.cos(angle) + ys * math.sin(angle)) * 2 * math.pi / (3.0 + period) + phase
    )
    coarse = torch.rand(1, 1, max(2, size // 6), max(2, size // 6), generator=g)
    noise = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    tex = (0.5 * grating + 0.5 * noise).clamp(0, 1)
    return amplitude * tex.expand(channels, size, size).clone()


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Overlap area of two ``(top, left, h, w)`` boxes."""
    dy = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    dx = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(dy, 0) * max(dx, 0)


def _paste(canvas: Tensor, obj: Tensor, alpha: Tensor, top: int, left: int) -> None:
    """Alpha-composite ``obj (C, h, w)`` with ``alpha (h, w)`` onto ``canvas`` in place."""
    h, w = obj.shape[-2:]
    region = canvas[:, top : top + h, left : left + w]
    region.mul_(1 - alpha).add_(obj * alpha)


def make_cluttered(
    objects: Tensor,
    labels: Tensor,
    n: int,
    canvas_size: int,
    levels: tuple[ClutterLevel, ...] = LEVELS,
    seed: int = 0,
    alpha_threshold: float = 0.1,
    silhouette: bool | None = None,
) -> ClutteredScenes:
    """Generate ``n`` cluttered scenes from source objects; the same seed gives the same scenes.

    Args:
        objects: ``(M, C, h, w)`` source images in ``[0, 1]`` (e.g. un-normalised test images).
        labels: ``(M,)`` their classes.
        n: scenes to make; levels cycle so that each level gets ``n / len(levels)`` scenes.
        canvas_size: side ``S`` of the square canvas (``>= h`` and ``>= w``).
        levels: complexity levels.
        seed: seed of every random choice.
        alpha_threshold: in silhouette mode, pixels brighter than this (max over channels)
            belong to the object.
        silhouette: paste only the object's bright pixels (objects on a dark background, as
            Fashion-MNIST) or ``False`` for the whole box (photographs, as CIFAR-10);
            ``None`` decides from the sources' border: dark borders mean silhouettes.

    Raises:
        ValueError: bad shapes, an empty source, a canvas smaller than the objects, or a level
            with distractors when every source object has the same class.
    """
    if objects.dim() != 4 or labels.shape != objects.shape[:1]:
        raise ValueError(
            f"objects must be (M, C, h, w) with labels (M,); got {tuple(objects.shape)} and {tuple(labels.shape)}"
        )
    m, c, h, w = objects.shape
    if m == 0 or n < 1:
        raise ValueError(f"need at least one source object and n >= 1; got M = {m}, n = {n}")
    if canvas_size < max(h, w):
        raise ValueError(f"canvas_size {canvas_size} is smaller than the objects ({h} x {w})")
    if not levels:
        raise ValueError("levels must not be empty")
    objects = objects.float().clamp(0, 1)
    labels = labels.long()
    if silhouette is None:
        border = torch.cat([objects[..., 0, :], objects[..., -1, :], objects[..., :, 0], objects[..., :, -1]], dim=-1)
        silhouette = bool(border.mean() < alpha_threshold)
    if max(lv.distractors for lv in levels) > 0 and labels.unique().numel() < 2:
        raise ValueError("distractors need source objects of at least two classes")

    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, c, canvas_size, canvas_size)
    masks = torch.zeros(n, canvas_size, canvas_size, dtype=torch.bool)
    out_labels = torch.zeros(n, dtype=torch.long)
    out_levels = torch.zeros(n, dtype=torch.long)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    sources = torch.zeros(n, dtype=torch.long)

    def alpha_of(obj: Tensor) -> Tensor:
        if silhouette:
            return (obj.amax(dim=0) > alpha_threshold).float()
        return torch.ones(obj.shape[-2:])

    def rand_int(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=g))

    for i in range(n):
        li = i % len(levels)
        level = levels[li]
        t = rand_int(m)
        canvas = _texture(c, canvas_size, level.texture, g)
        top, left = rand_int(canvas_size - h + 1), rand_int(canvas_size - w + 1)
        target_box = (top, left, h, w)
        for _ in range(level.distractors):
            d = rand_int(m)
            while labels[d] == labels[t]:
                d = rand_int(m)
            scale = 0.6 + 0.4 * float(torch.rand(1, generator=g))
            dh, dw = max(2, round(h * scale)), max(2, round(w * scale))
            obj = F.interpolate(
                objects[d : d + 1], size=(dh, dw), mode="bilinear", antialias=True, align_corners=False
            )[0]
            obj = obj.clamp(0, 1)
            for _try in range(20):  # away from the target where the canvas leaves room
                box = (rand_int(canvas_size - dh + 1), rand_int(canvas_size - dw + 1), dh, dw)
                if _overlap(box, target_box) == 0:
                    break
            _paste(canvas, obj, alpha_of(obj), box[0], box[1])
        obj = objects[t] * level.contrast
        alpha = alpha_of(objects[t])
        _paste(canvas, obj, alpha, top, left)
        images[i] = canvas
        masks[i, top : top + h, left : left + w] = alpha > 0
        out_labels[i], out_levels[i], sources[i] = labels[t], li, t
        boxes[i] = torch.tensor(target_box)
    return ClutteredScenes(images, masks, out_labels, out_levels, boxes, sources)
