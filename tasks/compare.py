"""Selection and promotion: which learning rate won, is the lead real, does it take the alias.

Rules (also stated in every report):
- The winning learning rate has the best MEAN selection metric over its seeds; ties go to the
  lower mean validation loss, then to the smaller learning rate.
- The promoted model is the winner's best seed by the same metric (ties: lower validation loss,
  then the lower seed).
- Whether the lead over the runner-up is larger than seed noise is Welch's t-test on the
  per-seed values (two-sided, alpha 0.05); with one seed per rate no test is possible and the
  report says so.
- Champion/challenger: the current alias holder and the challenger are measured on the same test
  set; the alias moves only when the challenger's test accuracy is higher by more than nothing and
  by at least the margin. It moves once, here, under the registry's lock.
"""

from __future__ import annotations

import math
import warnings
from statistics import mean, stdev
from typing import Callable

from scipy import stats

from models.registry import AliasConflict, ModelRef, ModelRegistry, RegistryError, split_name

ALPHA = 0.05
GATE_METRIC = "test_accuracy"
METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def usable(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t["status"] == "completed" and t.get("evaluation")]


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation and a 95% t confidence interval of per-seed values."""
    n = len(values)
    centre = mean(values)
    spread = stdev(values) if n > 1 else 0.0
    half_width = stats.t.ppf(0.975, n - 1) * spread / math.sqrt(n) if n > 1 else None
    return {
        "n": n, "mean": centre, "std": spread,
        "ci95": [centre - half_width, centre + half_width] if half_width is not None else None,
    }


def aggregate_by_rate(trials: list[dict]) -> list[dict]:
    """One row per learning rate with the statistics of every final metric over its seeds."""
    rows = []
    for rate in sorted({t["learning_rate"] for t in usable(trials)}):
        group = sorted((t for t in usable(trials) if t["learning_rate"] == rate), key=lambda t: t["seed"])
        rows.append({
            "learning_rate": rate,
            "seeds": [t["seed"] for t in group],
            **{metric: describe([t["evaluation"][metric] for t in group]) for metric in METRICS},
        })
    return rows


def _sort_key(metric: str, value: float, val_loss: float, *tie_breaks) -> tuple:
    return (-value if higher_is_better(metric) else value, val_loss, *tie_breaks)


def rank_rates(rows: list[dict], metric: str) -> list[dict]:
    return sorted(rows, key=lambda r: _sort_key(metric, r[metric]["mean"], r["val_loss"]["mean"], r["learning_rate"]))


def best_trial(trials: list[dict], learning_rate: float, metric: str) -> dict:
    group = [t for t in usable(trials) if t["learning_rate"] == learning_rate]
    return min(group, key=lambda t: _sort_key(metric, t["evaluation"][metric], t["evaluation"]["val_loss"], t["seed"]))


def significance(winner: list[float], runner_up: list[float]) -> dict:
    """Welch's t-test of the winner's per-seed values against the runner-up's."""
    if len(winner) < 2 or len(runner_up) < 2:
        return {"test": None, "p_value": None, "significant": None,
                "note": "one seed per learning rate: the lead cannot be told from seed noise; "
                        "repeat with several seeds (e.g. --seeds 0 1 2) to test it"}
    if stdev(winner) == 0 and stdev(runner_up) == 0:
        # No spread at all (e.g. deterministic CPU runs of one seed repeated): the t statistic is
        # undefined; identical values are no lead, different ones are a certain one.
        p_value = 1.0 if mean(winner) == mean(runner_up) else 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note for tiny spreads
            p_value = float(stats.ttest_ind(winner, runner_up, equal_var=False).pvalue)
    significant = p_value < ALPHA
    note = (f"Welch's t-test p = {p_value:.3g}: " +
            (f"the lead is larger than the seed-to-seed spread (p < {ALPHA})" if significant
             else f"the lead is NOT larger than the seed-to-seed spread (p >= {ALPHA}); "
                  "the two rates are indistinguishable with these seeds"))
    return {"test": "welch_t", "p_value": p_value, "significant": significant, "note": note}


def gate(challenger: dict, champion: dict | None, margin: float) -> tuple[bool, str]:
    """Champion/challenger on the same test set: (promote?, reason)."""
    if champion is None:
        return True, "no model held the alias"
    delta = challenger[GATE_METRIC] - champion[GATE_METRIC]
    figures = (f"challenger test accuracy {challenger[GATE_METRIC]:.4f} vs "
               f"holder {champion[GATE_METRIC]:.4f} ({delta:+.4f}, margin {margin:g})")
    if delta > 0 and delta >= margin:
        return True, f"better than the holder: {figures}"
    return False, f"not better than the holder by more than the margin: {figures}"


def select(trials: list[dict], metric: str) -> dict | None:
    """The winning rate, its promoted trial, the ranking and the significance of the lead."""
    rows = rank_rates(aggregate_by_rate(trials), metric)
    if not rows:
        return None
    winner = rows[0]
    chosen = best_trial(trials, winner["learning_rate"], metric)
    test = None
    if len(rows) > 1:
        values = {r["learning_rate"]: [t["evaluation"][metric] for t in usable(trials)
                                       if t["learning_rate"] == r["learning_rate"]] for r in rows[:2]}
        test = significance(values[winner["learning_rate"]], values[rows[1]["learning_rate"]])
    return {"ranking": rows, "winner": winner, "best": chosen, "significance": test}


# A competing sweep can move the alias between our look at the holder and our move; the decision
# is then made again against the new holder, at most this many times.
PROMOTION_ATTEMPTS = 5


def compare_and_promote(registry: ModelRegistry, trials: list[dict], *, alias: str, metric: str,
                        margin: float, evaluate_ref: Callable[[str], dict]) -> dict:
    """Pick the best model and move the alias to it if it beats the holder; the sweep's decision."""
    selection = select(trials, metric)
    if selection is None:
        return {"selection": None, "best": None,
                "promotion": {"alias": alias, "model": None, "previous": None, "promoted": False,
                              "reason": "no trial produced a usable model; the alias stays where it was"}}
    best = selection["best"]
    candidate = registry.resolve(*split_name(best["model"]))
    for _ in range(PROMOTION_ATTEMPTS):
        promotion, holder = decide_promotion(registry, candidate, best["evaluation"], alias, margin, evaluate_ref)
        if not promotion["promoted"]:
            break
        try:
            registry.move_alias(candidate, alias, reason=promotion["reason"], expected_holder=holder)
            break
        except AliasConflict:
            continue  # another sweep promoted meanwhile: judge again against its model
    else:
        promotion.update(promoted=False, reason=f"'{alias}' kept moving under concurrent promotions; "
                                                "left where it is")
    return {"selection": selection, "best": best, "promotion": promotion}


def decide_promotion(registry: ModelRegistry, candidate: ModelRef, evaluation: dict, alias: str,
                     margin: float, evaluate_ref: Callable[[str], dict]) -> tuple[dict, ModelRef | None]:
    """The champion/challenger decision against the alias's current holder (nothing is moved).

    Returns the promotion record and the holder it was decided against."""
    holder = registry.resolve(candidate.collection, alias)
    promotion = {"alias": alias, "model": str(candidate), "previous": str(holder) if holder else None,
                 "promoted": False, "challenger_evaluation": evaluation, "holder_evaluation": None}
    if holder == candidate:
        promotion["reason"] = f"{candidate} already holds '{alias}'"
        return promotion, holder
    champion = None
    if holder is not None:
        try:
            champion = evaluate_ref(str(holder))
            promotion["holder_evaluation"] = champion
        except RegistryError as error:
            # A holder that fails its digest check cannot be served; it is no reason to keep it.
            promotion["holder_error"] = str(error)
    promote, reason = gate(evaluation, champion, margin)
    if holder is not None and champion is None:
        reason = f"the holder {holder} could not be evaluated ({promotion['holder_error']})"
    promotion.update(promoted=promote, reason=reason)
    return promotion, holder


# --- Prefect ---------------------------------------------------------------------------------------

from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.context import SweepContext  # noqa: E402
from tasks.data import DatasetRef  # noqa: E402
from tasks.evaluate import evaluate_in_sweep  # noqa: E402


@task(name="compare_and_promote", cache_policy=NO_CACHE)
def compare_and_promote_task(trials: list[dict], dataset: DatasetRef, context: SweepContext, *,
                             alias: str, metric: str, margin: float) -> dict:
    """The only step that moves an alias: once, after every trial has been evaluated."""
    return compare_and_promote(
        context.registry(), trials, alias=alias, metric=metric, margin=margin,
        evaluate_ref=lambda ref: evaluate_in_sweep(ref, dataset, context),
    )
