"""Evaluation figures. Each function writes one PNG and returns its path.

Figures are built as ``matplotlib.figure.Figure`` objects (rendered by Agg on save), never
through pyplot: no display is needed and no global backend or figure state is touched."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from eexit.explain.figures import TIER_COLOURS, draw_attribution_bars, draw_radar
from eexit.routing.features import FEATURE_NAMES
from eexit.types import ExitLevel

ROUTER_COLOURS = {"gate": "tab:red", "staged": "tab:purple", "cascade": "tab:blue"}


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


def for_display(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images ``(B, C, H, W)`` back to ``[0, 1]`` pixels (on their device)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def upsampled(cams: Sequence[Tensor], size: tuple[int, int]) -> list[Tensor]:
    """Cams ``[(B, h_k, w_k)]`` bilinearly resized to ``(B, *size)`` each."""
    return [F.interpolate(c.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1) for c in cams]


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
                # a non-finite pixel shows as 0 (as in eexit.explain.figures.cam_overlay), not a blank map
                cam = cams[name][level][i].detach().float().cpu().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
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
    """The seven features of example images against each tier's typical profile
    (``eexit.explain.figures.draw_radar``: the same chart ``eexit predict --explain`` draws).

    Args:
        features: ``(B, 7)`` TINY features of the examples.
        profiles: ``{tier: {feature: [p10, p90]}}`` (``tier_profiles``).
        labels: one legend label per example.
    """
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots(subplot_kw={"projection": "polar"})
    rows = features.detach().float().cpu().tolist()
    draw_radar(ax, list(zip(labels, rows, strict=True)), FEATURE_NAMES, profiles)
    ax.set_title("complexity features vs each tier's typical profile", fontsize=9)
    return _save(fig, path)


def attribution_bars(attributions: Tensor, path: Path, titles: Sequence[str]) -> Path:
    """One bar chart per example (``eexit.explain.figures.draw_attribution_bars``).

    Args:
        attributions: ``(B, 7)`` gate attributions.
        titles: one title per example.
    """
    attr = attributions.detach().float().cpu().tolist()
    fig = Figure(figsize=(3.6 * len(attr), 3.2))
    axes = fig.subplots(1, len(attr), squeeze=False, sharey=True)
    for ax, values, title in zip(axes[0], attr, titles, strict=True):
        draw_attribution_bars(ax, FEATURE_NAMES, values, "attribution (expected tier)")
        ax.set_title(title, fontsize=8)
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
