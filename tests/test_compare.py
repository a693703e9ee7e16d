"""Statistics, selection, the champion/challenger gate and the written verdict, on fixed numbers."""


import pytest

from models.local_registry import LocalRegistry
from models.registry import DigestMismatch, ModelRef
from tasks.evaluation import student_t
from tasks.evaluation.compare import aggregate_by_rate, compare_and_promote, describe, gate, select, significance
from tasks.reporting.report import observations, trial_record, verdict
from tasks.results import Evaluation, TrialOutcome
from tests.helpers import tiny_model

COLLECTION = "fashion-mnist-cnn"


def evaluation(accuracy, loss=0.3, test_accuracy=None):
    return Evaluation(val_accuracy=accuracy, val_loss=loss,
                      test_accuracy=accuracy if test_accuracy is None else test_accuracy, test_loss=loss)


def trial(rate, seed, val_accuracy, test_accuracy=None, val_loss=0.3, model=None, status="completed", history=()):
    model = model or ModelRef(collection=COLLECTION, version=f"v{seed}", digest=f"{rate}-{seed}")
    return TrialOutcome(learning_rate=rate, seed=seed, status=status, model=model, history=list(history),
                        evaluation=evaluation(val_accuracy, val_loss, test_accuracy))


def diverged(rate, seed):
    return TrialOutcome(learning_rate=rate, seed=seed, status="diverged")


def test_describe_known_values():
    stats = describe([0.90, 0.92, 0.94])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.92)
    assert stats["std"] == pytest.approx(0.02)  # sample standard deviation
    # t(0.975, 2) = 4.302653; half width = 4.302653 * 0.02 / sqrt(3)
    assert stats["ci95"] == pytest.approx([0.92 - 0.049683, 0.92 + 0.049683], abs=1e-6)
    assert describe([0.5])["ci95"] is None and describe([0.5])["std"] == 0


def test_welch_test_known_p_value():
    result = significance([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    # means differ by 0.1, both std 0.01, n 3: t = 12.247, df = 4, p = 2.55e-4
    assert result["test"] == "welch_t"
    assert result["p_value"] == pytest.approx(2.55e-4, rel=0.01)
    assert result["significant"] is True


# scipy 1.17's stats.t.ppf(0.975, df) and stats.ttest_ind(a, b, equal_var=False).pvalue, taken
# once: student_t replaces them and must agree to well below any digit a report prints.
T_QUANTILES = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.1824463052837078, 4: 2.7764451051977934,
               9: 2.262157162798205, 30: 2.0422724563012378, 1000: 1.9623390808264083}
WELCH_P_VALUES = [
    ([0.91, 0.92, 0.915], [0.88, 0.885, 0.879], 0.0012842824215231817),
    ([0.5, 0.52], [0.49, 0.53], 1.0),
    ([1.0, 2.0, 3.0, 4.0], [1.5, 1.6], 0.23754208349369624),  # fractional df
    ([0.8123, 0.8124, 0.8125], [0.8123, 0.8124, 0.81251], 0.9701572051720609),
    ([10, 11, 12, 13, 14], [30, 35, 20, 25, 40, 31, 32], 0.00018113239143561637),
]


@pytest.mark.parametrize("df, expected", T_QUANTILES.items())
def test_the_t_quantile_agrees_with_scipy(df, expected):
    assert student_t.quantile(0.975, df) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("first, second, expected", WELCH_P_VALUES)
def test_welch_p_value_agrees_with_scipy(first, second, expected):
    assert student_t.welch_p_value(first, second) == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert student_t.welch_p_value(second, first) == pytest.approx(expected, rel=1e-10, abs=1e-15)


def test_overlapping_seeds_are_not_significant():
    result = significance([0.873, 0.861, 0.868], [0.870, 0.866, 0.859])
    assert result["significant"] is False and "not significant at 0.05" in result["note"]


def test_one_seed_each_says_no_test_is_possible():
    result = significance([0.9873], [0.9862])
    assert result["p_value"] is None and "cannot be told from seed noise" in result["note"]


def test_winner_is_best_mean_and_promoted_model_is_its_best_seed():
    trials = [trial(0.01, 0, 0.90), trial(0.01, 1, 0.80),   # mean 0.85, one lucky seed
              trial(0.001, 0, 0.87), trial(0.001, 1, 0.87)]  # mean 0.87
    selection = select(trials, "val_accuracy")
    assert selection.winner["learning_rate"] == 0.001
    assert selection.best.seed == 0  # tie on accuracy and loss: the lower seed
    assert [r["learning_rate"] for r in selection.ranking] == [0.001, 0.01]


def test_loss_metric_prefers_lower_and_ties_are_deterministic():
    trials = [trial(0.01, 0, 0.9, val_loss=0.5), trial(0.001, 0, 0.9, val_loss=0.4)]
    assert select(trials, "val_loss").winner["learning_rate"] == 0.001
    tie = [trial(0.01, 0, 0.9), trial(0.001, 0, 0.9)]
    assert select(tie, "val_accuracy").winner["learning_rate"] == 0.001  # smaller rate wins a tie
    assert select(list(reversed(tie)), "val_accuracy").winner["learning_rate"] == 0.001


def test_failed_trials_are_not_aggregated():
    trials = [trial(0.01, 0, 0.9), diverged(0.1, 0)]
    assert [r["learning_rate"] for r in aggregate_by_rate(trials)] == [0.01]


@pytest.mark.parametrize("challenger, champion, margin, promoted", [
    (0.90, None, 0.0, True),     # no champion
    (0.89, 0.90, 0.0, False),    # worse
    (0.90, 0.90, 0.0, False),    # equal: not better, the alias stays
    (0.91, 0.90, 0.0, True),     # better
    (0.905, 0.90, 0.01, False),  # better, but by less than the margin
    (0.92, 0.90, 0.01, True),    # better by more than the margin
    (0.8130, 0.8120, 0.001, True),   # by exactly the margin (as floats 0.000999...): 10 of 10,000 images
    (0.8129, 0.8120, 0.001, False),  # one image short of the margin
    (0.8121, 0.8120, 0.0, True),     # one image better, no margin
])
def test_gate(challenger, champion, margin, promoted):
    decision, reason = gate(evaluation(0.5, test_accuracy=challenger),
                            None if champion is None else evaluation(0.5, test_accuracy=champion), margin)
    assert decision is promoted
    assert reason


def history(*val_accuracies, train_gap=0.0, val_losses=None):
    losses = val_losses or [0.5 - 0.01 * i for i in range(len(val_accuracies))]
    return [{"epoch": i + 1, "train_loss": loss, "train_accuracy": acc + train_gap,
             "val_loss": loss, "val_accuracy": acc}
            for i, (acc, loss) in enumerate(zip(val_accuracies, losses))]


def test_observations_on_crafted_histories():
    undertrained = observations(history(0.70, 0.78, 0.84, 0.88))
    assert undertrained["undertrained"] and undertrained["last_epoch_gain"] == pytest.approx(0.04)
    assert undertrained["convergence_epoch"] == 3  # first epoch >= 0.95 * 0.88 = 0.836
    overfit = observations(history(0.90, 0.901, 0.901, train_gap=0.08))
    assert overfit["overfitting"] and not overfit["undertrained"]
    unstable = observations(history(0.85, 0.86, 0.86, val_losses=[0.40, 0.60, 0.41]))
    assert unstable["unstable"] and unstable["worst_val_loss_rise"][0] == 2


def summary_for(trials, promotion=None):
    selection = select(trials, "val_accuracy")
    return {"aggregates": selection.ranking, "significance": selection.significance,
            "best": {"learning_rate": selection.best.learning_rate, "seed": selection.best.seed,
                     "model": "c:v0"}, "trials": [trial_record(t) for t in trials],
            "promotion": promotion or {"alias": "production", "promoted": True, "model": "c:v0",
                                       "reason": "no model held the alias"}}


def test_verdict_clear_winner_states_figures_and_significance():
    trials = [trial(0.001, s, 0.90 + 0.001 * s, history=history(0.8, 0.90 + 0.001 * s)) for s in range(3)] + \
             [trial(0.0001, s, 0.80 + 0.001 * s, history=history(0.8, 0.80 + 0.001 * s)) for s in range(3)]
    text = "\n".join(verdict(summary_for(trials), "val_accuracy"))
    assert "Learning rate 0.001 won" in text and "0.9010" in text
    assert "lead of 0.1000 (10.00 points), larger than either rate's seed-to-seed standard deviation " \
        "(0.0010, 0.0010); and Welch's t-test on 3 seeds per rate gives p = " in text
    assert ": significant at 0.05" in text
    assert "moved 'production' to c:v0" in text


def test_verdict_tie_says_the_rates_are_indistinguishable():
    trials = [trial(rate, seed, accuracy, history=history(0.85, accuracy))
              for rate, seed, accuracy in ((0.001, 0, 0.873), (0.001, 1, 0.861), (0.0005, 0, 0.870), (0.0005, 1, 0.862))]
    text = "\n".join(verdict(summary_for(trials), "val_accuracy"))
    assert "within the larger seed-to-seed standard deviation of the two (0.0085); and Welch's t-test" in text
    assert "not significant at 0.05, so these seeds cannot tell the two rates apart" in text


def test_verdict_says_which_test_says_what_when_they_disagree():
    """A lead larger than both spreads that two seeds cannot confirm: one sentence, joined by 'but'."""
    trials = [trial(rate, seed, accuracy, history=history(0.7, accuracy))
              for rate, seed, accuracy in ((0.001, 0, 0.80), (0.001, 1, 0.75), (0.0005, 0, 0.76), (0.0005, 1, 0.71))]
    text = "\n".join(verdict(summary_for(trials), "val_accuracy"))
    assert "a lead of 0.0400 (4.00 points), larger than either rate's seed-to-seed standard deviation " \
           "(0.0354, 0.0354); but Welch's t-test on 2 seeds per rate gives p = 0.375: not significant at 0.05" in text
    assert "NOT larger" not in text and "spread" not in text


def test_verdict_says_a_one_epoch_train_accuracy_is_a_running_average():
    """Train accuracy is averaged over the epoch while the model learns; validation is measured
    after it. One epoch from scratch puts train 15 points below validation: the report says why."""
    one_epoch = [{"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.556, "val_loss": 0.80, "val_accuracy": 0.703}]
    text = "\n".join(verdict(summary_for([trial(0.001, 0, 0.703, history=one_epoch)]), "val_accuracy"))
    assert "train-val accuracy gap -14.70 points (train accuracy is the running average over epoch 1 " \
           "while the model learned; validation accuracy is measured after it)" in text


def test_verdict_flags_undertrained_and_overfitting_runs():
    under = trial(0.0001, 0, 0.88, history=history(0.70, 0.80, 0.88))
    over = trial(0.01, 0, 0.86, history=history(0.86, 0.86, 0.86, train_gap=0.09))
    text = "\n".join(verdict(summary_for([under, over]), "val_accuracy"))
    assert "lr 0.0001 (seed 0): " in text and "under-trained" in text
    assert "lr 0.01 (seed 0): " in text and "(overfitting)" in text


def small_model(tmp_registry, seed):
    return tmp_registry.log_model(COLLECTION, *tiny_model(seed))


def test_alias_stays_with_a_better_holder_and_moves_to_a_better_challenger(tmp_path):
    registry = LocalRegistry(tmp_path)
    holder, weak, strong = (small_model(registry, s) for s in range(3))
    registry.move_alias(holder, "production")
    scores = {holder: 0.90, weak: 0.85, strong: 0.95}

    def evaluate(ref):
        return evaluation(scores[ref])

    def sweep_of(ref):
        return [trial(0.001, 0, scores[ref], model=ref)]

    kept = compare_and_promote(registry, sweep_of(weak), alias="production", metric="val_accuracy",
                               margin=0.0, evaluate_ref=evaluate).promotion
    assert kept.promoted is False and "not better" in kept.reason
    assert registry.resolve(COLLECTION, "production") == holder
    moved = compare_and_promote(registry, sweep_of(strong), alias="production", metric="val_accuracy",
                                margin=0.0, evaluate_ref=evaluate).promotion
    assert moved.promoted is True and moved.previous == holder
    assert registry.resolve(COLLECTION, "production") == strong


def test_no_usable_model_leaves_the_alias(tmp_path):
    registry = LocalRegistry(tmp_path)
    holder = small_model(registry, 0)
    registry.move_alias(holder, "production")
    failed = [diverged(0.1, 0)]
    decision = compare_and_promote(registry, failed, alias="production", metric="val_accuracy", margin=0.0,
                                   evaluate_ref=lambda ref: pytest.fail("nothing to evaluate"))
    assert decision.best is None and decision.promotion.promoted is False
    assert registry.resolve(COLLECTION, "production") == holder


def test_a_candidate_whose_digest_is_not_the_stored_ones_is_never_promoted(tmp_path):
    """Two trials on two nodes each stored a `v0`; the sweep's registry holds the other
    node's model under that name. The candidate is refused by digest; the alias stays."""
    registry = LocalRegistry(tmp_path)
    ours = small_model(registry, 0)
    registry.move_alias(ours, "production")
    theirs = ModelRef(collection=COLLECTION, version="v1", digest="f" * 64)  # v1 here is another model
    small_model(registry, 1)
    with pytest.raises(DigestMismatch, match="not the ffffffffffff"):
        compare_and_promote(registry, [trial(0.001, 0, 0.99, model=theirs)], alias="production",
                            metric="val_accuracy", margin=0.0, evaluate_ref=lambda ref: evaluation(0.5))
    assert registry.resolve(COLLECTION, "production") == ours
