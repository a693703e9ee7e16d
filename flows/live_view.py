"""What a person sees while `lr-sweep run` works: a live view in a terminal, a line per epoch elsewhere.

In a terminal (stdout a TTY) the view redraws in place, as Keras', Lightning's and wandb's do: a
row per trial (rate, seed, pack, epoch i/N with a bar, train and validation loss and accuracy,
images/s, ETA, status) under a sweep-level bar with its ETA and, once, the Prefect UI and W&B links.
Without a terminal (CI, a log file) it prints one line per finished epoch of each trial and one
per trial that was reused, stopped, diverged or failed: a log a person can read. Either way the
sweep's table follows, printed by the CLI. Prefect's own log lines go to the UI and to the sweep's
log file (flows/cli.py), not here.

The view hears tasks/reporting/progress.py's events, from the trials' threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from tasks.reporting import progress

# States after which a trial trains no more.
ENDED = ("done", "reused", "stopped", "diverged", "failed")
BAR_WIDTH = 10


@dataclass
class Row:
    """One trial as the view knows it."""

    trial: str
    learning_rate: float | None = None
    seed: int | None = None
    state: str = "waiting"
    status: str = ""
    pack: str | None = None
    epoch: int = 0
    epochs: int | None = None
    record: dict = field(default_factory=dict)
    images_per_second: float | None = None
    model: str | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    last_at: float | None = None  # when it started training, then when its last epoch ended

    def eta_seconds(self) -> float | None:
        """Its remaining epochs at the pace of the ones it trained."""
        if self.state in ENDED or not self.epoch_seconds or not self.epochs:
            return None
        return (self.epochs - self.epoch) * sum(self.epoch_seconds) / len(self.epoch_seconds)


class SweepView:
    """The sweep's state, fed by progress events; drawn live or written as lines."""

    def __init__(self, out: IO[str], clock=time.monotonic):
        self.out, self.clock = out, clock
        self.rows: dict[str, Row] = {}
        self.sweep: progress.SweepEvent | None = None
        self.started = clock()
        self.lock = threading.Lock()

    # --- events --------------------------------------------------------------------------------
    def hear(self, event: progress.TrialEvent | progress.SweepEvent) -> str | None:
        """Update the state; the line a log would show for this event, if any."""
        with self.lock:
            if isinstance(event, progress.SweepEvent):
                self.sweep = event
                return self.sweep_line(event)
            row = self.rows.setdefault(event.trial, Row(event.trial))
            now = self.clock()
            for name in ("learning_rate", "seed", "pack", "epochs", "images_per_second"):
                if getattr(event, name) is not None:
                    setattr(row, name, getattr(event, name))
            if event.state == "training" and row.state != "training":
                row.last_at = now
            row.state, row.status = event.state, event.status
            if event.model is not None:
                row.model = event.model.split("@")[0]  # the version; the digest is in the table's files
            if event.epoch is not None and event.epoch > row.epoch:
                if row.last_at is not None:
                    row.epoch_seconds.append(now - row.last_at)
                row.last_at, row.epoch, row.record = now, event.epoch, event.record
                return self.epoch_line(row)
            if event.state in ("reused", "stopped", "diverged", "failed", "retrying"):
                return f"{row.trial} {event.state}: {event.status}"
            return None

    @staticmethod
    def sweep_line(event: progress.SweepEvent) -> str:
        """The sweep's plan and, once, where to watch it."""
        trials = event.trials or "the range test's"  # learning_rates auto: known after the test
        lines = [f"sweep {event.sweep_id}: {trials} trial(s) x {event.epochs} epoch(s)"]
        lines += [f"  Prefect UI: {event.flow_run_url}"] if event.flow_run_url else []
        lines += [f"  W&B: {event.wandb}"] if event.wandb else []
        return "\n".join(lines)

    @staticmethod
    def epoch_line(row: Row) -> str:
        r = row.record
        pack = f" [pack {row.pack}]" if row.pack else ""
        speed = f" | {row.images_per_second:,.0f} img/s" if row.images_per_second else ""
        return (f"{row.trial}{pack} epoch {row.epoch}/{row.epochs}: train loss {r.get('train_loss', float('nan')):.4f} "
                f"acc {100 * r.get('train_accuracy', float('nan')):.2f}% | val loss {r.get('val_loss', float('nan')):.4f} "
                f"acc {100 * r.get('val_accuracy', float('nan')):.2f}%{speed}")

    # --- the live drawing ------------------------------------------------------------------------
    def sweep_progress(self) -> tuple[int, int, float | None]:
        """(epochs done, epochs in all, ETA seconds) of the trials seen so far (or announced)."""
        rows = list(self.rows.values())
        epochs_each = self.sweep.epochs if self.sweep else max((r.epochs or 0 for r in rows), default=0)
        planned = max(len(rows), self.sweep.trials if self.sweep else 0)
        total = planned * epochs_each
        done = sum(r.epochs or epochs_each if r.state in ENDED else r.epoch for r in rows)
        paces = [s for r in rows for s in r.epoch_seconds]
        training = sum(r.state == "training" for r in rows) or 1
        eta = None if not paces else (total - done) * (sum(paces) / len(paces)) / training
        return min(done, total), total, eta

    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        with self.lock:
            done, total, eta = self.sweep_progress()
            header = Text(self.sweep_line(self.sweep) if self.sweep else "lr-sweep: starting", style="bold")
            overall = Text(f"sweep {bar(done, total, 30)} {done}/{total} epochs  elapsed "
                           f"{clock_time(self.clock() - self.started)}  ETA {clock_time(eta)}")
            table = Table(box=None, pad_edge=False, header_style="bold")
            for column, justify in (("lr", "right"), ("seed", "right"), ("pack", "left"), ("epoch", "left"),
                                    ("train loss", "right"), ("train acc", "right"), ("val loss", "right"),
                                    ("val acc", "right"), ("img/s", "right"), ("ETA", "right"), ("status", "left")):
                table.add_column(column, justify=justify, no_wrap=True)
            for row in sorted(self.rows.values(), key=lambda r: (-(r.learning_rate or 0), r.seed or 0, r.trial)):
                r = row.record
                table.add_row(
                    f"{row.learning_rate:g}" if row.learning_rate is not None else row.trial,
                    "" if row.seed is None else str(row.seed), row.pack or "",
                    f"{bar(row.epoch, row.epochs or 0, BAR_WIDTH)} {row.epoch}/{row.epochs or '?'}",
                    number(r.get("train_loss"), "{:.4f}"), number(r.get("train_accuracy"), "{:.2%}"),
                    number(r.get("val_loss"), "{:.4f}"), number(r.get("val_accuracy"), "{:.2%}"),
                    number(row.images_per_second, "{:,.0f}"), clock_time(row.eta_seconds()),
                    status_text(row))
            return Group(header, overall, table)


def bar(done: int, total: int, width: int) -> str:
    filled = 0 if not total else round(width * min(done, total) / total)
    return "█" * filled + "░" * (width - filled)


def number(value: float | None, form: str) -> str:
    return "" if value is None else form.format(value)


def clock_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def status_text(row: Row) -> str:
    words = {"waiting": "waiting for a device", "done": f"done -> {row.model}" if row.model else "done",
             "reused": f"reused: 0 s trained now, from {row.model}" if row.model else "reused"}
    return words.get(row.state, row.state)


@contextlib.contextmanager
def sweep_view(out: IO[str], live: bool):
    """The view for the duration of the block: redrawn in place when `live` (a terminal), else a
    line per event worth a line."""
    view = SweepView(out)
    if live:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=out)
        with Live(get_renderable=view.render, console=console, refresh_per_second=4, transient=False):
            progress.add_observer(view.hear)
            try:
                yield view
            finally:
                progress.remove_observer(view.hear)
        return

    def write(event) -> None:
        # Not print(): inside a flow with log_prints, print() goes to Prefect's log, not `out`.
        if (line := view.hear(event)) is not None:
            out.write(line + "\n")
            out.flush()

    progress.add_observer(write)
    try:
        yield view
    finally:
        progress.remove_observer(write)
