"""The report's charts as a reader sees them: rendered, then measured in pixels (where the legend
lies, which marker is on top, what the axes show)."""

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from tasks.reporting.charts import curve_chart, final_accuracy_chart
from tasks.search.range_test import RangeTestResult, range_test_figure


def summary_trial(rate, seed, val_accuracy, epochs=5):
    """A trial as summary.json holds it: a constant rate, accuracy rising to `val_accuracy`."""
    history = [{"epoch": e, "lr": rate, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                "train_accuracy": val_accuracy * e / epochs, "val_accuracy": val_accuracy * e / epochs}
               for e in range(1, epochs + 1)]
    return {"learning_rate": rate, "seed": seed, "status": "completed", "history": history,
            "evaluation": {"val_accuracy": val_accuracy}}


def rendered(figure):
    """The figure drawn as a reader sees it: (the figure, its RGB pixels, top row first)."""
    FigureCanvasAgg(figure).draw()
    return figure, np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0


def line_points_under_legend(figure) -> list[tuple[float, float]]:
    """The data points of every line, and 20 points along each of its segments, that the legend covers."""
    axes = figure.axes[0]
    box = axes.get_legend().get_window_extent()
    covered = []
    for line in axes.lines:
        points = line.get_xydata()
        for start, end in zip(points, points[1:]):
            for fraction in np.linspace(0, 1, 20):
                x, y = start + fraction * (end - start)
                if box.contains(*axes.transData.transform((x, y))):
                    covered.append((float(x), float(y)))
    return covered


@pytest.mark.parametrize("rates", [
    [0.001, 0.0005, 0.0001],                                    # the default sweep
    [float(f"{r:.3g}") for r in np.logspace(-5, -1, 16)],       # a wide grid
], ids=["default-3-rates", "16-rates"])
def test_the_legend_of_a_curve_chart_covers_no_line(rates):
    trials = [summary_trial(rate, 0, 0.9) for rate in rates]
    for key in ("lr", "val_accuracy"):
        figure, _ = rendered(curve_chart(trials, key, key))
        assert line_points_under_legend(figure) == [], f"{key}.png: the legend covers data"
        legend = figure.axes[0].get_legend()
        assert len(legend.get_texts()) == len(rates)
        assert figure.bbox.contains(*legend.get_window_extent().p0) and \
            figure.bbox.contains(*legend.get_window_extent().p1), f"{key}.png: the legend is cut off"


def test_one_seed_per_rate_draws_one_marker_and_says_so():
    trials = [summary_trial(0.001, 0, 0.90), summary_trial(0.0001, 0, 0.85)]
    figure, _ = rendered(final_accuracy_chart(trials))
    axes = figure.axes[0]
    marked = [line for line in axes.lines if line.get_marker() not in (None, "None", "")]
    assert len(marked) + len(axes.collections) == 1, "a mean of one seed would hide the seed's marker"
    assert "one seed" in axes.get_legend().get_texts()[0].get_text()


def test_seed_markers_stay_visible_over_the_mean():
    # 0.0001 has one usable seed (its other failed): its mean sits exactly on that seed's value.
    trials = [summary_trial(0.001, 0, 0.90), summary_trial(0.001, 1, 0.86), summary_trial(0.0001, 0, 0.80)]
    figure, pixels = rendered(final_accuracy_chart(trials))
    axes = figure.axes[0]
    [seeds] = [c for c in axes.collections if "seed" in c.get_label()]
    [mean] = [line for line in axes.lines if "mean" in line.get_label()]
    seed_colour = to_rgb(seeds.get_facecolor()[0])
    assert seed_colour != to_rgb(mean.get_color()), "seeds and means in one colour cannot be told apart"
    assert len(mean.get_xydata()) == 2  # a mean marker per rate
    height = pixels.shape[0]
    for x, y in axes.transData.transform(seeds.get_offsets()):
        pixel = pixels[height - 1 - round(y), round(x)]
        assert np.allclose(pixel, seed_colour, atol=0.08), f"the seed marker at {x:.0f},{y:.0f} is hidden: {pixel}"


def range_test(losses, lrs, beta=0.98):
    """A RangeTestResult whose smoothed curve is computed by the range test's own rule."""
    smoothed, average = [], 0.0
    for step, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (step + 1)))
    return RangeTestResult(lrs=list(lrs), losses=list(losses), smoothed=smoothed, suggestion=lrs[50],
                           stopped_early=False, min_lr=lrs[0], max_lr=lrs[-1], planned_steps=len(lrs),
                           beta=beta, divergence_factor=4.0)


def test_the_range_test_chart_shows_the_raw_loss_and_a_sparse_grid():
    # Flat at 2.3, then a noisy descent to about 1.0 (raw batches dip to about 0.7), then a blow-up.
    lrs = np.logspace(-7, 1, 80)
    rng = np.random.default_rng(0)
    losses = [2.3 if lr < 1e-4 else (30.0 if lr > 1 else max(0.7, 2.3 - 0.45 * math.log10(lr / 1e-4)))
              for lr in lrs]
    losses = [loss + rng.normal(0, 0.15) for loss in losses]
    result = range_test(losses, lrs)
    figure, _ = rendered(range_test_figure(result))
    axes = figure.axes[0]
    bottom, top = axes.get_ylim()
    descent = result.losses[:int(np.argmin(result.smoothed)) + 1]  # the raw loss before the climb
    assert bottom <= min(result.losses) and top >= max(descent), (bottom, top, min(result.losses), max(descent))
    assert top < 30.0, "the blown-up tail squashes the curve"
    gridlines = [tick.get_loc() for axis in (axes.xaxis, axes.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                 if tick.gridline.get_visible() and min(axis.get_view_interval()) <= tick.get_loc() <= max(axis.get_view_interval())]
    assert len(gridlines) <= 24, f"{len(gridlines)} grid lines"


def test_a_one_epoch_chart_marks_whole_epochs_only():
    figure, _ = rendered(curve_chart([summary_trial(0.001, 0, 0.7, epochs=1)], "val_accuracy", "v"))
    axis = figure.axes[0].xaxis
    low, high = axis.get_view_interval()
    shown = [float(loc) for loc in axis.get_majorticklocs() if low <= loc <= high]
    assert shown == [1.0], f"ticks at {shown}"


def test_every_rate_of_a_wide_grid_has_a_colour_of_its_own():
    rates = [float(f"{r:.3g}") for r in np.logspace(-5, -1, 16)]
    figure, _ = rendered(curve_chart([summary_trial(rate, 0, 0.9) for rate in rates], "val_accuracy", "v"))
    colours = {to_rgb(line.get_color()) for line in figure.axes[0].lines}
    assert len(colours) == len(rates), "two rates share a colour: the legend cannot tell them apart"


def test_the_rate_chart_spreads_rates_of_several_decades_on_a_log_axis():
    rates = [float(f"{r:.3g}") for r in np.logspace(-5, -1, 16)]
    figure, _ = rendered(curve_chart([summary_trial(rate, 0, 0.9) for rate in rates], "lr", "lr"))
    assert figure.axes[0].get_yscale() == "log", "rates of 1e-05 to 1e-04 lie on top of each other at 0"
    # A schedule that ends at rate 0 (cosine) has no place on a log axis: it stays linear.
    cosine = summary_trial(0.001, 0, 0.9, epochs=3)
    for record, rate in zip(cosine["history"], (0.001, 0.0005, 0.0)):
        record["lr"] = rate
    figure, _ = rendered(curve_chart([cosine], "lr", "lr"))
    assert figure.axes[0].get_yscale() == "linear"
