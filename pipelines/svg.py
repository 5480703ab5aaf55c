"""Small charts as inline SVG for the static report (``pipelines.report``): a time series
of lines, grouped bars over time, and horizontal bars. No JavaScript, no fonts or files
to fetch, so the page renders the same from a file, an e-mail attachment or a browser
with the network off. Every label is escaped; callers pass counts, times and vocabulary
values only."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
WIDTH, HEIGHT = 720, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 16, 48


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high``."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(high / step)) + 1)]


def _fmt(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _empty(message: str) -> str:
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} 60" width="{WIDTH}" height="60">'
        f'<text x="8" y="34" class="empty">{escape(message)}</text></svg>'
    )


def _frame(
    title: str,
    body: list[str],
    ticks: Sequence[float],
    y_of: Callable[[float], float],
    x_labels: Sequence[tuple[float, str]],
) -> str:
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for t in ticks:
        y = y_of(t)
        parts.append(
            f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        parts.append(
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>'
        )
    for x, label in x_labels:
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT - MARGIN_BOTTOM + 16}" text-anchor="middle" class="tick">{escape(label)}</text>'
        )
    parts.extend(body)
    parts.append("</svg>")
    return "".join(parts)


def _time_axis(
    moments: Sequence[datetime],
) -> tuple[float, float, Callable[[datetime], float], list[tuple[float, str]]]:
    lo = min(m.timestamp() for m in moments)
    hi = max(m.timestamp() for m in moments)
    if hi - lo < 60:
        lo, hi = lo - 30, hi + 30
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT

    def x_of(m: datetime) -> float:
        return MARGIN_LEFT + (m.timestamp() - lo) / (hi - lo) * plot_w

    fmt = "%H:%M:%S" if hi - lo < 600 else "%H:%M" if hi - lo < 2 * 86400 else "%Y-%m-%d"
    labels = []
    for i in range(5):
        t = lo + (hi - lo) * i / 4
        labels.append((MARGIN_LEFT + plot_w * i / 4, datetime.fromtimestamp(t, UTC).strftime(fmt)))
    return lo, hi, x_of, labels


def _legend(names: Sequence[str]) -> str:
    items = "".join(
        f'<span class="key"><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}"></span>'
        f"{escape(name)}</span>"
        for i, name in enumerate(names)
    )
    return f'<div class="legend">{items}</div>'


def line_chart(title: str, series: Mapping[str, Sequence[tuple[datetime, float]]], unit: str = "") -> str:
    """Lines over time, one per series (points marked, each with a tooltip)."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return _empty(f"{title}: no data yet")
    _, _, x_of, labels = _time_axis([p[0] for p in points])
    ticks = nice_ticks(max(p[1] for p in points))
    top = ticks[-1] or 1.0
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def y_of(v: float) -> float:
        return MARGIN_TOP + plot_h * (1 - v / top)

    body = []
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        ordered = sorted(pts)
        path = " ".join(f"{x_of(m):.1f},{y_of(v):.1f}" for m, v in ordered)
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for m, v in ordered:
            body.append(
                f'<circle cx="{x_of(m):.1f}" cy="{y_of(v):.1f}" r="3" fill="{color}">'
                f"<title>{escape(name)}: {_fmt(v)}{escape(unit)} at {m:%Y-%m-%d %H:%M} UTC</title></circle>"
            )
    return _frame(title, body, ticks, y_of, labels) + _legend(list(series))


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars, one per label (longest first as given)."""
    if not bars:
        return _empty(f"{title}: nothing to show")
    row_h, label_w = 22, 300
    height = MARGIN_TOP + row_h * len(bars) + 24
    top = max(v for _, v in bars) or 1.0
    plot_w = WIDTH - label_w - 80
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
    ]
    for i, (label, value) in enumerate(bars):
        y = MARGIN_TOP + i * row_h
        w = max(1.0, plot_w * value / top) if value else 0.0
        short = label if len(label) <= 48 else label[:47] + "…"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="tick">{escape(short)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{PALETTE[0]}">'
            f"<title>{escape(label)}: {_fmt(value)}{escape(unit)}</title></rect>"
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" class="tick">{_fmt(value)}{escape(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
