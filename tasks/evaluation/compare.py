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
from dataclasses import dataclass
from statistics import mean, stdev
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from models.registry import AliasConflict, ModelRef, ModelRegistry, RegistryError
from models.sources import ModelCodeChanged
from tasks.data.dataset import DatasetRef
from tasks.evaluation import student_t
from tasks.evaluation.evaluate import DatasetMismatch, evaluate_on_free_device
from tasks.evaluation.ranking import higher_is_better, order_key
from tasks.results import Evaluation, Promotion, TrialOutcome
from tasks.training.devices import DeviceSlots
from tasks.workspace import Workspace

ALPHA = 0.05
GATE_METRIC = "test_accuracy"
METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")
PROMOTED_EVENT = "lr-sweep.model.promoted"


def usable(trials: list[TrialOutcome]) -> list[TrialOutcome]:
    return [t for t in trials if t.usable]


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation and a 95% t confidence interval of per-seed values."""
    n = len(values)
    centre = mean(values)
    spread = stdev(values) if n > 1 else 0.0
    half_width = None
    if n > 1:
        half_width = student_t.quantile(0.975, n - 1) * spread / math.sqrt(n)
    return {
        "n": n, "mean": centre, "std": spread,
        "ci95": [centre - half_width, centre + half_width] if half_width is not None else None,
    }


def seeds_of(trials: list[TrialOutcome], learning_rate: float) -> list[TrialOutcome]:
    return sorted((t for t in usable(trials) if t.learning_rate == learning_rate), key=lambda t: t.seed)


def aggregate_by_rate(trials: list[TrialOutcome]) -> list[dict]:
    """One row per learning rate with the statistics of every final metric over its seeds."""
    rows = []
    for rate in sorted({t.learning_rate for t in usable(trials)}):
        group = seeds_of(trials, rate)
        rows.append({
            "learning_rate": rate,
            "seeds": [t.seed for t in group],
            **{metric: describe([t.evaluation.metric(metric) for t in group]) for metric in METRICS},
        })
    return rows


def rank_rates(rows: list[dict], metric: str) -> list[dict]:
    higher = higher_is_better(metric)
    return sorted(rows, key=lambda r: order_key(higher, r[metric]["mean"], r["val_loss"]["mean"], r["learning_rate"]))


def best_trial(trials: list[TrialOutcome], learning_rate: float, metric: str) -> TrialOutcome:
    higher = higher_is_better(metric)
    return min(seeds_of(trials, learning_rate),
               key=lambda t: order_key(higher, t.evaluation.metric(metric), t.evaluation.val_loss, t.seed))


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
        p_value = student_t.welch_p_value(winner, runner_up)
    significant = p_value < ALPHA
    # What the test says, and nothing about the spread: the verdict compares the lead with the
    # standard deviations itself, and a lead above both can still fail the test on few seeds.
    seeds = (f"{len(winner)} seeds per rate" if len(winner) == len(runner_up)
             else f"{len(winner)} and {len(runner_up)} seeds")
    note = (f"Welch's t-test on {seeds} gives p = {p_value:.3g}: " +
            (f"significant at {ALPHA}" if significant
             else f"not significant at {ALPHA}, so these seeds cannot tell the two rates apart"))
    return {"test": "welch_t", "p_value": p_value, "significant": significant, "note": note}


# Accuracies are whole images over the test set (k/N), but as floats 0.8130 - 0.8120 is
# 0.00099999...: a lead of exactly the margin was refused. Differences are compared with this
# tolerance, far below one image of any test set (1e-9 is one image in a billion) and far above
# the rounding of a subtraction (about 1e-16).
GATE_TOLERANCE = 1e-9


def gate(challenger: Evaluation, champion: Evaluation | None, margin: float) -> tuple[bool, str]:
    """Champion/challenger on the same test set: (promote?, reason). The one decision: the
    challenger must be better (by at least one image) and by at least `margin`, both within
    GATE_TOLERANCE."""
    if champion is None:
        return True, "no model held the alias"
    ours, theirs = challenger.metric(GATE_METRIC), champion.metric(GATE_METRIC)
    delta = ours - theirs
    figures = f"challenger test accuracy {ours:.4f} vs holder {theirs:.4f} ({delta:+.4f}, margin {margin:g})"
    if delta > GATE_TOLERANCE and delta >= margin - GATE_TOLERANCE:
        return True, f"better than the holder: {figures}"
    return False, f"not better than the holder by more than the margin: {figures}"


@dataclass(frozen=True)
class Selection:
    ranking: list[dict]  # statistics per learning rate, best first (summary.json's `aggregates`)
    winner: dict
    best: TrialOutcome  # the winner's best seed: the promotion candidate
    significance: dict | None


@dataclass(frozen=True)
class Decision:
    selection: Selection | None
    promotion: Promotion

    @property
    def best(self) -> TrialOutcome | None:
        return self.selection.best if self.selection else None


def select(trials: list[TrialOutcome], metric: str) -> Selection | None:
    """The winning rate, its promoted trial, the ranking and the significance of the lead."""
    rows = rank_rates(aggregate_by_rate(trials), metric)
    if not rows:
        return None
    winner = rows[0]
    test = None
    if len(rows) > 1:
        test = significance(*[[t.evaluation.metric(metric) for t in seeds_of(trials, row["learning_rate"])]
                              for row in rows[:2]])
    return Selection(ranking=rows, winner=winner, best=best_trial(trials, winner["learning_rate"], metric),
                     significance=test)


# A competing sweep can move the alias between our look at the holder and our move; the decision
# is then made again against the new holder, at most this many times.
PROMOTION_ATTEMPTS = 5


def compare_and_promote(registry: ModelRegistry, trials: list[TrialOutcome], *, alias: str, metric: str,
                        margin: float, evaluate_ref: Callable[[ModelRef], Evaluation]) -> Decision:
    """Pick the best model and move the alias to it if it beats the holder; the sweep's decision.

    The candidate is the trial's own reference, digest included: the registry refuses to move
    the alias to a version whose digest is not the one the trial recorded."""
    selection = select(trials, metric)
    if selection is None:
        return Decision(None, Promotion(alias=alias, promoted=False,
                                        reason="no trial produced a usable model; the alias stays where it was"))
    best = selection.best
    for _ in range(PROMOTION_ATTEMPTS):
        promotion, holder = decide_promotion(registry, best.model, best.evaluation, alias, margin, evaluate_ref)
        if not promotion.promoted:
            break
        try:
            registry.move_alias(best.model, alias, reason=promotion.reason, expected_holder=holder,
                                metrics=best.evaluation.model_dump())
            break
        except AliasConflict:
            continue  # another sweep promoted meanwhile: judge again against its model
    else:
        promotion = promotion.model_copy(update={
            "promoted": False, "reason": f"'{alias}' kept moving under concurrent promotions; left where it is"})
    return Decision(selection, promotion)


def decide_promotion(registry: ModelRegistry, candidate: ModelRef, evaluation: Evaluation, alias: str,
                     margin: float, evaluate_ref: Callable[[ModelRef], Evaluation]) -> tuple[Promotion, ModelRef | None]:
    """The champion/challenger decision against the alias's current holder (nothing is moved).

    Returns the promotion record and the holder it was decided against."""
    holder = registry.resolve(candidate.collection, alias)
    decided = {"alias": alias, "model": candidate, "previous": holder, "challenger_evaluation": evaluation}
    if holder == candidate:
        return Promotion(**decided, promoted=False, reason=f"{candidate} already holds '{alias}'"), holder
    if holder is None:
        promote, reason = gate(evaluation, None, margin)
        return Promotion(**decided, promoted=promote, reason=reason), holder
    try:
        champion = evaluate_ref(holder)
    except DatasetMismatch as error:
        return Promotion(**decided, promoted=False, reason=(
            f"the holder {holder} cannot be compared on this data ({error}); the alias stays "
            "(use `lr-sweep promote ... --force` to move it anyway)")), holder
    except RegistryError as error:
        # A holder that fails its digest check cannot be served; it is no reason to keep it.
        return Promotion(**decided, promoted=True, holder_error=str(error),
                         reason=f"the holder {holder} could not be evaluated ({error})"), holder
    except ModelCodeChanged:
        return gate_on_record(registry, candidate, holder, decided, evaluation, margin), holder
    promote, reason = gate(evaluation, champion, margin)
    return Promotion(**decided, promoted=promote, reason=reason, holder_evaluation=champion), holder


def gate_on_record(registry: ModelRegistry, candidate: ModelRef, holder: ModelRef, decided: dict,
                   evaluation: Evaluation, margin: float) -> Promotion:
    """The gate against a holder this code cannot rebuild (it was trained with other model code:
    the user edited the model between sweeps): on the test metrics recorded when it took the
    alias, if they were measured on the same data; otherwise the alias stays."""
    other_code = f"{holder.version} was trained with other model code"
    recorded = registry.recorded_metrics(holder)
    if recorded is None:
        return Promotion(**decided, promoted=False, reason=(
            f"{other_code} and no test accuracy was recorded when it took the alias: the alias stays "
            f"(`lr-sweep promote {candidate} --alias {decided['alias']} --force` moves it)"))
    fingerprints = {str(ref): (registry.fetch(ref).metadata.get("dataset") or {}).get("fingerprint")
                    for ref in (holder, candidate)}
    if len(set(fingerprints.values())) != 1:
        return Promotion(**decided, promoted=False, reason=(
            f"{other_code}, and its recorded test accuracy was measured on other data: the alias stays "
            "(use `lr-sweep promote ... --force` to move it anyway)"))
    try:
        champion = Evaluation(**{name: recorded[name] for name in Evaluation.model_fields})
    except (KeyError, TypeError, ValueError) as error:  # a record written by hand, or damaged
        return Promotion(**decided, promoted=False, reason=(
            f"{other_code}, and its recorded metrics cannot be read ({type(error).__name__}: {error}): "
            "the alias stays"))
    promote, reason = gate(evaluation, champion, margin)
    return Promotion(**decided, promoted=promote, holder_evaluation=champion,
                     reason=f"{other_code}: compared on its recorded test accuracy; {reason}")


def promotion_line(promotion: Promotion, limited: bool) -> str:
    """One log line: `production: v1 -> v3, test acc 0.873 -> 0.909` (or why it stayed)."""
    smoke = " [smoke run: train_limit set]" if limited else ""
    if not promotion.promoted:
        return f"{promotion.alias}: stays on {promotion.previous or 'no model'}: {promotion.reason}{smoke}"
    before = promotion.holder_evaluation.test_accuracy if promotion.holder_evaluation else None
    after = promotion.challenger_evaluation.test_accuracy
    return (f"{promotion.alias}: {promotion.previous.version if promotion.previous else 'unset'} -> "
            f"{promotion.model.version}, test acc {'-' if before is None else f'{before:.3f}'} -> "
            f"{after:.3f} (digest {promotion.model.digest[:12]}){smoke}")


def emit_promoted(promotion: Promotion, sweep_id: str | None, registry_dir: str, limited: bool) -> None:
    """The event a Prefect automation reacts to (prefect.yaml: lr-sweep-export)."""
    model = promotion.model
    emit_event(
        event=PROMOTED_EVENT,
        resource={"prefect.resource.id": f"lr-sweep.model.{model.collection}",
                  "lr-sweep.collection": model.collection, "lr-sweep.alias": promotion.alias},
        payload={"collection": model.collection, "alias": promotion.alias, "version": model.version,
                 "digest": model.digest, "previous_version": promotion.previous.version if promotion.previous else None,
                 "previous_digest": promotion.previous.digest if promotion.previous else None,
                 # a manual promotion with --force measures nothing
                 "metrics": promotion.challenger_evaluation.model_dump() if promotion.challenger_evaluation else None,
                 "sweep_id": sweep_id, "reason": promotion.reason,
                 "registry_dir": registry_dir, "smoke": limited})


@task(name="compare_and_promote", task_run_name="compare and promote '{alias}'", cache_policy=NO_CACHE)
def compare_and_promote_task(trials: list[TrialOutcome], dataset: DatasetRef, workspace: Workspace,
                             slots: DeviceSlots, *, alias: str, metric: str, margin: float) -> Decision:
    """The only step that moves an alias: once, after every trial has been evaluated."""
    decision = compare_and_promote(
        workspace.registry.open(), trials, alias=alias, metric=metric, margin=margin,
        evaluate_ref=lambda ref: evaluate_on_free_device(ref, dataset, workspace, slots))
    limited = dataset.train_limit is not None
    get_run_logger().info(promotion_line(decision.promotion, limited))
    if decision.promotion.promoted:
        emit_promoted(decision.promotion, workspace.sweep_id, str(workspace.registry.directory), limited)
    return decision
