"""Where a chart's legend goes: beside the axes, never over the data.

Matplotlib's `loc="best"` picks the corner with the least data under it, and a sweep's curves
leave no empty corner: three constant learning rates are three lines across the whole width (the
legend covered the 0.0001 line). Beside the axes the legend covers nothing, whatever the data, and
with many learning rates it grows into columns instead of over the plot. The figure must use the
constrained layout, which shrinks the axes to make room for it.
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes

# A column of entries this long still fits beside a 4-inch-high chart at the small font.
ENTRIES_PER_COLUMN = 14


def legend_beside(axes: Axes) -> None:
    """The legend to the right of the axes, top-aligned, in as many columns as its entries need."""
    entries = len(axes.get_legend_handles_labels()[0])
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small",
                ncols=max(1, math.ceil(entries / ENTRIES_PER_COLUMN)))
