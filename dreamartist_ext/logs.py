"""Training loss log (CSV) and its plot (PNG drawn with matplotlib, which the host has through gradio)."""
from __future__ import annotations

import csv
import io
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

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
_SIZE_INCHES, _DPI = (9.6, 5.4), 100  # 960 x 540 px
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

    png = _render(series, average, average_window, log_scale, title=title)
    return atomic_write(png_path, lambda temp: temp.write_bytes(png))


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


def _render(series: Mapping[str, list[tuple[float, float]]], average: list[tuple[float, float]],
            average_window: int, log_scale: bool, *, title: str) -> bytes:
    # The object API, not pyplot: no global figure state, safe in the host's threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_SIZE_INCHES, dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (field, points) in enumerate(series.items()):
        colour = _PALETTE[index % len(_PALETTE)]
        faded = index == 0 and bool(average)  # the raw first field under its moving average
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, color=colour, linewidth=1.0, alpha=0.35 if faded else 1.0,
                      marker="o" if len(points) < 10 else None, markersize=3, label=f"{field} (last {ys[-1]:.4g})")
    if average:
        xs, ys = zip(*average)
        axes.plot(xs, ys, color=_PALETTE[0], linewidth=2.0, label=f"{next(iter(series))}, mean of {average_window}")
    if log_scale:
        axes.set_yscale("log")
    if not any(series.values()):
        axes.text(0.5, 0.5, "no finite values yet", transform=axes.transAxes, ha="center", va="center",
                  color="#777777")
    else:
        axes.legend(loc="upper right", fontsize="small")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, color="#e6e6e6")
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a name in a script the default font lacks shows as boxes, not a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.tight_layout()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
