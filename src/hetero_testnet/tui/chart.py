"""The dashboard's loss chart: one line per tier, drawn in braille dots, and the tier colours it uses.

Pure text: `draw_loss_chart` returns Rich `Text` lines for a given size, so it is tested like any
other render function; `LossChart` draws it at the size Rich gives the panel. A braille cell is
2 dot columns x 4 dot rows, so a `w` x `h` cell plot has `2w` x `4h` dots.
"""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

TIER_COLORS = ("cyan", "magenta", "yellow", "green", "blue", "red", "bright_white")
# Braille cell: 2 dot columns x 4 dot rows; bit for dot (column, row).
_BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))

Series = dict[int, list[tuple[int, float]]]
"""tier -> [(step, loss)], steps increasing."""


def tier_color(tier: int) -> str:
    return TIER_COLORS[tier % len(TIER_COLORS)]


def draw_loss_chart(series: Series, *, width: int, height: int, x_max: int | None = None) -> list[Text]:
    """A braille line chart of loss over steps, one coloured line per tier, in `width` x `height` cells.

    Rows: the plot (y labels on the left), one row of step labels, one legend row. Several steps that
    fall into one dot column are averaged; consecutive dots are joined so a line never breaks.
    """
    points = [(s, v) for pts in series.values() for s, v in pts]
    if not points or height < 4 or width < 20:
        return [Text("waiting for the first committed step…", style="dim")]
    x0 = min(s for s, _ in points)
    x1 = max([s for s, _ in points] + ([x_max] if x_max is not None else []))
    x1 = max(x1, x0 + 1)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    labels = [f"{hi:.2f}", f"{(lo + hi) / 2:.2f}", f"{lo:.2f}"]
    label_w = max(len(s) for s in labels) + 1
    canvas = _Canvas(width - label_w - 1, height - 2)
    for tier in sorted(series):
        buckets: dict[int, list[float]] = {}
        for s, v in series[tier]:
            px = round((s - x0) / (x1 - x0) * (canvas.width_px - 1))
            buckets.setdefault(px, []).append(v)
        canvas.polyline([(px, round((hi - sum(vs) / len(vs)) / (hi - lo) * (canvas.height_px - 1)))
                         for px, vs in sorted(buckets.items())], tier_color(tier))
    return [*canvas.rows_with_labels(labels, label_w), _x_axis(x0, x1, canvas.cols, label_w),
            _legend(series, label_w)]


class _Canvas:
    """`cols` x `rows` braille cells; a cell takes the colour of the last dot set in it."""

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.width_px, self.height_px = cols * 2, rows * 4
        self.masks = [[0] * cols for _ in range(rows)]
        self.colors: list[list[str]] = [[""] * cols for _ in range(rows)]

    def dot(self, x: int, y: int, color: str) -> None:
        row, col = y // 4, x // 2
        self.masks[row][col] |= _BRAILLE_BITS[x % 2][y % 4]
        self.colors[row][col] = color

    def polyline(self, points: list[tuple[int, int]], color: str) -> None:
        """Dots at `points` (in dots, y down), each joined to the previous by a straight run of dots."""
        prev = None
        for px, py in points:
            if prev is None:
                self.dot(px, py, color)
            else:
                n = max(abs(px - prev[0]), abs(py - prev[1]), 1)
                for i in range(1, n + 1):
                    self.dot(round(prev[0] + (px - prev[0]) * i / n), round(prev[1] + (py - prev[1]) * i / n), color)
            prev = (px, py)

    def rows_with_labels(self, labels: list[str], label_w: int) -> list[Text]:
        """The plot rows, with the top/middle/bottom y labels (`labels`, high to low) and their ticks."""
        label_rows = {0: labels[0], self.rows // 2: labels[1], self.rows - 1: labels[2]}
        out = []
        for row in range(self.rows):
            text = Text(label_rows.get(row, "").rjust(label_w - 1) + " ", style="dim")
            text.append("┤" if row in label_rows else "│", style="dim")
            for col in range(self.cols):
                mask = self.masks[row][col]
                text.append(chr(0x2800 + mask) if mask else " ", style=self.colors[row][col] or None)
            out.append(text)
        return out


def _x_axis(x0: int, x1: int, plot_w: int, label_w: int) -> Text:
    """First, middle and last step under the plot."""
    axis = [" "] * plot_w
    for value, pos in ((x0, 0), ((x0 + x1) // 2, plot_w // 2), (x1, plot_w - 1)):
        label = str(value)
        start = min(max(0, pos - len(label) // 2), plot_w - len(label))
        axis[start:start + len(label)] = label
    return Text("step".rjust(label_w - 1) + "  " + "".join(axis), style="dim")


def _legend(series: Series, label_w: int) -> Text:
    """One entry per tier, in its colour, with its latest loss."""
    legend = Text(" " * (label_w + 1))
    for tier in sorted(series):
        pts = series[tier]
        legend.append("━━ ", style=tier_color(tier))
        legend.append(f"tier {tier}: {pts[-1][1]:.4f}   " if pts else f"tier {tier}   ")
    legend.no_wrap, legend.overflow = True, "ellipsis"
    return legend


class LossChart:
    """Renderable wrapper: draws `draw_loss_chart` at the size Rich gives it (copies the data first)."""

    def __init__(self, series: Series, x_max: int | None) -> None:
        self.series = {t: list(p) for t, p in series.items()}
        self.x_max = x_max

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from draw_loss_chart(self.series, width=options.max_width, height=options.height or 12,
                                   x_max=self.x_max)
