"""Search benchmark: the full grid against successive halving and TPE, and the LR range test.

On real Fashion-MNIST (50,000 training / 10,000 validation images, the sweep's split), the
reference network (hidden 128), batch 64, Adam, one seed, 5 epochs, learning rates from 1e-4 to
1e-2 (9 log-spaced by default):

1. the LR range test (`tasks.lr_range_test`, 100 steps from 1e-7 to 10): its suggestion,
   and whether it lands within 3x of the grid's best rate;
2. the full grid: every rate trained for all epochs;
3. successive halving (`tasks.successive_halving`, eta 3, rungs 1/3/5 epochs);
4. TPE (`tasks.tpe_search`, log-uniform rate over the same range, batches of 3 with the
   same rungs and promotion rule), stopped at the epoch budget successive halving spent.

For each: the best validation accuracy (at the last epoch), its rate, epochs trained, wall time.
Every method trains from scratch with its own checkpoints (nothing is shared between them), one
after the other, sequentially, on the CPU with 2 threads by default. Targets: successive
halving within 0.3 points of the grid's best validation accuracy with at most 40% of its epochs.
A miss is printed and recorded; the exit code stays 0 (a benchmark on a shared machine informs).

    make bench-search                                     # = the line below, through flows.environment
    .venv/bin/python -m benchmarks.bench_search --json benchmarks/bench_search.json
    .venv/bin/python -m benchmarks.bench_search --train-limit 2000 --epochs 2 --json /tmp/s.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import cpu_model
from flows.config import SweepConfig
from tasks.data.prepare import load_splits, prepare_dataset
from tasks.evaluation.ranking import rank
from tasks.results import TrialSpec
from tasks.search.halving import epoch_accounting, rung_epochs, successive_halving
from tasks.search.range_test import lr_range_test, plot_range_test
from tasks.search.tpe import open_study, tpe_search
from tasks.training.sequential import CheckpointedTrainer

MAX_GAP_POINTS = 0.3  # successive halving's best val accuracy vs the grid's, in points
MAX_EPOCH_FRACTION = 0.40  # of the grid's epochs
RANGE_TEST_FACTOR = 3.0  # the suggestion within this factor of the grid's best rate


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="Dataset cache directory. Default: %(default)s.")
    parser.add_argument("--json", default="bench_search.json", help="Where the figures go. Default: %(default)s.")
    parser.add_argument("--device", default="cpu", help="Default: %(default)s.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU. Default: %(default)s.")
    parser.add_argument("--epochs", type=int, default=5, help="Default: %(default)s.")
    parser.add_argument("--rates", type=int, default=9, help="Grid size (log-spaced). Default: %(default)s.")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="Default: %(default)s.")
    parser.add_argument("--max-lr", type=float, default=1e-2, help="Default: %(default)s.")
    parser.add_argument("--eta", type=int, default=3, help="Reduction factor. Default: %(default)s.")
    parser.add_argument("--parallel", type=int, default=3, help="TPE batch size. Default: %(default)s.")
    parser.add_argument("--tpe-startup", type=int, default=3,
                        help="TPE's random trials before it models (n_startup_trials). Default: %(default)s.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed and TPE seed. Default: %(default)s.")
    parser.add_argument("--batch-size", type=int, default=64, help="Default: %(default)s.")
    parser.add_argument("--hidden-units", type=int, default=128, help="Default: %(default)s.")
    parser.add_argument("--train-limit", type=int, default=None, help="Train on a slice (smoke runs only).")
    parser.add_argument("--range-steps", type=int, default=100, help="LR range test steps. Default: %(default)s.")
    parser.add_argument("--workdir", default=None, help="Checkpoints, study and lr_find.png (default: a "
                        "temporary folder, removed unless --keep).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    return parser.parse_args(argv)


def best_of(histories: dict[float, list[dict]]) -> tuple[float, dict]:
    """The grid's winner as the sweep picks it: best final val accuracy, then val loss, then rate."""
    final = {lr: h[-1] for lr, h in histories.items()}
    order = rank({lr: r["val_accuracy"] for lr, r in final.items()}, True,
                 {lr: r["val_loss"] for lr, r in final.items()}, {lr: lr for lr in final})
    return order[0], final[order[0]]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lr-search-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine": {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
        "nice": os.nice(0), "load_average_at_start": load()}}
    print(f"machine: {json.dumps(figures['machine'])}", flush=True)

    ref = prepare_dataset("fashion-mnist", Path(args.data_dir), 10000, 0, args.train_limit)
    splits = load_splits(ref, args.device)
    rates = [float(x) for x in np.logspace(math.log10(args.min_lr), math.log10(args.max_lr), args.rates)]
    base = TrialSpec.shared(SweepConfig(epochs=args.epochs, batch_size=args.batch_size, hidden_units=args.hidden_units,
                                        seeds=[args.seed], optimizer="adam")).but(learning_rate=rates[0])
    rungs = rung_epochs(args.epochs, 1, args.eta)
    figures["setup"] = {"dataset": ref.name, "train_size": ref.train_size, "val_size": ref.val_size,
                        "learning_rates": rates, "epochs": args.epochs, "batch_size": args.batch_size,
                        "hidden_units": args.hidden_units, "optimizer": "adam", "seed": args.seed,
                        "rungs": rungs, "reduction_factor": args.eta, "tpe_parallel": args.parallel,
                        "tpe_startup_trials": args.tpe_startup}
    print(f"{ref.name}: {ref.train_size:,} training / {ref.val_size:,} validation images; {len(rates)} rates "
          f"{rates[0]:g}..{rates[-1]:g}, {args.epochs} epochs, rungs {rungs}, eta {args.eta}", flush=True)

    def log(prefix):
        return lambda message: print(f"  [{prefix}] {message}", flush=True)

    try:
        # 1. the LR range test
        started = time.perf_counter()
        range_test = lr_range_test(base, splits, args.device, min_lr=1e-7, max_lr=10.0, max_steps=args.range_steps)
        range_seconds = time.perf_counter() - started
        chart = plot_range_test(range_test, workdir / "lr_find.png")
        # The same test over 5x the steps (one more figure, a few seconds): with beta 0.98 the
        # smoothed loss trails the raw one by ~50 steps, a wide stretch of rates at 100 steps.
        long_test = lr_range_test(base, splits, args.device, min_lr=1e-7, max_lr=10.0, max_steps=5 * args.range_steps)
        plot_range_test(long_test, workdir / "lr_find_long.png")
        print(f"LR range test: suggestion {range_test.suggestion:.3g} (lowest smoothed loss at "
              f"{range_test.best_lr:.3g}), {len(range_test.lrs)} steps, stopped early: "
              f"{range_test.stopped_early}, {range_seconds:.1f} s; chart {chart}; over "
              f"{len(long_test.lrs)} steps: {long_test.suggestion:.3g}", flush=True)

        # 2. the full grid
        started = time.perf_counter()
        grid_trainer = CheckpointedTrainer(base, splits, args.device, workdir / "grid", log=log("grid"))
        grid_histories = grid_trainer(rates, args.epochs)
        grid_seconds = time.perf_counter() - started
        grid_lr, grid_best = best_of(grid_histories)
        grid_epochs = epoch_accounting([len(h) for h in grid_histories.values()], len(rates), args.epochs)
        print(f"grid: best val accuracy {grid_best['val_accuracy']:.4f} at lr {grid_lr:.3g}; "
              f"{grid_epochs['epochs_trained']} epochs, {grid_seconds:.0f} s", flush=True)

        # 3. successive halving
        started = time.perf_counter()
        sh_trainer = CheckpointedTrainer(base, splits, args.device, workdir / "halving", log=log("halving"))
        halving = successive_halving(rates, rungs, args.eta, sh_trainer, "val_accuracy", log=log("halving"))
        sh_seconds = time.perf_counter() - started
        sh_best = halving.finished[halving.best][-1]
        sh_epochs = epoch_accounting(halving.epochs_trained, len(rates), args.epochs)
        print(f"successive halving: best val accuracy {sh_best['val_accuracy']:.4f} at lr {halving.best:.3g}; "
              f"{sh_epochs['epochs_trained']} epochs ({sh_epochs['fraction_of_grid']:.0%} of the grid), "
              f"{sh_seconds:.0f} s", flush=True)

        # 4. TPE with the epoch budget successive halving spent
        started = time.perf_counter()
        tpe_trainer = CheckpointedTrainer(base, splits, args.device, workdir / "tpe", log=log("tpe"))
        study = open_study(f"sqlite:///{workdir / 'optuna.db'}", "bench", seed=args.seed,
                           n_startup_trials=args.tpe_startup)
        tpe = tpe_search(study, n_trials=10 * len(rates), parallel=args.parallel,
                         lr_range=(args.min_lr, args.max_lr), rungs=rungs, train_to=tpe_trainer,
                         metric="val_accuracy", reduction_factor=args.eta,
                         epoch_budget=sh_epochs["epochs_trained"], log=log("tpe"))
        tpe_seconds = time.perf_counter() - started
        tpe_epochs = epoch_accounting([t.epochs_trained for t in tpe.trials], len(rates), args.epochs)
        print(f"TPE: best val accuracy {tpe.best.value:.4f} at lr {tpe.best.learning_rate:.3g}; "
              f"{tpe_epochs['epochs_trained']} epochs over {len(tpe.trials)} trials, {tpe_seconds:.0f} s", flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    ratio = max(range_test.suggestion / grid_lr, grid_lr / range_test.suggestion)
    gap = 100 * (grid_best["val_accuracy"] - sh_best["val_accuracy"])
    figures.update({
        "range_test": {"suggestion": range_test.suggestion, "best_lr": range_test.best_lr,
                       "steps": len(range_test.lrs), "planned_steps": range_test.planned_steps,
                       "stopped_early": range_test.stopped_early, "seconds": range_seconds,
                       "ratio_to_grid_best_lr": ratio, "within_3x_of_grid_best": ratio <= RANGE_TEST_FACTOR,
                       "lrs": range_test.lrs, "smoothed": range_test.smoothed,
                       "long": {"max_steps": 5 * args.range_steps, "steps": len(long_test.lrs),
                                "suggestion": long_test.suggestion, "best_lr": long_test.best_lr,
                                "ratio_to_grid_best_lr": max(long_test.suggestion / grid_lr, grid_lr / long_test.suggestion)}},
        "grid": {"best_learning_rate": grid_lr, "best_val_accuracy": grid_best["val_accuracy"],
                 "best_val_loss": grid_best["val_loss"], "wall_s": grid_seconds, **grid_epochs,
                 "final_val_accuracy": {repr(lr): h[-1]["val_accuracy"] for lr, h in grid_histories.items()},
                 "val_accuracy_by_epoch": {repr(lr): [r["val_accuracy"] for r in h] for lr, h in grid_histories.items()}},
        "successive_halving": {"best_learning_rate": halving.best, "best_val_accuracy": sh_best["val_accuracy"],
                               "best_val_loss": sh_best["val_loss"], "wall_s": sh_seconds, **sh_epochs,
                               "gap_to_grid_points": gap,
                               "stopped_at": {repr(k): v for k, v in halving.stopped_at.items()},
                               "rung_scores": {str(r): {repr(k): v for k, v in s.items()} for r, s in halving.rung_scores.items()},
                               # On a CPU the trajectories are bit-identical to the grid's (same seed, resumed
                               # checkpoints): the winner's history must equal the grid's for that rate.
                               "winner_history_equals_grid": halving.finished[halving.best] == grid_histories[halving.best]},
        "tpe": {"best_learning_rate": tpe.best.learning_rate, "best_val_accuracy": tpe.best.value,
                "wall_s": tpe_seconds, **tpe_epochs, "epoch_budget": sh_epochs["epochs_trained"],
                "gap_to_grid_points": 100 * (grid_best["val_accuracy"] - tpe.best.value),
                "trials": [{"number": t.number, "learning_rate": t.learning_rate, "state": t.state,
                            "value": t.value, "epochs": t.epochs_trained} for t in tpe.trials]},
    })
    figures["machine"]["load_average_at_end"] = load()
    checks = {
        "halving_within_0.3_points_of_grid": gap <= MAX_GAP_POINTS,
        "halving_at_most_40pct_of_grid_epochs": sh_epochs["fraction_of_grid"] <= MAX_EPOCH_FRACTION,
        "range_test_within_3x_of_grid_best_lr": ratio <= RANGE_TEST_FACTOR,
    }
    figures["checks"] = checks
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")

    m = figures["machine"]
    rows = [("grid", grid_best["val_accuracy"], grid_lr, grid_epochs["epochs_trained"], grid_seconds),
            ("successive halving", sh_best["val_accuracy"], halving.best, sh_epochs["epochs_trained"], sh_seconds),
            ("TPE (same budget)", tpe.best.value, tpe.best.learning_rate, tpe_epochs["epochs_trained"], tpe_seconds)]
    print(f"\n== search benchmark on {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
          f"torch {m['torch']} (load {m['load_average_at_start']} -> {m['load_average_at_end']}) ==")
    print(f"{'method':<20} {'best val acc':>12} {'at lr':>9} {'epochs':>7} {'of grid':>8} {'wall s':>7}")
    for name, accuracy, lr, epochs, seconds in rows:
        print(f"{name:<20} {accuracy:>12.4f} {lr:>9.3g} {epochs:>7} {epochs / grid_epochs['grid_epochs']:>8.0%} {seconds:>7.0f}")
    print(f"LR range test: suggestion {range_test.suggestion:.3g}, {ratio:.2f}x from the grid's best rate "
          f"(over {len(long_test.lrs)} steps: {long_test.suggestion:.3g}, "
          f"{figures['range_test']['long']['ratio_to_grid_best_lr']:.2f}x)")
    print("checks: " + ", ".join(f"{name} {'ok' if ok else 'MISSED'}" for name, ok in checks.items()))
    print(f"figures written to {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
