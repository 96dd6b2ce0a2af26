"""The shared drawing code of the radar and attribution charts (``eexit.explain.figures``), used
by both ``eexit predict --explain`` and the evaluation report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from eexit.evaluation import plots
from eexit.explain import figures
from eexit.routing.features import FEATURE_NAMES
from eexit.types import EXIT_KEYS

PROFILES = {
    "tiny": {"a": [0.0, 1.0], "b": [10.0, 20.0], "c": [0.0, 0.5]},
    "heavy": {"a": [2.0, 3.0], "b": [30.0, 40.0], "c": [0.5, 1.0]},
}


def _polar():
    fig = Figure()
    return fig, fig.add_subplot(1, 1, 1, projection="polar")


def test_radar_scales_every_axis_to_the_profiles_and_widens_for_outliers() -> None:
    _, ax = _polar()
    # a is inside the bands, b beyond every band (widens the axis to 100), c is None (drawn as 0)
    figures.draw_radar(ax, [("x", [1.5, 100.0, None])], ["a", "b", "c"], PROFILES)
    image = next(line for line in ax.get_lines() if line.get_label() == "x")
    radius = np.asarray(image.get_ydata())
    assert np.allclose(radius, [0.5, 1.0, 0.0, 0.5])  # closed polygon: the first point again
    tiny_mid = next(line for line in ax.get_lines() if line.get_label() == "tiny (p10-p90)")
    # tiny's midpoints: a 0.5 of [0, 3]; b 15 of [10, 100]; c 0.25 of [0, 1]
    assert np.allclose(np.asarray(tiny_mid.get_ydata())[:3], [0.5 / 3, 5 / 90, 0.25])
    assert to_rgba(tiny_mid.get_color()) == to_rgba(figures.TIER_COLOURS["tiny"])


def test_one_colour_map_for_every_tier_and_every_figure() -> None:
    assert list(figures.TIER_COLOURS) == list(EXIT_KEYS)
    tiers = {to_rgba(c) for c in figures.TIER_COLOURS.values()}
    assert len(tiers) == len(EXIT_KEYS)
    assert plots.TIER_COLOURS is figures.TIER_COLOURS
    # the images on a radar chart are never drawn in a tier's colour
    _, ax = _polar()
    series = [(f"image {i}", [0.5, 15.0, 0.5]) for i in range(8)]
    figures.draw_radar(ax, series, ["a", "b", "c"], PROFILES)
    drawn = {to_rgba(line.get_color()) for line in ax.get_lines() if line.get_label().startswith("image")}
    assert drawn and not drawn & tiers


def test_attribution_bars_colour_by_sign() -> None:
    fig = Figure()
    ax = fig.add_subplot(1, 1, 1)
    figures.draw_attribution_bars(ax, ["up", "down", "none"], [0.3, -0.2, None], "x")
    colours = [to_rgba(p.get_facecolor()) for p in ax.patches]
    widths = [p.get_width() for p in ax.patches]
    assert widths == [0.3, -0.2, 0.0]
    assert colours[0] == to_rgba(figures.HEAVIER) and colours[1] == to_rgba(figures.LIGHTER)


def test_report_radar_draws_every_example_with_the_shared_code(tmp_path: Path) -> None:
    profiles = {t: {n: [float(i), float(i) + 1.0] for n in FEATURE_NAMES} for i, t in enumerate(EXIT_KEYS)}
    feats = torch.tensor([[0.5] * len(FEATURE_NAMES), [9.0] * len(FEATURE_NAMES)])
    path = plots.radar_plot(feats, profiles, tmp_path / "radar.png", ["#0 -> TINY", "#1 -> HEAVY"])
    assert path.is_file() and path.stat().st_size > 0
    bars = plots.attribution_bars(torch.tensor([[0.1] * 7, [-0.1] * 7]), tmp_path / "attr.png", ["a", "b"])
    assert bars.is_file() and bars.stat().st_size > 0


def test_a_non_finite_cam_pixel_shows_as_zero_and_keeps_the_rest_of_the_map() -> None:
    heat = torch.zeros(6, 6)
    heat[1, 2], heat[4, 4] = 2.0, 1.0
    heat[0, 0] = float("nan")
    fig = figures.cam_overlay(torch.zeros(1, 6, 6), [0.5], [0.5], heat, "x")
    shown = np.asarray(fig.axes[0].images[1].get_array())
    expected = np.zeros((6, 6))
    expected[1, 2], expected[4, 4] = 1.0, 0.5
    assert np.array_equal(shown, expected)
