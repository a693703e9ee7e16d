"""Faults inside real flow runs: a trial that raises and a trial that diverges (one sweep, with
secrets in the environment), a sweep with no usable model, a dispatched trial whose model is not
in the sweep's registry, and two processes promoting at once."""

import json
import multiprocessing
from pathlib import Path

import pytest

import tasks.training.train
from flows.dispatch import RegistryNotShared, require_shared_registry
from flows.sweep import SweepFailed, lr_sweep
from models.local_registry import LocalRegistry
from models.registry import ModelRef
from tasks.evaluation.compare import compare_and_promote
from tasks.results import Evaluation, TrialOutcome
from tests.helpers import COLLECTION, smoke_config, tiny_model

SECRETS = {"WANDB_API_KEY": "wandb-secret-" + "7" * 28, "PREFECT_API_KEY": "pnu_secret" + "9" * 26}


@pytest.fixture(scope="module")
def faulty_sweep(prefect_server, sweep_data_dir, tmp_path_factory):
    """One sweep with a trial that raises (lr 0.0001), one that diverges (lr 10) and one that
    works (lr 0.001), run with fake W&B and Prefect keys in the environment."""
    tmp_path = tmp_path_factory.mktemp("faults")
    real_train = tasks.training.train.train_trial

    def broken_for_one_rate(spec, *args, **kwargs):
        if spec.learning_rate == 0.0001:
            raise RuntimeError("simulated fault: out of device memory")
        return real_train(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks.training.train, "train_trial", broken_for_one_rate)
        for name, value in SECRETS.items():
            patch.setenv(name, value)
        config = smoke_config(tmp_path, sweep_data_dir, learning_rates=[0.001, 10.0, 0.0001])
        return config, lr_sweep(config=config)


def test_a_trial_that_raises_is_recorded_and_the_others_are_compared(faulty_sweep):
    _, summary = faulty_sweep
    by_rate = {t["learning_rate"]: t for t in summary["trials"]}
    assert by_rate[0.0001]["status"] == "failed"
    assert "simulated fault" in by_rate[0.0001]["error"] and by_rate[0.0001]["model"] is None
    assert by_rate[0.001]["status"] == "completed"
    assert summary["promotion"]["promoted"] and summary["best"]["model"] == by_rate[0.001]["model"]
    assert "failed: RuntimeError: simulated fault" in Path(summary["files"]["report"]).read_text()


def test_a_diverged_trial_is_stopped_and_never_stored(faulty_sweep):
    config, summary = faulty_sweep
    by_rate = {t["learning_rate"]: t for t in summary["trials"]}
    assert by_rate[10.0]["status"] == "diverged" and "was stopped" in by_rate[10.0]["error"]
    assert by_rate[10.0]["model"] is None
    versions = LocalRegistry(config.registry_dir).versions(COLLECTION)
    assert [v.metadata["training"]["learning_rate"] for v in versions] == [0.001]
    assert str(LocalRegistry(config.registry_dir).resolve(COLLECTION, "production")) == by_rate[0.001]["model"]


def test_secrets_never_reach_outputs(faulty_sweep):
    config, _ = faulty_sweep
    written = [p for root in (config.output_dir, config.registry_dir) for p in Path(root).rglob("*") if p.is_file()]
    assert len(written) > 10
    for path in written:
        content = path.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in content, f"{value[:12]}... leaked into {path}"


def test_no_usable_model_fails_the_flow_and_keeps_the_alias(prefect_server, sweep_data_dir, tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    holder = registry.log_model(COLLECTION, *tiny_model(0))
    registry.move_alias(holder, "production")
    aliases_before = (tmp_path / "registry" / COLLECTION / "aliases.json").read_text()
    config = smoke_config(tmp_path, sweep_data_dir, learning_rates=[10.0, 20.0])
    with pytest.raises(SweepFailed, match="no trial .* produced a usable model"):
        lr_sweep(config=config)
    assert (tmp_path / "registry" / COLLECTION / "aliases.json").read_text() == aliases_before
    assert [v.ref for v in registry.versions(COLLECTION)] == [holder]
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert [t["status"] for t in summary["trials"]] == ["diverged", "diverged"]
    assert summary["promotion"]["promoted"] is False


def test_a_dispatched_model_missing_from_the_sweeps_registry_stops_the_sweep(tmp_path):
    """Two nodes with their own registries both store `v0`; the sweep's registry holds
    its own node's v0 (another model). Before, the sweep evaluated and promoted that one."""
    registry = LocalRegistry(tmp_path)
    local_v0 = registry.log_model(COLLECTION, *tiny_model(0))
    other_node = ModelRef(collection=COLLECTION, version="v0", digest="a" * 64)
    trials = [TrialOutcome(learning_rate=0.001, seed=0, status="completed", model=local_v0, worker="node-1"),
              TrialOutcome(learning_rate=0.01, seed=0, status="completed", model=other_node, worker="node-2")]
    with pytest.raises(RegistryNotShared, match="not shared between the nodes.*registry='wandb'"):
        require_shared_registry(trials, registry, str(tmp_path))
    missing = [trials[0], TrialOutcome(learning_rate=0.01, seed=0, status="completed", worker="node-2",
                                       model=ModelRef(collection=COLLECTION, version="v7", digest="b" * 64))]
    with pytest.raises(RegistryNotShared, match="holds nothing under that name"):
        require_shared_registry(missing, registry, str(tmp_path))
    require_shared_registry(trials[:1], registry, str(tmp_path))
    assert registry.resolve(COLLECTION, "production") is None


# --- two processes promoting at the same moment -------------------------------------------------

ROUNDS = 20


def scores_of(version: str) -> float:
    """A fixed, distinct test accuracy per version, so the right winner of each round is known."""
    number = int(version[1:])
    return 0.5 + ((number * 37) % 101) / 1000


def promoter(registry_dir: str, versions: list[str], barrier) -> None:
    registry = LocalRegistry(registry_dir)

    def evaluate(ref):
        accuracy = scores_of(ref.version)
        return Evaluation(val_accuracy=accuracy, val_loss=1 - accuracy, test_accuracy=accuracy, test_loss=1 - accuracy)

    for version in versions:
        barrier.wait()
        ref = registry.resolve(COLLECTION, version)
        trial = TrialOutcome(learning_rate=0.001, seed=0, status="completed", model=ref, evaluation=evaluate(ref))
        compare_and_promote(registry, [trial], alias="production", metric="val_accuracy", margin=0.0,
                            evaluate_ref=evaluate)
        barrier.wait()


def test_two_processes_promoting_at_once_leave_the_best_single_holder(tmp_path):
    registry = LocalRegistry(tmp_path)
    state, metadata = tiny_model(0)
    refs = [registry.log_model(COLLECTION, state, metadata | {"n": n}) for n in range(2 * ROUNDS)]
    mine = [r.version for r in refs[0::2]]
    theirs = [r.version for r in refs[1::2]]
    # fork: the two promoters start with this process's imports (spawn re-imported torch and
    # Prefect in each child, most of this test's time); they use files and locks only.
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    processes = [context.Process(target=promoter, args=(str(tmp_path), versions, barrier))
                 for versions in (mine, theirs)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        assert process.exitcode == 0

    # Replay: after each round the alias must sit on the best model seen so far.
    best = None
    for a, b in zip(mine, theirs):
        best = max([v for v in (best, a, b) if v], key=scores_of)
    holders = [v.ref.version for v in registry.versions(COLLECTION) if "production" in v.aliases]
    assert holders == [best]
    log = [json.loads(line) for line in (tmp_path / COLLECTION / "promotions.jsonl").read_text().splitlines()]
    # Every move saw the state the previous move left: no lost update between the processes.
    for earlier, later in zip(log, log[1:]):
        assert later["previous"] == earlier["version"]
    # And the alias only ever moved to something better.
    assert all(scores_of(r["version"]) > scores_of(r["previous"]) for r in log if r["previous"])
