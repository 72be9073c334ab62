"""The diverging colour scale: closed-form anchors, a naive interpolation reference, clipping and NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokensft.viz.colors import (
    DIVERGING_ANCHORS,
    NAN_RGB,
    css_gradient,
    diverging_rgb,
    diverging_rgb_tuple,
    text_rgb,
)


def _reference(value: float, vmax: float) -> tuple[int, int, int]:
    """Naive reference: np.interp of each channel over the anchors at -1, -0.5, 0, 0.5, 1, rounded half up."""
    x = float(np.clip(value / vmax, -1, 1))
    xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    return tuple(int(math.floor(np.interp(x, xs, [a[c] for a in DIVERGING_ANCHORS]) + 0.5)) for c in range(3))


def test_anchors_closed_form():
    assert diverging_rgb(0.0, 1.0) == "rgb(247, 247, 247)"
    assert diverging_rgb(2.0, 2.0) == "rgb(202, 0, 32)"
    assert diverging_rgb(-2.0, 2.0) == "rgb(5, 113, 176)"
    assert diverging_rgb(1.5, 3.0) == "rgb(244, 165, 130)"
    assert diverging_rgb(-0.25, 0.5) == "rgb(146, 197, 222)"
    # midpoint of the 0 .. +0.5 segment: (247+244)/2 = 245.5 -> 246, (247+165)/2 = 206, (247+130)/2 = 188.5 -> 189
    assert diverging_rgb(0.25, 1.0) == "rgb(246, 206, 189)"


@pytest.mark.parametrize("vmax", [1e-3, 0.37, 1.0, 17.0])
def test_matches_naive_interpolation(vmax):
    for v in np.linspace(-1.3 * vmax, 1.3 * vmax, 211):
        assert diverging_rgb_tuple(float(v), vmax) == _reference(float(v), vmax), v


def test_scale_invariance_and_clipping():
    for v in (-0.9, -0.3, 0.1, 0.6):
        assert diverging_rgb(v, 1.0) == diverging_rgb(v * 7.5, 7.5)
    assert diverging_rgb(5.0, 1.0) == diverging_rgb(1.0, 1.0) == diverging_rgb(math.inf, 1.0)
    assert diverging_rgb(-5.0, 1.0) == diverging_rgb(-1.0, 1.0) == diverging_rgb(-math.inf, 1.0)


def test_sign_ordering():
    # positive values are redder than blue, negative values bluer than red, and further from 0 is further from white
    for v in (0.2, 0.5, 0.9):
        r, _, b = diverging_rgb_tuple(v, 1.0)
        assert r > b
        r, _, b = diverging_rgb_tuple(-v, 1.0)
        assert b > r
    greens = [diverging_rgb_tuple(v, 1.0)[1] for v in np.linspace(0, 1, 11)]
    assert all(a >= b for a, b in zip(greens, greens[1:]))


def test_nan_and_bad_vmax():
    assert diverging_rgb(float("nan"), 1.0) == NAN_RGB
    assert diverging_rgb_tuple(float("nan"), 1.0) is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="vmax"):
            diverging_rgb(0.5, bad)


def test_text_colour_readable_on_dark_ends():
    assert text_rgb(1.0, 1.0) == text_rgb(-0.9, 1.0) == "rgb(255, 255, 255)"
    assert text_rgb(0.1, 1.0) == text_rgb(float("nan"), 1.0) == "rgb(17, 17, 17)"


def test_css_gradient_runs_blue_to_red():
    g = css_gradient(5)
    assert g.startswith("linear-gradient(to right, rgb(5, 113, 176)") and g.endswith("rgb(202, 0, 32))")
