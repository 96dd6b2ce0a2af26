"""Per-decision figures (matplotlib, Agg canvas, no pyplot state): the deciding exit's Grad-CAM
over the image, a radar chart of the router's features against each tier's typical profile, and
a bar chart of the features' attributions (red: toward a heavier tier, blue: toward a lighter one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

TIER_COLOURS = {"tiny": "#2ca02c", "light": "#1f77b4", "medium": "#ff7f0e", "heavy": "#d62728"}


def _new(width: float, height: float, polar: bool = False):
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1, projection="polar" if polar else None)
    return fig, ax


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG."""
    fig.savefig(str(path), format="png", bbox_inches="tight")
    return Path(path)


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
    cam = heatmap.detach().float().cpu().numpy()
    peak = float(cam.max()) if cam.size else 0.0
    cam = cam / peak if peak > 0 and math.isfinite(peak) else np.zeros_like(cam)
    fig, ax = _new(3.2, 3.4)
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def radar_chart(
    features: Mapping[str, float | None], profiles: Mapping[str, Mapping[str, Sequence[float]]], title: str
) -> Figure:
    """The image's features against each tier's 10th-90th percentile band.

    Each axis is scaled to [0, 1] between the smallest 10th and the largest 90th percentile of
    the tiers (widened to include the image's value), so features of different units share a
    chart.

    Args:
        features: ``{name: value}`` the router saw.
        profiles: ``{tier: {name: [p10, p90]}}`` (``Calibration.tier_profiles``).
        title: figure title.
    """
    names = list(features)
    values = np.array([features[n] if features[n] is not None else 0.0 for n in names], dtype=float)
    lo = np.array([min([p[n][0] for p in profiles.values()] + [values[i]]) for i, n in enumerate(names)])
    hi = np.array([max([p[n][1] for p in profiles.values()] + [values[i]]) for i, n in enumerate(names)])
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)

    def scaled(v: np.ndarray) -> np.ndarray:
        return np.append((v - lo) / span, (v[0] - lo[0]) / span[0])

    theta = np.append(np.linspace(0, 2 * np.pi, len(names), endpoint=False), 0.0)
    fig, ax = _new(4.6, 4.6, polar=True)
    for tier, prof in profiles.items():
        p10 = np.array([prof[n][0] for n in names])
        p90 = np.array([prof[n][1] for n in names])
        colour = TIER_COLOURS.get(tier, "grey")
        ax.fill_between(theta, scaled(p10), scaled(p90), color=colour, alpha=0.12)
        ax.plot(theta, scaled((p10 + p90) / 2), color=colour, lw=1, label=f"{tier} (p10-p90)")
    ax.plot(theta, scaled(values), color="black", lw=2, label="this image")
    ax.set_xticks(theta[:-1])
    ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_yticklabels([])
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=7)
    return fig


def attribution_bars(attributions: Mapping[str, float | None], title: str) -> Figure:
    """Horizontal bars, one per feature: red pushes toward a heavier tier, blue toward a lighter one."""
    names = list(attributions)
    vals = np.array([attributions[n] if attributions[n] is not None else 0.0 for n in names], dtype=float)
    fig, ax = _new(4.6, 3.0)
    ax.barh(names, vals, color=["#d62728" if v > 0 else "#1f77b4" for v in vals])
    ax.axvline(0.0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("attribution (+ heavier, - lighter)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    return fig
