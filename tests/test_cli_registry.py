"""`lr-sweep models` and `lr-sweep promote`: listing, the gated manual promotion, --force rollback."""

import json

import pytest

from flows.cli import main
from models.local_registry import LocalRegistry
from tasks.data.prepare import load_splits, prepare_dataset
from tasks.evaluation.evaluate import evaluate_stored_model
from tests.helpers import COLLECTION, tiny_model


def log_untrained(registry, dataset, seed):
    state, metadata = tiny_model(seed, dataset=dataset.as_metadata(), metrics={"val_accuracy": 0.1},
                                 training={"learning_rate": 0.001 * (seed + 1), "seed": seed, "epochs": 0})
    return registry.log_model(COLLECTION, state, metadata)


def test_models_promote_gate_and_force(sweep_data_dir, tmp_path, capsys):
    registry = LocalRegistry(tmp_path / "registry")
    dataset = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    refs = [log_untrained(registry, dataset, seed) for seed in range(2)]
    splits = load_splits(dataset, "cpu")
    accuracy = {ref: evaluate_stored_model(registry, ref, splits, "cpu").test_accuracy for ref in refs}
    better, worse = sorted(refs, key=accuracy.get, reverse=True)
    assert accuracy[better] > accuracy[worse]
    common = ["--registry-dir", str(tmp_path / "registry")]

    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 0
    assert main(["promote", str(better), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 0
    assert registry.resolve(COLLECTION, "production") == better
    # Back to the worse one: refused by the gate, then done on purpose with --force (a rollback).
    capsys.readouterr()
    assert main(["promote", str(worse), "--alias", "production", "--data-dir", str(sweep_data_dir), *common]) == 1
    assert "not promoted" in capsys.readouterr().err and registry.resolve(COLLECTION, "production") == better
    assert main(["promote", str(worse), "--alias", "production", "--force", *common]) == 0
    assert registry.resolve(COLLECTION, "production") == worse

    capsys.readouterr()
    assert main(["models", "--json", *common]) == 0
    listing = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert "production" in listing[str(worse)]["aliases"]
    assert "production" not in listing[str(better)]["aliases"]
    assert "latest" in listing[f"{COLLECTION}:v1"]["aliases"]
    assert main(["promote", f"{COLLECTION}:v9", "--alias", "production", *common]) == 2


def test_each_model_is_measured_with_its_own_normalisation(sweep_data_dir, tmp_path):
    """The gate normalised every model with the sweep's mean/std; a model trained on a
    slice of the data (other constants) was measured as a different model."""
    registry = LocalRegistry(tmp_path / "registry")
    full = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    sliced = prepare_dataset("mnist", sweep_data_dir, 200, 0, 300, allow_download=False)
    assert (sliced.mean, sliced.std) != (full.mean, full.std)
    ref = log_untrained(registry, sliced, 0)  # trained (here: stored) with the slice's constants
    on_its_own = evaluate_stored_model(registry, ref, load_splits(sliced, "cpu"), "cpu")
    on_the_sweeps = evaluate_stored_model(registry, ref, load_splits(full, "cpu"), "cpu")
    assert on_the_sweeps.test_accuracy == on_its_own.test_accuracy
    assert abs(on_the_sweeps.test_loss - on_its_own.test_loss) < 1e-5


def test_a_holder_trained_on_other_data_is_not_compared_unless_forced(sweep_data_dir, tmp_path, capsys):
    registry = LocalRegistry(tmp_path / "registry")
    dataset = prepare_dataset("mnist", sweep_data_dir, 200, 0, None, allow_download=False)
    other = dataset.as_metadata() | {"fingerprint": "0" * 64}
    holder = registry.log_model(COLLECTION, *tiny_model(5, dataset=other, metrics={}, training={}))
    registry.move_alias(holder, "production")
    candidate = log_untrained(registry, dataset, 1)
    common = ["--registry-dir", str(tmp_path / "registry"), "--data-dir", str(sweep_data_dir)]
    capsys.readouterr()
    assert main(["promote", str(candidate), "--alias", "production", *common]) == 1
    err = capsys.readouterr().err
    assert "cannot be compared on this data" in err and "fingerprint 000000000000" in err
    assert registry.resolve(COLLECTION, "production") == holder
    assert main(["promote", str(candidate), "--alias", "production", "--force", *common]) == 0
    assert registry.resolve(COLLECTION, "production") == candidate


# --- promote --force checks the files; every manual promotion announces itself ------------------

def two_models(tmp_path):
    registry = LocalRegistry(tmp_path / "registry")
    refs = [registry.log_model(COLLECTION, *tiny_model(seed, dataset={"train_limit": None}, sweep_id="s1"))
            for seed in range(2)]
    registry.move_alias(refs[1], "production")
    return registry, refs, ["--registry-dir", str(tmp_path / "registry")]


def test_promote_force_refuses_files_that_do_not_match_their_digest(tmp_path, capsys):
    """--force checked only the manifest's digest: weights replaced behind an intact manifest
    took the alias."""
    registry, (old, holder), common = two_models(tmp_path)
    weights = tmp_path / "registry" / COLLECTION / old.version / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other weights
    capsys.readouterr()
    assert main(["promote", str(old), "--alias", "production", "--force", *common]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lr-sweep: DigestMismatch: ") and err.count("\n") == 1 and "Traceback" not in err
    assert registry.resolve(COLLECTION, "production") == holder


def test_a_manual_promotion_sends_the_promoted_event(tmp_path, capsys, monkeypatch):
    """A rollback with --force moved the alias silently: the export automation never heard of it."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    registry, (old, holder), common = two_models(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the events go to the client below
    EventsWorker.set_client_override(AssertingEventsClient)
    try:
        assert main(["promote", str(old), "--alias", "production", "--force", *common]) == 0
        EventsWorker.drain_all()
        [event] = [e for client in AssertingEventsClient.all for e in client.events]
    finally:
        EventsWorker.set_client_override(None)
        AssertingEventsClient.reset()
    assert event.event == "lr-sweep.model.promoted"
    assert event.resource.id == f"lr-sweep.model.{COLLECTION}"
    assert {k: event.payload[k] for k in ("collection", "alias", "version", "digest", "previous_version")} == {
        "collection": COLLECTION, "alias": "production", "version": old.version, "digest": old.digest,
        "previous_version": holder.version}
    assert event.payload["registry_dir"] == str((tmp_path / "registry").resolve())


def test_without_a_server_the_promotion_says_no_event_was_sent(tmp_path, capsys, monkeypatch):
    registry, (old, _), common = two_models(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # no background server there
    assert main(["promote", str(old), "--alias", "production", "--force", *common]) == 0
    assert "the promotion event was not sent" in capsys.readouterr().err
    assert registry.resolve(COLLECTION, "production") == old


# --- errors that say what happened -----------------------------------------------------------

def test_a_corrupt_alias_table_is_named_and_is_not_invalid_input(tmp_path, capsys):
    """A corrupt aliases.json printed "Expecting ',' delimiter" as "invalid input", exit 2."""
    registry, _, common = two_models(tmp_path)
    table = tmp_path / "registry" / COLLECTION / "aliases.json"
    table.write_text('{"production": "v1" "x": 1}')
    capsys.readouterr()
    assert main(["models", *common]) == 1
    err = capsys.readouterr().err
    assert str(table) in err and "corrupt" in err and "invalid input" not in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Every ValueError and LookupError became exit 2 "invalid input": a bug looked like a typo."""
    import flows.cli

    def broken(args):
        return {}["missing"]  # a KeyError (LookupError) from the code, not from the user

    monkeypatch.setattr(flows.cli, "command_models", broken)
    with pytest.raises(KeyError):
        main(["models", "--registry-dir", str(tmp_path)])


def test_input_errors_still_exit_2(tmp_path, capsys):
    assert main(["promote", "no-colon", "--registry-dir", str(tmp_path)]) == 2
    assert "invalid input:\nmodel:" in capsys.readouterr().err
    assert main(["models", "--collection", "../x", "--registry-dir", str(tmp_path)]) == 2
    assert "\ncollection: " in capsys.readouterr().err  # the config field of the same name
