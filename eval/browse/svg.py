"""Numbers for tables and axes, histogram binning, and the SVG charts: line and bar charts inline in the site,
and the log-log plot of a scaling sweep (`python -m eval.scaling`, inlined by the site too)."""

from __future__ import annotations

import html
import math

SERIES_COLOURS = ["#1f6fb4", "#e0601a", "#2a9d4b", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#b8860b"]

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


def power_of_two_ticks(low: float, high: float) -> list[float]:
    """Powers of two within [low, high] (low > 0), thinned to at most 8."""
    exponents = list(range(math.ceil(math.log2(low) - 1e-9), math.floor(math.log2(high) + 1e-9) + 1))
    stride = max(1, math.ceil(len(exponents) / 8))
    return [2.0 ** e for e in exponents[::stride]] or [low, high]


def decimal_log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten within [low, high] (low > 0); all nine mantissas if that gives fewer
    than 3, and linear ticks if that still gives fewer than 2."""
    for mantissas, enough in (((1, 2, 5), 3), (range(1, 10), 2)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low * (1 - 1e-9) <= m * 10.0 ** e <= high * (1 + 1e-9)]
        if len(ticks) >= enough:
            return ticks
    return [tick for tick in nice_ticks(low, high) if low <= tick <= high and tick > 0]


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

    @staticmethod
    def scale(value: float) -> float:
        """Where a data value lies along an axis, before the axis maps it to pixels linearly."""
        return value

    def x(self, value: float) -> float:
        """Pixel column of a data x."""
        span = self.WIDTH - self.LEFT - self.RIGHT
        low, high = self.scale(self.x_low), self.scale(self.x_high)
        return round(self.LEFT + (self.scale(value) - low) / (high - low) * span, 2)

    def y(self, value: float) -> float:
        """Pixel row of a data y."""
        span = self.plot_bottom - self.TOP
        low, high = self.scale(self.y_low), self.scale(self.y_high)
        return round(self.plot_bottom - (self.scale(value) - low) / (high - low) * span, 2)

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

    def svg(self, title: str, parts: list[str], standalone: bool = False) -> str:
        """The whole <svg> element (its <title> is the chart's title, for screen readers and tooltips);
        `standalone` declares the SVG namespace, which a .svg file needs and inline SVG in HTML does not."""
        namespace = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
        return (f'<svg{namespace} class="chart" viewBox="0 0 {self.WIDTH} {self.height}" width="{self.WIDTH}" '
                f'height="{self.height}" role="img" font-family="sans-serif"><title>{esc(title)}</title>'
                + "".join(parts) + "</svg>")


class LogLogFrame(Frame):
    """A Frame whose two axes are logarithmic (positive data only)."""

    WIDTH, HEIGHT = 520, 320
    LEFT = 64
    scale = staticmethod(math.log)


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


def scaling_chart(title: str, dots: list[tuple[float, float, str, str]],
                  curves: list[tuple[str, bool, list[tuple[float, float]]]], groups: list[str],
                  x_label: str, y_label: str, note: str,
                  bars: list[tuple[float, float, float, str]] = ()) -> str:
    """A standalone log-log SVG of widths against a loss: dots (x, y, group, tooltip), curves (group,
    dashed, [(x, y) ...]) and vertical error bars (x, y low, y high, group; all positive) in their group's
    colour, a legend of `groups` (in order; the order picks the colours) and a `note` line below it. x
    ticks at powers of two, y ticks at 1, 2, 5 times powers of 10."""
    colour = {group: SERIES_COLOURS[index % len(SERIES_COLOURS)] for index, group in enumerate(groups)}
    xs = [x for x, _, _, _ in dots]
    ys = ([y for _, y, _, _ in dots] + [y for _, _, line in curves for _, y in line]
          + [y for _, low, high, _ in bars for y in (low, high)])
    x_range, y_range = (min(xs) / 1.15, max(xs) * 1.15), (min(ys) / 1.08, max(ys) * 1.08)
    legend = _legend_places(groups, LogLogFrame.LEFT, LogLogFrame.WIDTH - LogLogFrame.RIGHT)
    rows = max(row for _, _, row in legend) + 1 if legend else 1
    frame = LogLogFrame(x_range, y_range, power_of_two_ticks(*x_range), decimal_log_ticks(*y_range),
                        extra_bottom=34 + 16 * (rows - 1))
    parts = frame.axes(title, x_label, y_label)
    for group, dashed, line in curves:
        coordinates = " ".join(f"{frame.x(x)},{frame.y(y)}" for x, y in line)
        parts.append(f'<polyline fill="none" stroke="{colour[group]}" stroke-width="1.5"'
                     + (' stroke-dasharray="5,3"' if dashed else "") + f' points="{coordinates}"/>')
    for x, low, high, group in bars:
        parts.append(f'<line class="interval" x1="{frame.x(x)}" x2="{frame.x(x)}" y1="{frame.y(low)}" '
                     f'y2="{frame.y(high)}" stroke="{colour[group]}" stroke-width="1"/>')
    for x, y, group, tooltip in dots:
        parts.append(f'<circle cx="{frame.x(x)}" cy="{frame.y(y)}" r="3" fill="{colour[group]}">'
                     f'<title>{esc(tooltip)}</title></circle>')
    for group, left, row in legend:
        top = frame.HEIGHT + 8 + 16 * row
        parts.append(f'<circle cx="{left}" cy="{top}" r="3" fill="{colour[group]}"/>')
        parts.append(svg_text(left + 7, top + 4, group))
    parts.append(svg_text(frame.LEFT, frame.HEIGHT + 8 + 16 * (rows - 1) + 20, note))
    return frame.svg(title, parts, standalone=True)


def _legend_places(groups: list[str], left: int, right: int) -> list[tuple[str, float, int]]:
    """(group, x, row) of each legend entry: left to right, at least 62 px apart and wide enough for the
    name (about 6.5 px a character of 11px type), wrapping to a new row past `right`."""
    places, x, row = [], left, 0
    for group in groups:
        width = max(62, 6.5 * len(group) + 20)
        if x > left and x + width - 20 > right:
            x, row = left, row + 1
        places.append((group, x, row))
        x += width
    return places
