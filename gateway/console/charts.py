"""Bar charts as inline SVG, drawn on the server: no chart library, no script, and
the page shows its numbers without JavaScript."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 8, 26, 28
# Fewer bars than this do not get wider.
_MIN_SLOTS = 12


@dataclass(frozen=True, slots=True)
class Bar:
    label: str  # under the bar (every few bars) and in its tooltip
    value: float
    tooltip: str


def bar_chart(bars: Sequence[Bar], *, title: str, unit: str) -> str:
    """An accessible SVG bar chart of ``bars`` scaled to the largest value."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    top = _nice_ceiling(max((bar.value for bar in bars), default=0.0))
    slot = plot_w / max(len(bars), _MIN_SLOTS)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(_short(top * fraction))}</text>"
        )
    step = max(1, len(bars) // 6)
    for index, bar in enumerate(bars):
        height = 0.0 if top == 0 else plot_h * bar.value / top
        x = _LEFT + index * slot + slot * 0.15
        y = _TOP + plot_h - height
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{height:.1f}"><title>{escape(bar.tooltip)}</title></rect>'
        )
        if index % step == 0 or index == len(bars) - 1:
            parts.append(
                f'<text class="axis" x="{x + slot * 0.35:.1f}" y="{HEIGHT - 8}" '
                f'text-anchor="middle">{escape(bar.label)}</text>'
            )
    parts.append(
        f'<text class="axis unit" x="{_LEFT}" y="{_TOP - 12}" text-anchor="start">'
        f"{escape(unit)}</text></svg>"
    )
    return "".join(parts)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^n at or above ``value`` (0 stays 0)."""
    if value <= 0:
        return 0.0
    magnitude = 10.0 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    while magnitude > value:
        magnitude /= 10
    for factor in (1, 2, 2.5, 5, 10):
        if magnitude * factor >= value:
            return magnitude * factor
    return magnitude * 10


def _short(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    if value >= 1 or value == 0:
        return f"{value:.3g}"
    return f"{value:.6f}".rstrip("0")  # credits have 6 decimals; no 5e-05
