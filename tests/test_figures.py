"""The shared drawing code of the radar and attribution charts (``eexit.explain.figures``), used
by both ``eexit predict --explain`` and the evaluation report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


def test_cam_overlay_draws_the_image_as_it_was_before_normalisation() -> None:
    """The overlay's base image undoes the bundle's normalisation: a model input of 0 with mean
    0.5 and std 0.25 is drawn as grey 0.5, an input of 3 as white (clipped to 1)."""
    image = torch.zeros(1, 4, 4)
    image[0, 0] = 3.0
    fig = figures.cam_overlay(image, [0.5], [0.25], torch.ones(4, 4), "x")
    expected = np.full((4, 4), 0.5)
    expected[0] = 1.0
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), expected)


def test_a_cam_with_infinities_or_without_any_positive_value_is_drawn_finite() -> None:
    """Infinite cam pixels show as 0 and leave the rest of the map on its own scale; an all-zero
    cam is drawn as zeros (not 0 / 0)."""
    heat = torch.zeros(6, 6)
    heat[1, 2], heat[4, 4] = 2.0, 1.0
    heat[0, 0], heat[0, 1] = float("inf"), float("-inf")
    shown = np.asarray(figures.cam_overlay(torch.zeros(1, 6, 6), [0.5], [0.5], heat, "x").axes[0].images[1].get_array())
    expected = np.zeros((6, 6))
    expected[1, 2], expected[4, 4] = 1.0, 0.5
    assert np.array_equal(shown, expected)
    zero = figures.cam_overlay(torch.zeros(1, 6, 6), [0.5], [0.5], torch.zeros(6, 6), "x")
    assert np.array_equal(np.asarray(zero.axes[0].images[1].get_array()), np.zeros((6, 6)))


def test_a_figure_saved_over_a_symbolic_link_is_written_to_its_target(tmp_path: Path) -> None:
    """``save`` writes through a symlink (the link stays, its target gets the PNG)."""
    target = tmp_path / "real" / "fig.png"
    target.parent.mkdir()
    link = tmp_path / "fig.png"
    link.symlink_to(target)
    assert figures.save(figures.attribution_bars({"a": 0.1}, "t"), link) == link
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")


def test_a_feature_all_tiers_share_one_value_draws_finite_radii() -> None:
    """An axis whose bands have zero width (every tier at 1.0, the image too) is drawn, not NaN."""
    _, ax = _polar()
    profiles = {"tiny": {"a": [1.0, 1.0], "b": [0.0, 2.0]}, "heavy": {"a": [1.0, 1.0], "b": [1.0, 3.0]}}
    figures.draw_radar(ax, [("x", [1.0, 2.0])], ["a", "b"], profiles)
    assert all(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all() for line in ax.get_lines())


def test_attribution_bars_list_the_features_top_to_bottom() -> None:
    """The first feature is the top bar, labelled with its own name (inverted y axis)."""
    ax = Figure().add_subplot(1, 1, 1)
    figures.draw_attribution_bars(ax, ["first", "second", "third"], [0.1, 0.2, 0.3], "x")
    assert ax.yaxis_inverted()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second", "third"]
    centres = [p.get_y() + p.get_height() / 2 for p in ax.patches]
    assert centres == pytest.approx([0, 1, 2]) and [p.get_width() for p in ax.patches] == [0.1, 0.2, 0.3]


def test_the_first_six_images_on_a_radar_chart_get_six_colours() -> None:
    """Each image drawn on a radar chart has its own colour, up to ``SERIES_COLOURS``' six."""
    _, ax = _polar()
    figures.draw_radar(ax, [(f"image {i}", [0.5, 15.0, 0.5]) for i in range(6)], ["a", "b", "c"], PROFILES)
    drawn = [to_rgba(line.get_color()) for line in ax.get_lines() if line.get_label().startswith("image")]
    assert len(drawn) == len(set(drawn)) == 6
