"""The sweep's report: summary.json (read by other tools), report.md (read by people), PNG charts.

Every sentence of the written verdict is generated from a figure that appears in the same report.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.files import atomic_write
from tasks.evaluation.compare import Decision
from tasks.evaluation.ranking import higher_is_better
from tasks.reporting.charts import data_uri, draw_charts
from tasks.results import Promotion, TrialOutcome

# A run "converged" at the first epoch whose validation accuracy reached this share of its final.
CONVERGENCE_SHARE = 0.95
# Still improving by more than this at the last epoch: more epochs would likely help.
UNDERTRAINED_GAIN = 0.002
# Train accuracy above validation accuracy by more than this: the model starts to memorise.
OVERFIT_GAP = 0.03
# Validation loss going up by more than this share from one epoch to the next: unstable run.
UNSTABLE_RISE = 0.10


def trial_record(trial: TrialOutcome) -> dict:
    """One row of summary.json's `trials`: the model reference as `collection:vN` and its digest."""
    record = trial.model_dump(mode="json", exclude={"model"})
    return record | {"model": str(trial.model) if trial.model else None,
                     "digest": trial.model.digest if trial.model else None}


def promotion_record(promotion: Promotion) -> dict:
    record = promotion.model_dump(mode="json", exclude={"model", "previous"})
    return record | {"model": str(promotion.model) if promotion.model else None,
                     "digest": promotion.model.digest if promotion.model else None,
                     "previous": str(promotion.previous) if promotion.previous else None}


def build_summary(*, sweep_id: str, config: dict, dataset: dict, trials: list[TrialOutcome], decision: Decision,
                  wall_seconds: float, devices: list[str], wandb: dict, search: dict | None = None,
                  timings: dict | None = None) -> dict:
    """summary.json: where the typed results of the sweep become plain data."""
    best = decision.best
    selection = decision.selection
    return {
        "sweep_id": sweep_id,
        "config": config,
        "smoke": config.get("train_limit") is not None,
        "dataset": dataset,
        "trials": [trial_record(t) for t in trials],
        "best": ({"learning_rate": best.learning_rate, "seed": best.seed, "model": str(best.model),
                  "digest": best.model.digest} if best else None),
        "aggregates": selection.ranking if selection else [],
        "significance": selection.significance if selection else None,
        "promotion": promotion_record(decision.promotion),
        "wall_seconds": wall_seconds,
        "devices": devices,
        "wandb": wandb,
        "search": search,
        "timings": timings,  # seconds per phase of the flow; filled in until the report is written
    }


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str))


# --- observations per run ----------------------------------------------------------------------

def convergence_epoch(history: list[dict]) -> int | None:
    if not history:
        return None
    target = CONVERGENCE_SHARE * history[-1]["val_accuracy"]
    return next(r["epoch"] for r in history if r["val_accuracy"] >= target)


def observations(history: list[dict]) -> dict:
    """Flags a reader should know about one run, each with the figure behind it."""
    if not history:
        return {}
    last = history[-1]
    gain = last["val_accuracy"] - history[-2]["val_accuracy"] if len(history) > 1 else None
    gap = last["train_accuracy"] - last["val_accuracy"]
    rises = [(b["epoch"], (b["val_loss"] - a["val_loss"]) / a["val_loss"])
             for a, b in zip(history, history[1:]) if a["val_loss"] > 0]
    worst_rise = max(rises, key=lambda item: item[1], default=None)
    return {
        "convergence_epoch": convergence_epoch(history),
        "last_epoch_gain": gain,
        "undertrained": gain is not None and gain > UNDERTRAINED_GAIN,
        "train_val_gap": gap,
        "overfitting": gap > OVERFIT_GAP,
        "worst_val_loss_rise": worst_rise,
        "unstable": worst_rise is not None and worst_rise[1] > UNSTABLE_RISE,
    }


# --- report.md ---------------------------------------------------------------------------------

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _spread(stats: dict, scale: float = 100.0, digits: int = 2) -> str:
    """' ± std' over several seeds; nothing for one seed, whose spread would read as a certainty."""
    return f" ± {scale * stats['std']:.{digits}f}" if stats["n"] > 1 else ""


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def trial_table(trials: list[dict]) -> list[dict]:
    """The comparison table: one row per trial (also the Prefect table artifact)."""
    rows = []
    for t in trials:
        last = t["history"][-1] if t["history"] else {}
        ev = t.get("evaluation") or {}
        rows.append({
            "learning_rate": t["learning_rate"], "seed": t["seed"], "status": t["status"],
            "train_accuracy": last.get("train_accuracy"), "val_accuracy": ev.get("val_accuracy"),
            "test_accuracy": ev.get("test_accuracy"), "train_loss": last.get("train_loss"),
            "val_loss": ev.get("val_loss"), "test_loss": ev.get("test_loss"),
            "epochs": len(t["history"]), "train_seconds": t.get("train_seconds"),
            "images_per_second": t.get("samples_per_second"),
            # a reused trial's model is an earlier run's version: say so where the model is named
            "model": f"from {t['reused_from']}" if t.get("reused_from") else t.get("model"),
        })
    return rows


def lead_sentence(winner: dict, runner: dict, significance: dict | None, metric: str) -> str:
    """The winner's lead over the runner-up, against the seed-to-seed standard deviations and then
    Welch's t-test, each saying what it measures: a lead larger than both deviations can still
    fail the test on two seeds, and the sentence joins them with 'but' when they disagree."""
    lead = abs(winner[metric]["mean"] - runner[metric]["mean"])
    sentence = (f"The runner-up, {runner['learning_rate']:g}, reached {_fmt(runner[metric]['mean'])}: "
                f"a lead of {lead:.4f}" + (f" ({lead * 100:.2f} points)" if higher_is_better(metric) else ""))
    if min(winner[metric]["n"], runner[metric]["n"]) > 1:
        spreads = (winner[metric]["std"], runner[metric]["std"])
        above = lead > max(spreads)
        sentence += (f", larger than either rate's seed-to-seed standard deviation ({spreads[0]:.4f}, "
                     f"{spreads[1]:.4f})" if above else
                     f", within the larger seed-to-seed standard deviation of the two ({max(spreads):.4f})")
        if significance and significance["p_value"] is not None:
            sentence += f"; {'and' if above == significance['significant'] else 'but'} {significance['note']}"
    return sentence + "."


def verdict(summary: dict, metric: str) -> list[str]:
    """The written verdict: which rate won, by how much, how sure we are, what else stands out."""
    lines = []
    ranking = summary["aggregates"]
    best = summary["best"]
    if not best:
        lines.append("No trial produced a usable model, so there is no winner and the alias was not touched.")
    else:
        winner = ranking[0]
        lines.append(
            f"**Learning rate {winner['learning_rate']:g} won** with a mean {metric} of "
            f"{_fmt(winner[metric]['mean'])} over {winner[metric]['n']} seed(s)."
        )
        if len(ranking) > 1:
            lines.append(lead_sentence(winner, ranking[1], summary.get("significance"), metric))
        if summary.get("significance") and summary["significance"]["p_value"] is None:
            lines.append(summary["significance"]["note"][0].upper() + summary["significance"]["note"][1:] + ".")
        lines.append(
            f"The promoted candidate is seed {best['seed']} of that rate ({best['model']}), its best seed "
            f"by {metric}."
        )
    for trial in summary["trials"]:
        label = f"lr {trial['learning_rate']:g} (seed {trial['seed']})"
        if trial["status"] == "stopped":
            last = trial["history"][-1] if trial["history"] else {}
            lines.append(f"{label} was stopped by the search at epoch {trial['stopped_at']} (validation "
                         f"accuracy {_fmt(last.get('val_accuracy'))} there, not among the best of its rung).")
            continue
        if trial["status"] not in ("completed", "reused"):
            lines.append(f"{label} {trial['status']}: {trial.get('error') or 'no detail'}.")
            continue
        obs = observations(trial["history"])
        if not obs:
            continue
        parts = [f"reached {CONVERGENCE_SHARE:.0%} of its final validation accuracy at epoch "
                 f"{obs['convergence_epoch']}",
                 f"train-val accuracy gap {obs['train_val_gap'] * 100:+.2f} points"
                 + (" (overfitting)" if obs["overfitting"] else "")
                 # Why a short run's gap is negative: the weights changed under the average.
                 + f" (train accuracy is the running average over epoch {trial['history'][-1]['epoch']} while the "
                   "model learned; validation accuracy is measured after it)"]
        if obs["undertrained"]:
            parts.append(f"still improving at the last epoch (+{obs['last_epoch_gain'] * 100:.2f} points): "
                         "likely under-trained, more epochs would help")
        if obs["unstable"]:
            epoch, rise = obs["worst_val_loss_rise"]
            parts.append(f"unstable: validation loss rose {rise:.0%} at epoch {epoch}")
        lines.append(f"{label}: " + "; ".join(parts) + ".")
    promotion = summary["promotion"]
    lines.append(
        f"Promotion: {'moved' if promotion['promoted'] else 'did not move'} '{promotion['alias']}'"
        + (f" to {promotion['model']}" if promotion["promoted"] else "")
        + f" ({promotion['reason']})."
    )
    return lines


def header_lines(summary: dict) -> list[str]:
    """What ran, and a warning first when it was a smoke run (the report, the W&B report)."""
    dataset, config = summary["dataset"], summary["config"]
    out = []
    if summary["smoke"]:
        out += [f"> **Smoke run**: trained on {dataset['train_size']:,} images (train_limit set), not the "
                "full training split. Do not mistake its models for real ones.", ""]
    model = config.get("model", "cnn")
    arguments = f" {json.dumps(config['model_args'])}" if config.get("model_args") else ""
    classes = f", {len(dataset['class_names'])} classes" if dataset.get("class_names") else ""
    decay = "" if config.get("weight_decay") is None else f", weight decay {config['weight_decay']:g}"
    warmup = f" with {config['warmup_epochs']:g} warmup epoch(s)" if config.get("warmup_epochs") else ""
    out.append(f"Model `{model}`{arguments} on dataset `{dataset['name']}` (fingerprint "
               f"`{dataset['fingerprint'][:12]}`{classes}); {config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}, batch "
               f"{config['batch_size']}, {config['optimizer']}{decay}, {config.get('lr_schedule', 'constant')} "
               f"learning rate{warmup}, {config.get('precision', 'fp32')}; selection by "
               f"{config['selection_metric']}; devices {', '.join(summary['devices'])}; "
               f"wall time {summary['wall_seconds']:.1f} s.")
    if dataset.get("class_names"):
        names = dataset["class_names"]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        out += ["", f"Classes: {shown}."]
    return out


def promotion_lines(summary: dict) -> list[str]:
    promotion = summary["promotion"]
    return [f"- alias: `{promotion['alias']}`", f"- candidate: {promotion.get('model') or '-'}",
            f"- previous holder: {promotion.get('previous') or '-'}",
            f"- promoted: {'yes' if promotion['promoted'] else 'no'}", f"- reason: {promotion['reason']}"]


def render_markdown(summary: dict, charts: dict[str, str]) -> str:
    """report.md; `charts` maps a chart's name to its image source (a file name, or a data URI
    for the Prefect UI, which does not serve files)."""
    out = [f"# Learning-rate sweep `{summary['sweep_id']}`", ""] + header_lines(summary)
    out += ["", "## Verdict", ""] + [f"- {line}" for line in verdict(summary, summary["config"]["selection_metric"])]
    out += ["", "## Trials", ""] + trials_markdown(summary)
    if summary["aggregates"]:
        out += ["", "## Per learning rate (over seeds)", ""] + aggregates_markdown(summary)
    if any(t.get("attempts") for t in summary["trials"]):
        out += ["", "## Trial runs", ""] + attempt_lines(summary)
    out += ["", "## Promotion", ""] + promotion_lines(summary)
    if summary.get("search"):
        out += ["", "## Search", ""] + search_lines(summary["search"])
    out += ["", "## Weights & Biases", ""] + wandb_lines(summary)
    out += ["", "## Charts", ""] + [f"![{name}]({source})" for name, source in charts.items()]
    return "\n".join(out) + "\n"


def trials_markdown(summary: dict) -> list[str]:
    """The comparison table in markdown (the report, the W&B report)."""
    # The model right after the status: the Prefect UI cuts a wide table at its right edge.
    out = ["| learning rate | seed | status | model | val acc | test acc | train acc | val loss | test loss | train loss | seconds | images/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in trial_table(summary["trials"]):
        out.append(
            f"| {r['learning_rate']:g} | {r['seed']} | {r['status']} | {r['model'] or '-'} | "
            f"{_pct(r['val_accuracy'])} | {_pct(r['test_accuracy'])} | {_pct(r['train_accuracy'])} | "
            f"{_fmt(r['val_loss'])} | {_fmt(r['test_loss'])} | {_fmt(r['train_loss'])} | "
            f"{_fmt(r['train_seconds'], 1)} | {_fmt(r['images_per_second'], 0)} |")
    return out


def aggregates_markdown(summary: dict) -> list[str]:
    """Each learning rate over its seeds: mean ± std and the 95% interval, in markdown."""
    out = ["| learning rate | seeds | val acc mean ± std | 95% CI | test acc mean ± std | val loss mean ± std |",
           "|---|---|---|---|---|---|"]
    for row in summary["aggregates"]:
        ci = row["val_accuracy"]["ci95"]
        out.append(
            f"| {row['learning_rate']:g} | {len(row['seeds'])} | {_pct(row['val_accuracy']['mean'])}"
            f"{_spread(row['val_accuracy'])} | "
            f"{'-' if ci is None else f'{_pct(ci[0])} to {_pct(ci[1])}'} | "
            f"{_pct(row['test_accuracy']['mean'])}{_spread(row['test_accuracy'])} | "
            f"{_fmt(row['val_loss']['mean'])}{_spread(row['val_loss'], 1.0, 4)} |")
    return out


def attempt_lines(summary: dict) -> list[str]:
    """Dispatched trials: how many flow runs each took, and why each one before the last ended."""
    lines = []
    for trial in summary["trials"]:
        attempts = trial.get("attempts") or []
        if not attempts:
            continue
        name = f"lr {trial['learning_rate']:g}, seed {trial['seed']}"
        if len(attempts) == 1:
            lines.append(f"- {name}: 1 attempt (flow run {attempts[0]['name']}, {attempts[0]['ended']})")
            continue
        lines.append(f"- {name}: {len(attempts)} attempts, the last {attempts[-1]['ended']} (flow run "
                     f"{attempts[-1]['name']}); re-run after:")
        lines += [f"  {n}. {a['name']}: {a['reason']}" for n, a in enumerate(attempts[:-1], start=1)]
    return lines


def search_lines(search: dict) -> list[str]:
    """What a search did: its rungs, which trials it stopped where, the compute it spent."""
    name = search.get("title", search["method"])
    lines = [f"- {name}, rungs at epochs {', '.join(map(str, search['rungs']))}, keeping the best "
             f"1/{search['reduction_factor']} at each rung.",
             f"- Compute: {search['epochs_trained']} epochs trained against {search['grid_epochs']} for the "
             f"full grid ({search['fraction_of_grid']:.0%}, {search['epochs_saved']} epochs saved)."]
    lines += [f"- lr {rate}: stopped at epoch {rung}" for rate, rung in search["stopped_at"].items()]
    if search.get("study"):
        lines.append(f"- Optuna study `{search['study']}` in {search['storage']} ({search['trials_now']} "
                     "trial(s) trained by this run; running the same command again resumes it).")
    if search.get("n_startup_trials") is not None:
        lines.append(f"- TPE: the first {search['n_startup_trials']} trial(s) sampled at random, the "
                     "rest proposed by TPE from the trials before them.")
    return lines


def wandb_lines(summary: dict) -> list[str]:
    """Where each trial's W&B run is: its URL online; offline, its folder and the publish command."""
    wandb = summary["wandb"]
    if wandb["mode"] == "disabled":
        return ["- W&B was disabled for this sweep."]
    lines = [f"- {t['learning_rate']:g} seed {t['seed']}: {t.get('wandb_url') or t.get('wandb_run_dir') or '-'}"
             for t in summary["trials"]]
    if wandb.get("report_url"):
        lines.append(f"- W&B report: {wandb['report_url']}")
    elif wandb.get("report_error"):
        lines.append(f"- The W&B report could not be saved: {wandb['report_error']}")
    if wandb["mode"] == "offline":
        lines.append(f"- Offline runs: upload them, with the promotion and a W&B report of the sweep, with "
                     f"`lr-sweep publish {summary['sweep_id']} --output-dir {wandb['output_dir']}` "
                     "(needs WANDB_API_KEY).")
    return lines


def write_report(summary: dict, sweep_dir: Path) -> dict[str, Path]:
    """summary.json, report.md and the charts under the sweep's directory."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    charts = draw_charts(summary["trials"], sweep_dir)
    atomic_write(sweep_dir / "report.md", render_markdown(summary, charts))
    if summary.get("timings") is not None:  # the last phase summary.json can hold: charts and report.md
        summary["timings"]["report_files"] = round(time.perf_counter() - started, 3)
    write_json(sweep_dir / "summary.json", summary)
    return {"summary": sweep_dir / "summary.json", "report": sweep_dir / "report.md",
            **{name: sweep_dir / file for name, file in charts.items()}}


def ui_table(summary: dict) -> list[dict]:
    """The trial table for the Prefect UI: rounded, ordered columns, the model with its digest."""
    def pct(value):
        return None if value is None else round(100 * value, 2)

    return [{"learning rate": f"{r['learning_rate']:g}", "seed": r["seed"], "status": r["status"],
             "val acc %": pct(r["val_accuracy"]), "test acc %": pct(r["test_accuracy"]),
             "train acc %": pct(r["train_accuracy"]),
             "val loss": None if r["val_loss"] is None else round(r["val_loss"], 4),
             "epochs": r["epochs"], "seconds": None if r["train_seconds"] is None else round(r["train_seconds"], 1),
             "images/s": None if r["images_per_second"] is None else round(r["images_per_second"]),
             "model": r["model"] or "-"} for r in trial_table(summary["trials"])]


@task(name="write_report", task_run_name="write report", cache_policy=NO_CACHE)
def write_report_task(summary: dict, sweep_dir: Path) -> tuple[dict[str, str], str]:
    """The report files, and the same report with its charts embedded, for the Prefect UI."""
    files = write_report(summary, sweep_dir)
    embedded = render_markdown(summary, {name: data_uri(files[name]) for name in files
                                         if name not in ("summary", "report")})
    return {name: str(path) for name, path in files.items()}, embedded
