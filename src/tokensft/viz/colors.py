"""Colour scales of the visualizer: a diverging scale centred at 0 and a categorical palette for token categories.

Pure functions (no gradio, no numpy state), so the colours the browser shows can be predicted exactly in tests.
"""

from __future__ import annotations

import math

# ColorBrewer RdBu (5 classes), reversed so that negative values are blue and positive values are red.
# Anchors at x = -1, -0.5, 0, 0.5, 1 where x = value / vmax (clipped to [-1, 1]).
DIVERGING_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (5, 113, 176),  # -1.0  #0571b0
    (146, 197, 222),  # -0.5  #92c5de
    (247, 247, 247),  # 0.0   #f7f7f7
    (244, 165, 130),  # +0.5  #f4a582
    (202, 0, 32),  # +1.0  #ca0020
)
NAN_RGB = "rgb(226, 226, 226)"
"""Background of tokens without a value (prompt tokens, position 0, `weight.lr` without a reference model)."""

CATEGORY_COLORS: dict[str, str] = {
    "number": "#1f77b4",
    "operator": "#ff7f0e",
    "latex": "#2ca02c",
    "word": "#d62728",
    "subword": "#9467bd",
    "punctuation": "#8c564b",
    "whitespace": "#7f7f7f",
    "special": "#e377c2",
}
"""Colour of each token category of `tokensft.tracing.schema.CATEGORIES` (matplotlib's tab10 order)."""


def _round_half_up(c: float) -> int:
    return int(math.floor(c + 0.5))


def diverging_fraction(value: float, vmax: float) -> float:
    """Position of `value` on the diverging scale: `clip(value / vmax, -1, 1)`; NaN stays NaN.

    Raises:
        ValueError: `vmax` is not a finite number > 0.
    """
    if not (isinstance(vmax, (int, float)) and math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a finite number > 0, got {vmax!r}")
    value = float(value)
    if math.isnan(value):
        return math.nan
    return max(-1.0, min(1.0, value / vmax))


def diverging_rgb_tuple(value: float, vmax: float) -> tuple[int, int, int] | None:
    """RGB triple (0-255 ints) of `value` on the diverging scale centred at 0, or None for NaN.

    The scale is piecewise linear in RGB between `DIVERGING_ANCHORS` (RdBu: blue at `-vmax`, near-white at 0,
    red at `+vmax`); values beyond `±vmax` (including ±inf) take the end colours. Channels are rounded half up.

    Raises:
        ValueError: `vmax` is not a finite number > 0.
    """
    x = diverging_fraction(value, vmax)
    if math.isnan(x):
        return None
    pos = (x + 1.0) * 2.0  # 0..4 over the 4 segments
    i = min(int(math.floor(pos)), 3)
    f = pos - i
    lo, hi = DIVERGING_ANCHORS[i], DIVERGING_ANCHORS[i + 1]
    return tuple(_round_half_up(a + (b - a) * f) for a, b in zip(lo, hi))  # type: ignore[return-value]


def diverging_rgb(value: float, vmax: float) -> str:
    """CSS colour `"rgb(r, g, b)"` of `value` on the diverging scale centred at 0 (`NAN_RGB` for NaN).

    This is the string a browser reports as the computed `background-color` of a token span.

    Raises:
        ValueError: `vmax` is not a finite number > 0.
    """
    rgb = diverging_rgb_tuple(value, vmax)
    if rgb is None:
        return NAN_RGB
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def text_rgb(value: float, vmax: float) -> str:
    """Text colour that stays readable on `diverging_rgb(value, vmax)`: white on the dark ends, else near-black."""
    x = diverging_fraction(value, vmax)
    if not math.isnan(x) and abs(x) > 0.7:
        return "rgb(255, 255, 255)"
    return "rgb(17, 17, 17)"


def css_gradient(n: int = 9) -> str:
    """CSS `linear-gradient(...)` from `-vmax` (left) to `+vmax` (right) sampled at `n` points, for the legend."""
    stops = [diverging_rgb(-1.0 + 2.0 * i / (n - 1), 1.0) for i in range(n)]
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def category_color(category: str) -> str:
    """Hex colour of a token category (grey for an unknown one)."""
    return CATEGORY_COLORS.get(category, "#bbbbbb")
