"""The sweep's charts: a PNG per curve over the epochs (a line per learning rate, a band over its
seeds) and the final validation accuracy against the learning rate."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tasks.reporting.legends import legend_beside

matplotlib.use("Agg")  # files only: no display on servers and workers

CURVES = (
    # The training figures are averages over each epoch's batches, taken while the model learned.
    ("train_loss", "Training loss (running average over each epoch)"),
    ("train_accuracy", "Training accuracy (running average over each epoch)"),
    ("val_loss", "Validation loss"),
    ("val_accuracy", "Validation accuracy"),
    ("lr", "Learning rate (at each epoch's end)"),
)
# Colours in matplotlib's default cycle (C0 to C9).
CYCLE_COLOURS = 10
# Rates drawn on a log axis once the largest is this many times the smallest.
LOG_RATE_SPAN = 10


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _curves_by_rate(trials: list[dict], key: str) -> dict[tuple[float, bool], list[list[float]]]:
    """(learning rate, stopped by a search) -> the curve of each of its seeds."""
    curves: dict[tuple[float, bool], list[list[float]]] = {}
    for t in trials:
        if t["history"] and all(key in r for r in t["history"]):  # models stored before 'lr' was recorded lack it
            curves.setdefault((t["learning_rate"], t["status"] == "stopped"), []).append([r[key] for r in t["history"]])
    return curves


def series_colours(count: int) -> list:
    """A colour per line: matplotlib's ten-colour cycle while it lasts; past ten, evenly spaced
    colours of one map, in the order of the rates (the cycle would repeat, and two rates would
    share a colour in the legend)."""
    if count <= CYCLE_COLOURS:
        return [f"C{n}" for n in range(count)]
    return [matplotlib.colormaps["turbo"](n / (count - 1)) for n in range(count)]


def rate_axis_scale(rates: list[float]) -> str:
    """'log' for rates that span LOG_RATE_SPAN or more, all above 0 (a linear axis piles the small
    ones onto 0); 'linear' otherwise, as for a schedule that ends at rate 0 (cosine)."""
    low, high = min(rates), max(rates)
    return "log" if low > 0 and high / low >= LOG_RATE_SPAN else "linear"


def curve_chart(trials: list[dict], key: str, title: str) -> Figure:
    """One curve over the epochs: a line per learning rate (the mean over its seeds, a band from
    their min to max)."""
    fig = Figure(figsize=(7.5, 4), dpi=100, layout="constrained")  # 1.5 inches of it for the legend
    ax = fig.subplots()
    series = sorted(_curves_by_rate(trials, key).items())
    for ((rate, stopped), runs), colour in zip(series, series_colours(len(series))):
        length = min(len(run) for run in runs)
        epochs = list(range(1, length + 1))
        columns = list(zip(*(run[:length] for run in runs)))
        centre = [sum(c) / len(c) for c in columns]
        line, = ax.plot(epochs, centre, marker="o", linestyle="--" if stopped else "-", color=colour,
                        label=f"lr {rate:g} (n={len(runs)}{', stopped' if stopped else ''})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(c) for c in columns], [max(c) for c in columns],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    # One tick is enough: asked for two, one epoch alone got ticks at 0.945, 0.96, ...
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("learning rate" if key == "lr" else key.replace("_", " "))
    if key == "lr" and ax.lines:
        ax.set_yscale(rate_axis_scale([value for line in ax.lines for value in line.get_ydata()]))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        legend_beside(ax)
    return fig


def final_accuracy_chart(trials: list[dict]) -> Figure | None:
    """The final validation accuracy against the learning rate on a log axis; None when no trial
    was evaluated."""
    finals = [(t["learning_rate"], t["evaluation"]["val_accuracy"]) for t in trials if t.get("evaluation")]
    if not finals:
        return None
    fig = Figure(figsize=(7.5, 4), dpi=100, layout="constrained")  # 1.5 inches of it for the legend
    ax = fig.subplots()
    by_rate: dict[float, list[float]] = {}
    for rate, value in finals:
        by_rate.setdefault(rate, []).append(value)
    rates = sorted(by_rate)
    if max(len(values) for values in by_rate.values()) == 1:
        # A mean of one value is that value: one series, or its marker would hide the seed's.
        ax.plot(rates, [by_rate[r][0] for r in rates], marker="o", label="one seed per rate (no mean)")
    else:
        # The means as hollow squares under the seeds' dots: where a rate has one seed left (the
        # others failed), its mean lies on that seed and both stay visible.
        ax.plot(rates, [sum(by_rate[r]) / len(by_rate[r]) for r in rates], color="C0", marker="s",
                markersize=9, markerfacecolor="none", label="mean over seeds", zorder=2)
        ax.scatter([r for r, _ in finals], [v for _, v in finals], color="C1", s=20, label="seed", zorder=3)
    stopped = [(t["learning_rate"], t["history"][-1]["val_accuracy"]) for t in trials
               if t["status"] == "stopped" and t["history"]]
    if stopped:  # where the search stopped them (at their rung, not after every epoch)
        ax.scatter([r for r, _ in stopped], [v for _, v in stopped], marker="x", color="0.4",
                   label="stopped (at its rung)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation accuracy")
    ax.set_title("Final validation accuracy vs learning rate")
    ax.grid(alpha=0.3)
    legend_beside(ax)
    return fig


def draw_charts(trials: list[dict], directory: Path) -> dict[str, str]:
    """The charts as PNG files in `directory`: chart name -> file name."""
    figures = {key: curve_chart(trials, key, title) for key, title in CURVES}
    figures["val_accuracy_vs_lr"] = final_accuracy_chart(trials)
    files = {}
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(directory / f"{name}.png")
            files[name] = f"{name}.png"
    return files
