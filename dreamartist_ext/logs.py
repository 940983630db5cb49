"""Training loss log (CSV) and its plot (PNG drawn with PIL; the host has no matplotlib to rely on)."""
from __future__ import annotations

import csv
import functools
import io
import math
import numbers
import os
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

# ---------------------------------------------------------------------------------------------------------------
# CSV log


class LossLog:
    """A CSV file with columns ``step, <fields...>``, appended one flushed row per logged step.

    Opening an existing log keeps its rows (resume); fields it lacks are added as new columns, and a last line
    cut short by a crash is dropped. One process writes a log; any number may read it.
    """

    def __init__(self, csv_path: str | os.PathLike[str], fields: Sequence[str]):
        self.path = Path(csv_path)
        requested = _checked_fields(fields)
        if self.path.is_file() and self.path.stat().st_size > 0:
            header, rows, cut_short = self._read_table()
            self.columns = header + [field for field in requested if field not in header]
            if self.columns != header or cut_short:
                self._rewrite(self.columns, rows)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.columns = ["step", *requested]
            self._rewrite(self.columns, [])

    @property
    def fields(self) -> list[str]:
        return self.columns[1:]

    def append(self, step: int, values: Mapping[str, float]) -> None:
        """Log one row; fields missing from ``values`` are left empty. Flushed and fsynced at once."""
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ValueError(f"{self.path}: unknown loss fields {unknown}; this log has {self.fields}")
        cells = [str(int(step))] + [_format_value(values.get(field)) for field in self.fields]
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle, lineterminator="\n").writerow(cells)
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows with a step greater than ``step`` (resuming from a checkpoint taken at ``step``)."""
        header, rows, _ = self._read_table()
        self._rewrite(header, [row for row in rows if int(row[0]) <= step])

    def read(self) -> list[dict[str, float]]:
        """All complete rows: 'step' as int, the fields as float (NaN where a cell is empty)."""
        header, rows, _ = self._read_table()
        return [
            {"step": int(row[0]), **{field: _parse_value(cell) for field, cell in zip(header[1:], row[1:])}}
            for row in rows
        ]

    def _read_table(self) -> tuple[list[str], list[list[str]], bool]:
        """(header, rows padded to the header's width, whether a cut-short last line was left out)."""
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        # A row is written with a single write() ending in '\n'; without it the process died mid-row.
        cut_short = bool(text) and not text.endswith("\n")
        if cut_short:
            lines = lines[:-1]
        table = [row for row in csv.reader(lines) if row]
        if not table or table[0][0] != "step":
            raise ValueError(f"{self.path}: not a loss log (its first column must be 'step')")
        header, rows = table[0], table[1:]
        for number, row in enumerate(rows, start=2):
            if len(row) > len(header) or not row[0].lstrip("-").isdigit():
                raise ValueError(f"{self.path}: line {number} is not a loss row: {row}")
        return header, [row + [""] * (len(header) - len(row)) for row in rows], cut_short

    def _rewrite(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        atomic_write(self.path, lambda temp: temp.write_bytes(data))


def _checked_fields(fields: Sequence[str]) -> list[str]:
    if isinstance(fields, str):
        raise TypeError("fields must be a sequence of names, not a single string")
    checked: list[str] = []
    for field in fields:
        if field == "step":
            continue  # always the first column
        if not field or any(character in field for character in ',"\r\n'):
            raise ValueError(f"loss field name {field!r} is empty or contains a comma, quote or newline")
        if field in checked:
            raise ValueError(f"loss field {field!r} given twice")
        checked.append(field)
    return checked


def _format_value(value: float | None) -> str:
    # repr() of a float is the shortest text that reads back to the same float.
    return "" if value is None else repr(float(value))


def _parse_value(cell: str) -> float:
    return float(cell) if cell else math.nan


# ---------------------------------------------------------------------------------------------------------------
# Plot

_WIDTH, _HEIGHT = 960, 540
_SUPERSAMPLE = 3  # lines are drawn 3x larger and scaled down: anti-aliasing without matplotlib
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 84, 28, 64, 64
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_BACKGROUND, _GRID, _AXIS, _TEXT, _MUTED = "#ffffff", "#e6e6e6", "#555555", "#222222", "#777777"
_LOG_SCALE_DECADES = 2.0  # switch to a log axis when the values span more than this many decades


def plot_losses(
    rows: Sequence[Mapping[str, float]],
    png_path: str | os.PathLike[str],
    *,
    title: str,
    fields: Sequence[str] = ("loss",),
    log_scale: bool | None = None,
) -> Path:
    """Draw ``fields`` against 'step' as a PNG: one line per field plus a moving average of the first.

    Rows whose value is NaN, infinite or missing are skipped for that field. ``log_scale`` None chooses a log
    axis when all values are positive and span more than two decades. Written atomically.
    """
    series = {field: _finite_points(rows, field) for field in fields}
    all_values = [y for points in series.values() for _, y in points]
    if log_scale is None:
        log_scale = bool(all_values) and min(all_values) > 0 and max(all_values) / min(all_values) > 10**_LOG_SCALE_DECADES
    if log_scale:
        series = {field: [(x, y) for x, y in points if y > 0] for field, points in series.items()}

    first = fields[0] if fields else None
    average_window = _average_window(len(series[first])) if first else 0
    average = _moving_average(series[first], average_window, log_scale) if average_window else []

    axes = _Axes.fit(series, log_scale)
    image = _render(series, average, average_window, axes, title=title, fields=fields)
    return atomic_write(png_path, lambda temp: image.save(temp, format="PNG"))


def _finite_points(rows: Sequence[Mapping[str, float]], field: str) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        step, value = row.get("step"), row.get(field)
        # numbers.Real takes numpy scalars too; None, strings and tensors are not values to plot.
        if isinstance(step, numbers.Real) and isinstance(value, numbers.Real):
            if math.isfinite(step) and math.isfinite(value):
                points.append((float(step), float(value)))
    return points


def _average_window(count: int) -> int:
    # About 1/20 of the run, at least 5 points; below 10 points an average says nothing a glance doesn't.
    return 0 if count < 10 else min(500, max(5, round(count / 20)))


def _moving_average(points: list[tuple[float, float]], window: int, log_scale: bool) -> list[tuple[float, float]]:
    """Centred moving average (no lag; the window shrinks at both ends). Geometric on a log axis."""
    values = [math.log10(y) if log_scale else y for _, y in points]
    prefix_sums = [0.0]
    for value in values:
        prefix_sums.append(prefix_sums[-1] + value)
    half = window // 2
    averaged = []
    for index, (x, _) in enumerate(points):
        start, stop = max(0, index - half), min(len(points), index + half + 1)
        mean = (prefix_sums[stop] - prefix_sums[start]) / (stop - start)
        averaged.append((x, 10**mean if log_scale else mean))
    return averaged


class _Axes:
    """Data ranges, ticks and the data -> pixel transform of the plot area."""

    def __init__(self, x_range, y_range, x_ticks, y_ticks, log_scale):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range  # in log10 units when log_scale
        self.x_ticks, self.y_ticks, self.log_scale = x_ticks, y_ticks, log_scale
        self.left, self.top = _MARGIN_LEFT, _MARGIN_TOP
        self.right, self.bottom = _WIDTH - _MARGIN_RIGHT, _HEIGHT - _MARGIN_BOTTOM

    @classmethod
    def fit(cls, series: Mapping[str, list[tuple[float, float]]], log_scale: bool) -> _Axes:
        xs = [x for points in series.values() for x, _ in points]
        ys = [y for points in series.values() for _, y in points]
        x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x_high - x_low < 1:  # a single step: give it some room
            x_low, x_high = x_low - 1, x_high + 1
        x_step = _nice_step(x_low, x_high, 8, integer=True)
        x_low = math.floor(x_low / x_step) * x_step  # start at a tick: the axis reads from its left end
        x_ticks = _nice_ticks(x_low, x_high, x_step, integer=True)

        if log_scale:
            logs = [math.log10(y) for y in ys] or [0.0, 1.0]
            low, high = math.floor(min(logs)), math.ceil(max(logs))
            if high == low:
                high += 1
            y_ticks = _log_ticks(low, high)
            return cls((x_low, x_high), (low, high), x_ticks, y_ticks, True)

        y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_high - y_low <= 1e-12 * max(1.0, abs(y_high)):  # flat line
            pad = abs(y_high) * 0.1 or 1.0
            y_low, y_high = y_low - pad, y_high + pad
        # A little air above and below the data (not below zero for a non-negative loss), then extend to the
        # enclosing ticks, so the axis starts and ends on a labelled value.
        pad = 0.04 * (y_high - y_low)
        y_low, y_high = (y_low - pad if y_low - pad >= 0 or y_low < 0 else 0.0), y_high + pad
        y_step = _nice_step(y_low, y_high, 7)
        y_low = math.floor(y_low / y_step + 1e-9) * y_step
        y_high = math.ceil(y_high / y_step - 1e-9) * y_step
        y_ticks = _nice_ticks(y_low, y_high, y_step)
        return cls((x_low, x_high), (y_low, y_high), x_ticks, y_ticks, False)

    def pixel(self, x: float, y: float, scale: int = 1) -> tuple[float, float]:
        t = math.log10(y) if self.log_scale else y
        px = self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)
        py = self.bottom - (t - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)
        return px * scale, py * scale


def _nice_step(low: float, high: float, target: int, integer: bool = False) -> float:
    """A 1/2/5 x 10^k tick spacing giving about ``target`` ticks over [low, high] (at least 1 if ``integer``)."""
    raw = (high - low) / max(1, target - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda candidate: abs(math.log(candidate / raw)))
    return max(1.0, round(step)) if integer else step


def _nice_ticks(low: float, high: float, step: float, integer: bool = False) -> list[tuple[float, str]]:
    """(value, label) of every multiple of ``step`` in [low, high]."""
    decimals = 0 if integer else max(0, -math.floor(math.log10(step) + 1e-9))
    first = math.ceil(low / step - 1e-9)
    ticks = []
    for index in range(first, first + 100):
        value = index * step
        if value > high + step * 1e-9:
            break
        ticks.append((value, _tick_label(value, decimals, step)))
    return ticks


def _tick_label(value: float, decimals: int, step: float) -> str:
    if abs(value) < step * 1e-6:
        return "0"
    if decimals > 5 or abs(value) >= 1e6:
        return f"{value:.2g}"
    if decimals == 0 and abs(value) >= 10000:
        return f"{value:,.0f}"
    return f"{value:.{decimals}f}"


def _log_ticks(low: int, high: int) -> list[tuple[float, str]]:
    ticks = []
    for exponent in range(low, high + 1):
        ticks.append((exponent, _decade_label(exponent)))
        if high - low <= 2 and exponent < high:  # few decades: label 2x and 5x too
            for multiple in (2, 5):
                ticks.append((exponent + math.log10(multiple), f"{multiple * 10.0**exponent:g}"))
    return ticks


def _decade_label(exponent: int) -> str:
    return f"{10.0**exponent:g}" if -3 <= exponent <= 4 else f"1e{exponent}"


def _render(series, average, average_window, axes: _Axes, *, title: str, fields: Sequence[str]) -> Image.Image:
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (_WIDTH * s, _HEIGHT * s), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    # Grid lines are snapped to whole output pixels so they stay crisp after the downscale.
    for value, _ in axes.y_ticks:
        row = round(axes.pixel(axes.x0, 10**value if axes.log_scale else value)[1])
        draw.rectangle([axes.left * s, row * s, axes.right * s, row * s + s - 1], fill=_GRID)
    for value, _ in axes.x_ticks:
        column = round(axes.pixel(value, _any_y(axes))[0])
        draw.rectangle([column * s, axes.top * s, column * s + s - 1, axes.bottom * s], fill=_GRID)

    colours = {field: _PALETTE[index % len(_PALETTE)] for index, field in enumerate(fields)}
    # The first field goes on top, unless its moving average does: then its noisy raw line goes underneath.
    order = [*fields[1:], *fields[:1]][::-1] if average else [*fields[1:], *fields[:1]]
    for field in order:
        points = series[field]
        faded = bool(average) and field == fields[0]
        colour = _blend(colours[field], 0.4) if faded else colours[field]
        _draw_series(draw, axes, points, colour, width=1.6 * s, markers=len(points) <= 40)
    if average:
        _draw_series(draw, axes, average, _darken(colours[fields[0]]), width=2.6 * s, markers=False)

    # Axis lines: left and bottom only.
    draw.rectangle([axes.left * s - s + 1, axes.top * s, axes.left * s, axes.bottom * s + s - 1], fill=_AXIS)
    draw.rectangle([axes.left * s, axes.bottom * s, axes.right * s, axes.bottom * s + s - 1], fill=_AXIS)

    image = canvas.resize((_WIDTH, _HEIGHT), Image.LANCZOS)
    _draw_text(image, series, average, average_window, axes, colours, title=title, fields=fields)
    return image


def _any_y(axes: _Axes) -> float:
    return 10**axes.y0 if axes.log_scale else axes.y0


def _draw_series(draw, axes: _Axes, points, colour: str, *, width: float, markers: bool) -> None:
    s = _SUPERSAMPLE
    pixels = [axes.pixel(x, y, s) for x, y in points]
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=round(width), joint="curve")
    if markers or len(pixels) == 1:
        radius = 2.6 * s
        for px, py in pixels:
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour)


def _draw_text(image, series, average, average_window, axes: _Axes, colours, *, title, fields) -> None:
    draw = ImageDraw.Draw(image)
    small, regular, bold = _font(12), _font(13), _font(17, bold=True)

    for value, label in axes.y_ticks:
        row = round(axes.pixel(axes.x0, 10**value if axes.log_scale else value)[1])
        draw.line([axes.left - 5, row, axes.left - 1, row], fill=_AXIS)
        _text(draw, (axes.left - 9, row), label, small, _TEXT, anchor="rm")
    for value, label in axes.x_ticks:
        column = round(axes.pixel(value, _any_y(axes))[0])
        draw.line([column, axes.bottom + 1, column, axes.bottom + 5], fill=_AXIS)
        _text(draw, (column, axes.bottom + 9), label, small, _TEXT, anchor="mt")

    _text(draw, ((axes.left + axes.right) / 2, _HEIGHT - 18), "step", regular, _TEXT, anchor="ms")
    y_label = (fields[0] if len(fields) == 1 else "value") + (" (log scale)" if axes.log_scale else "")
    _vertical_text(image, (16, (axes.top + axes.bottom) / 2), y_label, regular)

    _text(draw, (axes.left, 28), title, bold, _TEXT, anchor="ls")
    summary = _summary(series, average, fields)
    if summary:
        _text(draw, (axes.right, 28), summary, small, _MUTED, anchor="rs")

    if not any(series.values()):
        _text(draw, ((axes.left + axes.right) / 2, (axes.top + axes.bottom) / 2), "no data yet", regular, _MUTED, "mm")
        return
    entries = [(field, colours[field], 2) for field in fields]
    if average:
        entries[0] = (fields[0], _blend(colours[fields[0]], 0.4), 2)
        entries.append((f"{fields[0]}, {average_window}-point moving average", _darken(colours[fields[0]]), 3))
    _legend(draw, axes, entries, small, series, average)


def _summary(series, average, fields) -> str:
    points = series[fields[0]] if fields else []
    if not points:
        return ""
    step, value = points[-1]
    text = f"step {step:,.0f}   {fields[0]} {value:.4g}"
    if average:
        text += f"   (avg {average[-1][1]:.4g})"
    return text


def _legend(draw, axes: _Axes, entries, font, series, average) -> None:
    line_length, gap, padding, spacing, inset = 22, 8, 8, 18, 10
    text_width = max(_text_size(draw, label, font)[0] for label, _, _ in entries)
    box_width = padding * 2 + line_length + gap + text_width
    box_height = padding * 2 + spacing * len(entries) - 4
    corners = [  # preference order: top right, top left, bottom right, bottom left
        (axes.right - box_width - inset, axes.top + inset),
        (axes.left + inset, axes.top + inset),
        (axes.right - box_width - inset, axes.bottom - box_height - inset),
        (axes.left + inset, axes.bottom - box_height - inset),
    ]
    pixels = [axes.pixel(x, y) for points in [*series.values(), average] for x, y in points]

    def covered(corner):  # how many data points the box would hide
        x0, y0 = corner
        return sum(1 for px, py in pixels if x0 - 4 <= px <= x0 + box_width + 4 and y0 - 4 <= py <= y0 + box_height + 4)

    x0, y0 = min(corners, key=covered)  # min() keeps the first of equals: the preferred corner
    draw.rectangle([x0, y0, x0 + box_width, y0 + box_height], fill="#ffffff", outline="#cccccc")
    for index, (label, colour, width) in enumerate(entries):
        row = y0 + padding + spacing * index + 7
        draw.line([x0 + padding, row, x0 + padding + line_length, row], fill=colour, width=width)
        _text(draw, (x0 + padding + line_length + gap, row), label, font, _TEXT, anchor="lm")


def _text(draw, xy, text, font, fill, anchor) -> None:
    if isinstance(font, ImageFont.FreeTypeFont):
        draw.text(xy, text, font=font, fill=fill, anchor=anchor)
        return
    # Bitmap fallback font: no anchor support, so place the box by hand.
    width, height = _text_size(draw, text, font)
    x, y = xy
    x -= {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    y -= {"t": 0, "m": height / 2, "s": height, "b": height}[anchor[1]]
    draw.text((x, y), text, font=font, fill=fill)


def _text_size(draw, text, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _vertical_text(image: Image.Image, center, text: str, font) -> None:
    width, height = _text_size(ImageDraw.Draw(image), text, font)
    label = Image.new("RGB", (width + 4, height + 8), _BACKGROUND)
    _text(ImageDraw.Draw(label), (2, (height + 8) / 2), text, font, _TEXT, anchor="lm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (round(center[0] - rotated.width / 2), round(center[1] - rotated.height / 2)))


_FONT_FILES = {
    False: ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf", "LiberationSans-Regular.ttf", "Helvetica.ttc"),
    True: ("DejaVuSans-Bold.ttf", "Arial Bold.ttf", "arialbd.ttf", "LiberationSans-Bold.ttf", "Helvetica.ttc"),
}


@functools.lru_cache(maxsize=None)
def _font(size: int, bold: bool = False):
    # Pillow searches the system font folders for these names; the bitmap default is the last resort.
    for name in _FONT_FILES[bold]:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _blend(colour: str, amount: float) -> str:
    """``colour`` mixed with white; ``amount`` is how much of the colour remains."""
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(channel * amount + 255 * (1 - amount)) for channel in (red, green, blue)]
    return "#" + "".join(f"{channel:02x}" for channel in mix)


def _darken(colour: str) -> str:
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(channel * 0.75):02x}" for channel in (red, green, blue))
