"""Numbers for tables and axes, histogram binning, and the inline SVG charts (line and bar) of the site."""

from __future__ import annotations

import html
import math

SERIES_COLOURS = ["#1f6fb4", "#e0601a", "#2a9d4b", "#8e44ad"]

# ----------------------------------------------------------------------------------------------
# Numbers


def format_number(value) -> str:
    """A number for a table cell: integers with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def nice_ticks(low: float, high: float, target: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (multiples of 1, 2, 2.5 or 5 times a power of ten) covering [low, high].

    About `target` intervals; with `integer` the step is at least 1 (for counts).
    """
    if high < low:
        low, high = high, low
    if high == low:  # a constant: a band around it (above it when it is 0, as for a fraction or count)
        pad = abs(low) * 0.1 or 1.0
        low, high = (low, high + pad) if low == 0 else (low - pad, high + pad)
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [float(f"{i * step:.12g}") for i in range(first, last + 1)]


def format_tick(value: float) -> str:
    """A tick label: short, without a trailing ".0" or float noise."""
    return f"{value:.6g}"


def histogram(values: list[float], bins: int = 20) -> tuple[list[float], list[int]]:
    """(bin edges, counts) of `values` over `bins` equal bins spanning them and 0."""
    low, high = min(0.0, min(values)), max(0.0, max(values))
    if high == low:
        high = low + 1.0
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [low + i * width for i in range(bins + 1)], counts


# ----------------------------------------------------------------------------------------------
# SVG charts


def esc(text) -> str:
    """`text` escaped for HTML/SVG text and attribute values."""
    return html.escape(str(text), quote=True)


def svg_text(x: float, y: float, text: str, anchor: str = "start", attributes: str = "") -> str:
    """An SVG <text> of 11px type at (x, y), escaped; `anchor` is its text-anchor."""
    return f'<text x="{x}" y="{y}" font-size="11" text-anchor="{anchor}"{attributes}>{esc(text)}</text>'


class Frame:
    """The axes of one chart: maps data to pixels and draws the frame, ticks, tick labels and title."""

    WIDTH, HEIGHT = 460, 260
    LEFT, RIGHT, TOP, BOTTOM = 62, 16, 30, 44

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], x_ticks: list[float],
                 y_ticks: list[float], extra_bottom: int = 0):
        self.x_low, self.x_high = x_range
        self.y_low, self.y_high = y_range
        if self.x_high == self.x_low:
            self.x_low, self.x_high = self.x_low - 1, self.x_high + 1
        self.x_ticks = [t for t in x_ticks if self.x_low - 1e-9 <= t <= self.x_high + 1e-9]
        self.y_ticks = [t for t in y_ticks if self.y_low - 1e-9 <= t <= self.y_high + 1e-9]
        self.height = self.HEIGHT + extra_bottom
        self.plot_bottom = self.HEIGHT - self.BOTTOM

    def x(self, value: float) -> float:
        """Pixel column of a data x."""
        span = self.WIDTH - self.LEFT - self.RIGHT
        return round(self.LEFT + (value - self.x_low) / (self.x_high - self.x_low) * span, 2)

    def y(self, value: float) -> float:
        """Pixel row of a data y."""
        span = self.plot_bottom - self.TOP
        return round(self.plot_bottom - (value - self.y_low) / (self.y_high - self.y_low) * span, 2)

    def axes(self, title: str, x_label: str, y_label: str) -> list[str]:
        """SVG elements of the title, grid lines, both axes, their ticks and labels."""
        left, right, top, bottom = self.LEFT, self.WIDTH - self.RIGHT, self.TOP, self.plot_bottom
        parts = [f'<text x="{left}" y="18" font-size="13" font-weight="bold">{esc(title)}</text>']
        for tick in self.y_ticks:
            y = self.y(tick)
            parts.append(f'<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#eee"/>')
            parts.append(f'<line x1="{left - 4}" y1="{y}" x2="{left}" y2="{y}" stroke="#333"/>')
            parts.append(svg_text(left - 6, y + 4, format_tick(tick), "end"))
        for tick in self.x_ticks:
            x = self.x(tick)
            parts.append(f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="#333"/>')
            parts.append(svg_text(x, bottom + 16, format_tick(tick), "middle"))
        parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
        parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>')
        parts.append(svg_text((left + right) / 2, bottom + 32, x_label, "middle"))
        if y_label:
            middle = (top + bottom) / 2
            parts.append(svg_text(14, middle, y_label, "middle", f' transform="rotate(-90 14 {middle})"'))
        return parts

    def svg(self, title: str, parts: list[str]) -> str:
        """The whole <svg> element (its <title> is the chart's title, for screen readers and tooltips)."""
        return (f'<svg class="chart" viewBox="0 0 {self.WIDTH} {self.height}" width="{self.WIDTH}" '
                f'height="{self.height}" role="img" font-family="sans-serif"><title>{esc(title)}</title>'
                + "".join(parts) + "</svg>")


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step",
               y_label: str = "") -> str:
    """An SVG line chart of named (x, y) series, with a legend when there are several."""
    points = [point for line in series.values() for point in line]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    legend_height = 18 if len(series) > 1 else 0
    frame = Frame((min(xs), max(xs)), (y_ticks[0], y_ticks[-1]), x_ticks, y_ticks, extra_bottom=legend_height)
    parts = frame.axes(title, x_label, y_label)
    for index, (name, line) in enumerate(series.items()):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        coordinates = " ".join(f"{frame.x(x)},{frame.y(y)}" for x, y in line)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{coordinates}"/>')
        if len(line) <= 40:  # sparse series (eval every N steps): mark each point
            parts.extend(f'<circle cx="{frame.x(x)}" cy="{frame.y(y)}" r="2.5" fill="{colour}">'
                         f'<title>{esc(name)} at {esc(format_tick(x))}: {esc(format_number(y))}</title></circle>'
                         for x, y in line)
        if legend_height:
            left = frame.LEFT + 130 * index
            row = frame.HEIGHT + 6
            parts.append(f'<line x1="{left}" y1="{row}" x2="{left + 18}" y2="{row}" stroke="{colour}" '
                         'stroke-width="2"/>')
            parts.append(svg_text(left + 22, row + 4, name))
    return frame.svg(title, parts)


def bar_chart(title: str, edges: list[float], counts: list[int], x_label: str, y_label: str = "count") -> str:
    """An SVG histogram: one bar per bin [edges[i], edges[i+1]) of height counts[i]."""
    if len(edges) != len(counts) + 1 or not counts:
        raise ValueError(f"a histogram needs one more edge than counts, got {len(edges)} edges, {len(counts)} counts")
    y_ticks = nice_ticks(0, max(max(counts), 1), integer=True)
    frame = Frame((edges[0], edges[-1]), (0, y_ticks[-1]), nice_ticks(edges[0], edges[-1]), y_ticks)
    parts = frame.axes(title, x_label, y_label)
    for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count:
            x, width = frame.x(low), round(max(frame.x(high) - frame.x(low) - 1, 1), 2)
            top = frame.y(count)
            tooltip = f"[{format_tick(low)}, {format_tick(high)}): {count:,}"
            parts.append(f'<rect x="{x}" y="{top}" width="{width}" height="{round(frame.plot_bottom - top, 2)}" '
                         f'fill="#1f6fb4"><title>{esc(tooltip)}</title></rect>')
    return frame.svg(title, parts)
