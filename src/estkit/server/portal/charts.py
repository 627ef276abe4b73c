"""Bar charts as inline SVG, drawn by estkit: no JavaScript and no library.

Pure: values in, markup out. Every number is also in the chart's ``<title>``
elements and, on the page, in a table beside it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH = 640
HEIGHT = 180
_TOP = 16
_BOTTOM = 24
_LEFT = 36


@dataclass(frozen=True, slots=True)
class Bar:
    label: str  # under the bar, for some bars (every ``label_every``-th)
    title: str  # the bar's tooltip and accessible text
    value: int


def days(start: dt.date, count: int) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range(count)]


def daily_bars(counts: Mapping[dt.date, int], span: Sequence[dt.date]) -> list[Bar]:
    """One bar per day of ``span`` (a day without rows is a bar of 0)."""
    return [
        Bar(label=day.strftime("%d %b"), title=f"{day.isoformat()}: {counts.get(day, 0)}",
            value=counts.get(day, 0))
        for day in span
    ]  # fmt: skip


def _nice_max(value: int) -> int:
    """The axis top: 1, 2 or 5 times a power of ten, at least ``value``."""
    top = 1
    while True:
        for step in (1, 2, 5):
            if top * step >= value:
                return top * step
        top *= 10


def bar_chart(bars: Sequence[Bar], *, title: str, label_every: int = 5) -> Markup:
    """An accessible SVG bar chart (``role="img"`` with a title); escaped text only."""
    columns = [Column(b.label, b.title, ((None, b.value),)) for b in bars]
    return stacked_chart(columns, title=title, label_every=label_every)


@dataclass(frozen=True, slots=True)
class Column:
    """One bar of stacked segments: (series index or None, value), bottom first."""

    label: str
    title: str
    segments: tuple[tuple[int | None, int], ...]

    @property
    def total(self) -> int:
        return sum(value for _, value in self.segments)


# Stacked series beyond this many share the last colour: ``stack_series`` folds them.
SERIES_COLOURS = 8


def stack_series(
    counts: Mapping[tuple[dt.date, str], int], span: Sequence[dt.date]
) -> tuple[list[str], list[Column]]:
    """Counts per (day, series) as one stacked column per day of ``span``: the series
    (most counted first; past ``SERIES_COLOURS - 1`` of them the rest fold into the
    last, ``"other"``) and the columns."""
    totals: dict[str, int] = {}
    for (_, name), n in counts.items():
        totals[name] = totals.get(name, 0) + n
    ranked = sorted(totals, key=lambda name: (name == "other", -totals[name], name))
    if len(ranked) > SERIES_COLOURS:
        ranked = [*ranked[: SERIES_COLOURS - 1], "other"]
    index = {name: i for i, name in enumerate(ranked)}
    fold = index.get("other", len(ranked) - 1)
    columns = []
    for day in span:
        values = [0] * len(ranked)
        for (when, name), n in counts.items():
            if when == day:
                values[index.get(name, fold)] += n
        parts = ", ".join(f"{ranked[i]} {v}" for i, v in enumerate(values) if v)
        columns.append(
            Column(
                label=day.strftime("%d %b"),
                title=f"{day.isoformat()}: {sum(values)}" + (f" ({parts})" if parts else ""),
                segments=tuple((i, v) for i, v in enumerate(values) if v),
            )
        )
    return ranked, columns


def stacked_chart(columns: Sequence[Column], *, title: str, label_every: int = 5) -> Markup:
    """An accessible SVG chart of stacked bars (``role="img"`` with a title); a segment
    of series ``i`` has the class ``s<i>``. Escaped text only."""
    top = _nice_max(max((c.total for c in columns), default=0))
    plot_w = WIDTH - _LEFT - 4
    plot_h = HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(columns), 1)
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in (0, top // 2, top) if top >= 2 else (0, top):
        y = _TOP + plot_h - plot_h * tick / top
        out.append(
            f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - 4}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    for i, column in enumerate(columns):
        x = _LEFT + i * slot + slot * 0.15
        base: float = _TOP + plot_h
        for series, value in column.segments or ((None, 0),):
            h = plot_h * value / top
            base -= h
            kind = "bar" if series is None else f"bar s{series}"
            out.append(
                f'<rect class="{kind}" x="{x:.1f}" y="{base:.1f}" width="{slot * 0.7:.1f}" '
                f'height="{h:.1f}"><title>{escape(column.title)}</title></rect>'
            )
        if i % label_every == 0:
            out.append(
                f'<text class="axis" x="{x + slot * 0.35:.1f}" y="{HEIGHT - 6}" '
                f'text-anchor="middle">{escape(column.label)}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 - every text in it went through escape()
