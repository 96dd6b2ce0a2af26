"""Localisation of each exit's Grad-CAM on cluttered scenes built from the test split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eexit.data.cluttered import LEVELS, ClutteredScenes, ClutterLevel, make_cluttered
from eexit.evaluation.consistency import exit_cams
from eexit.evaluation.localization import KEEP_FRACTIONS, localization_metrics
from eexit.models.net import MultiExitNet
from eexit.types import ExitLevel


def scenes_from_test(
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    n: int,
    canvas_factor: float = 2.0,
    seed: int = 0,
    levels: tuple[ClutterLevel, ...] = LEVELS,
) -> ClutteredScenes:
    """Cluttered scenes whose objects are test images (un-normalised to ``[0, 1]``).

    Args:
        images: ``(M, C, h, w)`` normalised test images.
        labels: ``(M,)``.
        mean, std: the data's per-channel normalisation.
        n: scenes to make.
        canvas_factor: canvas side as a multiple of the image side.
        seed: seed of the layout.
        levels: complexity levels.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    objects = (images.float() * s + m).clamp(0, 1)
    size = round(canvas_factor * max(images.shape[-2:]))
    return make_cluttered(objects, labels, n, size, levels, seed)


@torch.no_grad()
def cluttered_localization(
    net: MultiExitNet,
    scenes: ClutteredScenes,
    mean: Sequence[float],
    std: Sequence[float],
    fractions: tuple[float, ...] = KEEP_FRACTIONS,
    batch_size: int = 128,
) -> tuple[dict[str, float], list[Tensor]]:
    """Mean localisation scores and accuracy of every exit on the scenes.

    Each exit's cam explains the target's class (the scene's label), resampled to the canvas.

    Returns:
        ``{"cluttered/{score}/{exit}": mean}`` (scores of ``localization_metrics`` plus
        ``acc``, and per level ``cluttered/pointing_game_level{i}/{exit}`` and
        ``cluttered/acc_level{i}/{exit}``; ``cluttered/mask_fraction``, the targets' mean share
        of the canvas, is the expected pointing game and energy of a random map)
        and the cams of the first batch, ``[(b, S, S)] * 4``, for figures.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    sums: dict[str, Tensor] = {}
    first: list[Tensor] = []
    per_level: dict[str, list[Tensor]] = {lv.key: [] for lv in ExitLevel}
    size = tuple(scenes.images.shape[-2:])
    for start in range(0, len(scenes), batch_size):
        sl = slice(start, start + batch_size)
        x = (scenes.images[sl] - m) / s
        y, mask = scenes.labels[sl], scenes.masks[sl]
        logits, cams = exit_cams(net, x, y)
        up = [F.interpolate(c.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1) for c in cams]
        if not first:
            first = up
        for level in ExitLevel:
            scores = localization_metrics(up[level], mask, fractions)
            scores["acc"] = (logits[level].argmax(1) == y).float()
            for name, v in scores.items():
                key = f"cluttered/{name}/{level.key}"
                sums[key] = sums.get(key, torch.zeros(())) + v.sum()
            per_level[level.key].append(torch.stack([scores["pointing_game"], scores["acc"]]))
    out = {k: float(v) / len(scenes) for k, v in sums.items()}
    # what a map that knows nothing scores: the pointing game and energy of a uniform random map
    out["cluttered/mask_fraction"] = float(scenes.masks.float().mean())
    for key, rows in per_level.items():
        hits, right = torch.cat(rows, dim=1)
        for li in scenes.levels.unique().tolist():
            sel = scenes.levels == li
            out[f"cluttered/pointing_game_level{li}/{key}"] = float(hits[sel].mean())
            out[f"cluttered/acc_level{li}/{key}"] = float(right[sel].mean())
    return out, first
