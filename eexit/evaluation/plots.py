"""Evaluation figures. Each function writes one PNG and returns its path.

Figures are built as ``matplotlib.figure.Figure`` objects (rendered by Agg on save), never
through pyplot: no display is needed and no global backend or figure state is touched."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from eexit.routing.features import FEATURE_NAMES
from eexit.types import ExitLevel

ROUTER_COLOURS = {"gate": "tab:red", "staged": "tab:purple", "cascade": "tab:blue"}
TIER_COLOURS = {"tiny": "tab:green", "light": "tab:olive", "medium": "tab:orange", "heavy": "tab:red"}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def tradeoff_plot(metrics: Mapping, path: Path) -> Path:
    """Accuracy vs mean MFLOPs: one curve per router, the calibrated knob marked, the fixed exits
    and the oracle as points."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for kind, colour in ROUTER_COLOURS.items():
        curve = metrics.get(f"tradeoff/{kind}")
        if not curve:
            continue
        ax.plot(
            [p["mflops"] for p in curve], [100 * p["accuracy"] for p in curve], "-", color=colour, label=kind, lw=1.5
        )
        ax.plot(
            metrics[f"routed/{kind}/mflops"], 100 * metrics[f"routed/{kind}/accuracy"], "o", color=colour, ms=8, mec="k"
        )
    for level in ExitLevel:
        x, y = metrics[f"test/mflops/{level.key}"], 100 * metrics[f"test/acc/{level.key}"]
        ax.plot(x, y, "s", color="k", ms=6)
        ax.annotate(level.name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.plot(
        metrics["oracle/mflops"], 100 * metrics["oracle/accuracy"], "*", color="gold", ms=14, mec="k", label="oracle"
    )
    ax.set_xlabel("mean MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs compute (circles: calibrated knobs; squares: fixed exits)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def confusion_plot(matrix: Sequence[Sequence[int]], path: Path, title: str = "gate tier vs oracle tier") -> Path:
    """Confusion matrix, rows = oracle tier, columns = routed tier."""
    mat = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(4.2, 3.8))
    ax = fig.subplots()
    ax.imshow(mat, cmap="Blues")
    names = [lv.name for lv in ExitLevel]
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed tier")
    ax.set_ylabel("oracle tier")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(
                j, i, f"{int(mat[i, j])}", ha="center", va="center", color="k" if mat[i, j] < mat.max() / 2 else "w"
            )
    ax.set_title(title)
    return _save(fig, path)


def tier_distribution_plot(distribution: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Grouped bars: share of images per tier for the oracle and each router."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    names = list(distribution)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = np.arange(len(ExitLevel)) + i * width
        ax.bar(xs, [100 * f for f in distribution[name]], width, label=name, color=ROUTER_COLOURS.get(name, "gold"))
    ax.set_xticks(np.arange(len(ExitLevel)) + 0.4 - width / 2, [lv.name for lv in ExitLevel])
    ax.set_ylabel("images (%)")
    ax.set_title("tier distribution on the test split")
    ax.legend()
    return _save(fig, path)


def _overlay(ax: Axes, image: np.ndarray, cam: np.ndarray | None) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def heatmap_grid(
    images: Tensor,
    cams: Mapping[str, Sequence[Tensor]],
    path: Path,
    titles: Sequence[str] | None = None,
    masks: Tensor | None = None,
) -> Path:
    """Images (rows) x the four exits' cams (columns), one column block per model.

    Args:
        images: ``(B, C, H, W)`` in ``[0, 1]`` for display.
        cams: ``{model name: [(B, H, W)] * 4}`` maps at the image size, e.g. ``{"model": ...,
            "baseline": ...}``.
        titles: one row label per image.
        masks: ``(B, H, W)`` ground-truth masks, outlined in green on the images.
    """
    b = images.shape[0]
    blocks = list(cams)
    cols = 1 + len(ExitLevel) * len(blocks)
    fig = Figure(figsize=(1.6 * cols, 1.6 * b))
    axes = fig.subplots(b, cols, squeeze=False)
    imgs = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    for i in range(b):
        _overlay(axes[i, 0], imgs[i], None)
        if masks is not None and masks[i].any():
            axes[i, 0].contour(masks[i].float().cpu().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for j, name in enumerate(blocks):
            for level in ExitLevel:
                cam = cams[name][level][i].detach().float().cpu()
                cam = (cam / cam.max().clamp_min(1e-12)).numpy()
                ax = axes[i, 1 + j * len(ExitLevel) + int(level)]
                _overlay(ax, imgs[i], cam)
                if i == 0:
                    ax.set_title(f"{name}\n{level.name}" if len(blocks) > 1 else level.name, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    return _save(fig, path)


def radar_plot(
    features: Tensor, profiles: Mapping[str, Mapping[str, Sequence[float]]], path: Path, labels: Sequence[str]
) -> Path:
    """The seven features of example images against each tier's typical profile.

    Each axis is scaled to ``[0, 1]`` by the lowest 10th and highest 90th percentile over the
    tiers; a tier's profile is drawn as the midpoint of its 10th-90th percentile range.

    Args:
        features: ``(B, 7)`` TINY features of the examples.
        profiles: ``{tier: {feature: [p10, p90]}}`` (``tier_profiles``).
        labels: one legend label per example.
    """
    names = list(FEATURE_NAMES)
    lo = np.array([min(p[n][0] for p in profiles.values()) for n in names])
    hi = np.array([max(p[n][1] for p in profiles.values()) for n in names])
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)

    def scaled(values: np.ndarray) -> np.ndarray:
        return np.clip((values - lo) / span, 0, 1)

    angles = np.linspace(0, 2 * math.pi, len(names), endpoint=False).tolist()
    angles_closed = [*angles, angles[0]]
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots(subplot_kw={"projection": "polar"})
    for tier, prof in profiles.items():
        mid = scaled(np.array([(prof[n][0] + prof[n][1]) / 2 for n in names]))
        ax.plot(
            angles_closed, [*mid, mid[0]], "--", color=TIER_COLOURS.get(tier, "grey"), lw=1.2, label=f"{tier} (typical)"
        )
    feats = features.detach().float().cpu().numpy()
    for i in range(feats.shape[0]):
        v = scaled(feats[i])
        ax.plot(angles_closed, [*v, v[0]], "-", lw=2, label=labels[i])
        ax.fill(angles_closed, [*v, v[0]], alpha=0.08)
    ax.set_xticks(angles, [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_yticks([0.25, 0.5, 0.75], [], fontsize=6)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.45, 1.1), fontsize=7)
    ax.set_title("complexity features vs each tier's typical profile", fontsize=9)
    return _save(fig, path)


def attribution_bars(attributions: Tensor, path: Path, titles: Sequence[str]) -> Path:
    """One horizontal bar chart per example: red pushes toward a heavier tier, blue toward a
    lighter one.

    Args:
        attributions: ``(B, 7)`` gate attributions.
        titles: one title per example.
    """
    attr = attributions.detach().float().cpu().numpy()
    b = attr.shape[0]
    fig = Figure(figsize=(3.6 * b, 3.2))
    axes = fig.subplots(1, b, squeeze=False, sharey=True)
    for i in range(b):
        ax = axes[0, i]
        colours = ["tab:red" if v > 0 else "tab:blue" for v in attr[i]]
        ax.barh(range(len(FEATURE_NAMES)), attr[i], color=colours)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(FEATURE_NAMES)), FEATURE_NAMES, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(titles[i], fontsize=8)
        ax.set_xlabel("attribution (expected tier)", fontsize=7)
    return _save(fig, path)


def curve_plot(curves: Mapping[str, Sequence[float]], path: Path, title: str, ylabel: str) -> Path:
    """Mean deletion or insertion curves, one line per exit."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name, ys in curves.items():
        xs = np.linspace(0, 1, len(ys))
        ax.plot(100 * xs, ys, label=name, color=TIER_COLOURS.get(name))
    ax.set_xlabel("pixels removed / inserted (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
