"""A PNG of a benchmark's ratio rows: one panel of horizontal bars per group.

The benchmarks report speed as ratios to a peer measured in the same run
(milliseconds on a shared machine move with its load; ratios much less), so
their charts show those ratios, each panel with the line that a ratio is
read against (parity or a target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Panel:
    """One group of ratio bars.

    Attributes:
      title: the panel's title (a case, a distribution).
      labels: one per bar, top to bottom.
      ratios: one per label.
      xlabel: what the ratios are (e.g. "time / fused kernel").
      line: where to draw the reference line (1 for parity, or a target).
      line_label: the reference line's legend text.
      log: a logarithmic axis, for ratios spanning orders of magnitude; its
        bars start at 1.
    """

    title: str
    labels: Sequence[str]
    ratios: Sequence[float]
    xlabel: str
    line: float = 1.0
    line_label: str = "parity"
    log: bool = False


def write_png(panels: Sequence[Panel], path: str, title: str) -> None:
    """Writes `panels` side by side, under `title`, to the PNG file `path`.

    Args:
      panels: at least one panel.
      path: the file to write.
      title: the figure's title (what was measured, and where).

    Raises:
      ImportError: matplotlib is not installed (requirements-bench.txt has it).
      OSError: `path` cannot be written.
    """
    # The object API, not pyplot: no global figure state and no GUI backend
    # (a Figure renders PNG with Agg), as `tpu-embed-adam inspect --plot` does.
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    panel_height = 1.0 + 0.35 * max(len(p.labels) for p in panels)
    figure = Figure(figsize=(5.5 * columns, 0.6 + panel_height * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, panel in zip(axes, panels, strict=False):
        # On a log axis a bar has no natural start: it grows from 1 (parity)
        # to its ratio, left for faster, right for slower.
        base = 1.0 if panel.log else 0.0
        bars = ax.barh(
            list(panel.labels), [r - base for r in panel.ratios], left=base, color="C0"
        )
        ax.bar_label(bars, labels=[f"{r:.2f}" for r in panel.ratios], padding=2, fontsize=8)
        ax.axvline(panel.line, color="C3", linestyle="--", label=panel.line_label)
        if panel.log:
            ax.set_xscale("log")
            # Minor-tick labels of a log axis over a decade or two overlap.
            ax.xaxis.set_minor_formatter(NullFormatter())
            # At least 0.5-2x in view, so that ratios near 1 look near 1.
            ax.set_xlim(min(0.5, min(panel.ratios) / 1.5), max(2.0, max(panel.ratios) * 1.5))
        ax.set_xlabel(panel.xlabel)
        ax.set_title(panel.title)
        ax.invert_yaxis()
        if not panel.log:
            ax.margins(x=0.15)  # room for the value labels
        ax.legend(loc="best", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
