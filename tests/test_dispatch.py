"""Per-trial dispatch, checked without a server: its settings, and how the sweep reads a trial
run's outcome back (JSON only; a run without one is a failed trial). The dispatch itself, with
two workers on a real server, is in tests/test_e2e_server.py."""

import json
from uuid import uuid4

import pytest
from prefect._internal.result_records import ResultRecordMetadata
from prefect.client.schemas.objects import FlowRun
from prefect.serializers import JSONSerializer, PickleSerializer
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import Completed, Crashed, Failed
from pydantic import ValidationError

from flows.config import SweepConfig
from flows.dispatch import OutcomeRefused, outcome_of, require_shared_registry
from models.local_registry import LocalRegistry
from tasks.results import TrialOutcome
from tests.helpers import COLLECTION, tiny_model, trial_spec

# --- dispatch: config and outcomes ---------------------------------------------------------------

def test_dispatch_settings_are_validated():
    assert SweepConfig().dispatch == "local"
    with pytest.raises(ValidationError, match="trial_deployment"):
        SweepConfig(trial_deployment="lr-sweep/local")  # the sweep's own flow would recurse
    with pytest.raises(ValidationError, match="dispatch"):
        SweepConfig(dispatch="remote")


def test_a_trial_run_without_an_outcome_is_reported_as_a_failed_trial():
    spec = trial_spec(learning_rate=0.01, seed=3, epochs=1, batch_size=64, hidden_units=8)
    crashed = FlowRun(name="s-lr0.01-seed3", flow_id=uuid4(), state=Crashed(message="container exited 137"))
    outcome = outcome_of(spec, crashed)
    assert (outcome.status, outcome.learning_rate, outcome.seed) == ("failed", 0.01, 3)
    assert "CRASHED: container exited 137" in outcome.error and outcome.flow_run == str(crashed.id)
    # Completed, but its result was never persisted where the sweep can read it: said so.
    unreadable = FlowRun(name="s-lr0.01-seed3", flow_id=uuid4(), state=Completed())
    assert "result storage must be shared" in outcome_of(spec, unreadable).error


def stored_result(path, payload: bytes, serializer) -> ResultRecordMetadata:
    path.write_bytes(payload)
    return ResultRecordMetadata(storage_key=str(path), serializer=serializer)


@pytest.fixture
def result_storage(tmp_path):
    """This process's local result storage, in the test's folder: results are read from there."""
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path}):
        yield tmp_path


def test_a_failed_trial_carries_its_outcome_as_json(result_storage, tmp_path):
    """Outcomes came back through Prefect's pickle serializer, from a folder every trial
    writes. Now the trial stores JSON and the sweep reads JSON only."""
    spec = trial_spec(learning_rate=10.0, seed=0, epochs=1, batch_size=64, hidden_units=8)
    outcome = {"learning_rate": 10.0, "seed": 0, "status": "diverged", "error": "TrialDiverged: loss nan",
               "history": [{"epoch": 1}], "worker": "gpu-node-1"}
    data = stored_result(tmp_path / "result", json.dumps(outcome).encode(), JSONSerializer())
    run = FlowRun(name="s-lr10-seed0", flow_id=uuid4(), state=Failed(message="diverged", data=data))
    restored = outcome_of(spec, run)
    assert (restored.status, restored.error, restored.worker) == ("diverged", "TrialDiverged: loss nan", "gpu-node-1")


def test_a_result_that_is_not_plain_json_is_never_loaded(result_storage, tmp_path):
    spec = trial_spec(learning_rate=0.01, seed=0, epochs=1, batch_size=64, hidden_units=8)
    # A record that names the pickle serializer (anyone who can write the result folder or the
    # state could claim it): refused without reading the file.
    bomb = stored_result(tmp_path / "bomb", b"cos\nsystem\n(S'touch pwned'\ntR.", PickleSerializer())
    refused = outcome_of(spec, FlowRun(name="s", flow_id=uuid4(), state=Completed(data=bomb)))
    assert refused.status == "failed" and "not JSON" in refused.error
    # JSON that asks Prefect's decoder to import a class: read as plain data, then refused.
    hook = stored_result(tmp_path / "hook", json.dumps({"__class__": "os.system", "data": "x"}).encode(),
                         JSONSerializer())
    refused = outcome_of(spec, FlowRun(name="s", flow_id=uuid4(), state=Completed(data=hook)))
    assert refused.status == "failed" and "could not be read" in refused.error
    assert not (tmp_path / "pwned").exists()


def test_only_the_submitted_trials_outcome_from_the_result_storage_is_accepted(result_storage, tmp_path_factory):
    """Before: an outcome naming another learning rate or seed was taken for the submitted
    trial's, and a result file was read from any absolute path the run's state named."""
    spec = trial_spec(learning_rate=0.01, seed=0, epochs=1, batch_size=64, hidden_units=8)
    other = {"learning_rate": 0.1, "seed": 0, "status": "failed", "error": "planted"}
    planted = stored_result(result_storage / "other", json.dumps(other).encode(), JSONSerializer())
    refused = outcome_of(spec, FlowRun(name="s", flow_id=uuid4(), state=Completed(data=planted)))
    assert refused.status == "failed" and "names learning rate 0.1, seed 0, not the submitted 0.01" in refused.error
    mine = {"learning_rate": 0.01, "seed": 0, "status": "failed", "error": "its own"}
    elsewhere = stored_result(tmp_path_factory.mktemp("elsewhere") / "r", json.dumps(mine).encode(), JSONSerializer())
    refused = outcome_of(spec, FlowRun(name="s", flow_id=uuid4(), state=Completed(data=elsewhere)))
    assert "outside the result storage" in refused.error and refused.error != "its own"
    escape = ResultRecordMetadata(storage_key=str(result_storage / ".." / elsewhere.storage_key),
                                  serializer=JSONSerializer())
    assert "outside the result storage" in outcome_of(spec, FlowRun(name="s", flow_id=uuid4(),
                                                                    state=Completed(data=escape))).error
    accepted = stored_result(result_storage / "mine", json.dumps(mine).encode(), JSONSerializer())
    assert outcome_of(spec, FlowRun(name="s", flow_id=uuid4(), state=Failed(data=accepted))).error == "its own"


def test_a_dispatched_trials_model_must_be_trained_with_the_submitted_spec(tmp_path):
    """Before: any model of the registry, named by an outcome, stood in for the trial's."""
    registry = LocalRegistry(tmp_path)
    spec = trial_spec(learning_rate=0.01, seed=0, epochs=1, batch_size=64, hidden_units=8)
    state, metadata = tiny_model(0)
    theirs = registry.log_model(COLLECTION, state, metadata | {"training": spec.record() | {"learning_rate": 0.5}})
    mine = registry.log_model(COLLECTION, state, metadata | {"training": spec.record()})
    planted = TrialOutcome(learning_rate=0.01, seed=0, status="completed", model=theirs)
    with pytest.raises(OutcomeRefused, match="not with the submitted"):
        require_shared_registry([planted], registry, str(tmp_path), [spec])
    honest = TrialOutcome(learning_rate=0.01, seed=0, status="completed", model=mine)
    require_shared_registry([honest], registry, str(tmp_path), [spec])
