"""Per-decision figures (matplotlib, Agg canvas, no pyplot state): the deciding exit's Grad-CAM
over the image, a radar chart of the router's features against each tier's typical profile, and
a bar chart of the features' attributions (red: toward a heavier tier, blue: toward a lighter one).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from eexit.types import EXIT_KEYS

# the one colour map of the tiers (every figure of the package uses it), cheapest first
TIER_COLOURS: dict[str, str] = dict(zip(EXIT_KEYS, ("tab:green", "tab:cyan", "tab:orange", "tab:red"), strict=True))
HEAVIER, LIGHTER = "tab:red", "tab:blue"  # attribution signs: toward more / less compute
# the images drawn on a radar chart: colours no tier uses
SERIES_COLOURS = ("black", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray")


def _new(width: float, height: float, polar: bool = False):
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1, projection="polar" if polar else None)
    return fig, ax


_TEMP_IDS = itertools.count()


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG, atomically: into a temporary file beside ``path``, then renamed, so
    that a failed or interrupted write (a full disk, a signal) leaves no empty or truncated PNG
    under the real name."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # written through a link
    tmp = target.with_name(f".eexit-{os.getpid()}-{next(_TEMP_IDS)}.tmp")  # short: any name that fits, fits
    try:
        fig.savefig(str(tmp), format="png", bbox_inches="tight")
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):  # the figure's name, not the temp file's
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    return path


def cam_overlay(image: Tensor, mean: Sequence[float], std: Sequence[float], heatmap: Tensor, title: str) -> Figure:
    """The image with the deciding exit's cam on top.

    Args:
        image: the normalised model input ``(C, H, W)``.
        mean: per-channel normalisation mean (undone for display).
        std: per-channel normalisation std.
        heatmap: the cam upsampled to the input ``(H, W)`` (any non-negative scale).
        title: figure title.
    """
    img = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    img = np.clip(img * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    # a non-finite pixel shows as 0 (as in eexit.evaluation.plots.heatmap_grid), the rest as it is
    cam = np.nan_to_num(heatmap.detach().float().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(cam.max()) if cam.size else 0.0
    cam = cam / peak if peak > 0 and math.isfinite(peak) else np.zeros_like(cam)
    fig, ax = _new(3.2, 3.4)
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def draw_radar(
    ax: Axes,
    series: Sequence[tuple[str, Sequence[float]]],
    names: Sequence[str],
    profiles: Mapping[str, Mapping[str, Sequence[float]]],
) -> None:
    """Draw feature vectors against each tier's 10th-90th percentile band on a polar axes.

    Each axis is scaled to [0, 1] between the smallest 10th and the largest 90th percentile of
    the tiers, widened to include every drawn value, so features of different units share a
    chart and no value is clipped.

    Args:
        ax: a polar ``Axes``.
        series: ``(label, values)`` pairs, each ``values`` of ``len(names)`` (``None`` drawn as 0).
        names: the feature names, one per axis.
        profiles: ``{tier: {name: [p10, p90]}}`` (``Calibration.tier_profiles``).
    """
    rows = np.array([[0.0 if v is None else float(v) for v in values] for _, values in series], dtype=float)
    rows = rows.reshape(len(series), len(names))
    lo = np.array([min([p[n][0] for p in profiles.values()] + rows[:, i].tolist()) for i, n in enumerate(names)])
    hi = np.array([max([p[n][1] for p in profiles.values()] + rows[:, i].tolist()) for i, n in enumerate(names)])
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)

    def closed(v: np.ndarray) -> np.ndarray:
        scaled = (v - lo) / span
        return np.append(scaled, scaled[0])

    theta = np.append(np.linspace(0, 2 * np.pi, len(names), endpoint=False), 0.0)
    for tier, prof in profiles.items():
        p10 = np.array([prof[n][0] for n in names], dtype=float)
        p90 = np.array([prof[n][1] for n in names], dtype=float)
        colour = TIER_COLOURS.get(tier, "grey")
        ax.fill_between(theta, closed(p10), closed(p90), color=colour, alpha=0.12)
        ax.plot(theta, closed((p10 + p90) / 2), "--", color=colour, lw=1, label=f"{tier} (p10-p90)")
    for i, ((label, _), row) in enumerate(zip(series, rows, strict=True)):
        ax.plot(theta, closed(row), color=SERIES_COLOURS[i % len(SERIES_COLOURS)], lw=2, label=label)
    ax.set_xticks(theta[:-1])
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_yticklabels([])
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper right", bbox_to_anchor=(1.4, 1.12), fontsize=7)


def draw_attribution_bars(ax: Axes, names: Sequence[str], values: Sequence[float | None], xlabel: str) -> None:
    """Horizontal bars, one per feature: red pushes toward more compute, blue toward less.

    Args:
        ax: an ``Axes``.
        names: the feature names, top to bottom.
        values: one attribution per name (``None`` drawn as 0).
        xlabel: what the attributions explain.
    """
    vals = np.array([0.0 if v is None else float(v) for v in values], dtype=float)
    ax.barh(range(len(names)), vals, color=[HEAVIER if v > 0 else LIGHTER for v in vals])
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), list(names))
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)


def radar_chart(
    features: Mapping[str, float | None], profiles: Mapping[str, Mapping[str, Sequence[float]]], title: str
) -> Figure:
    """The image's features against each tier's 10th-90th percentile band (see ``draw_radar``).

    Args:
        features: ``{name: value}`` the router saw.
        profiles: ``{tier: {name: [p10, p90]}}`` (``Calibration.tier_profiles``).
        title: figure title.
    """
    fig, ax = _new(4.6, 4.6, polar=True)
    draw_radar(ax, [("this image", list(features.values()))], list(features), profiles)
    ax.set_title(title, fontsize=9)
    return fig


def attribution_bars(attributions: Mapping[str, float | None], title: str) -> Figure:
    """One image's attributions as bars (see ``draw_attribution_bars``)."""
    fig, ax = _new(4.6, 3.0)
    draw_attribution_bars(ax, list(attributions), list(attributions.values()), "attribution (+ heavier, - lighter)")
    ax.set_title(title, fontsize=9)
    return fig
