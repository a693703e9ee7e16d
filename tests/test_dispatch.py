"""Per-trial dispatch, checked without a server: its settings, and how the sweep reads a trial
run's outcome back (JSON only; a run without one is a failed trial). The dispatch itself, with
two workers on a real server, is in tests/test_e2e_server.py."""

import json
from uuid import uuid4

import pytest
from prefect._internal.result_records import ResultRecordMetadata
from prefect.client.schemas.objects import FlowRun
from prefect.serializers import JSONSerializer, PickleSerializer
from prefect.states import Completed, Crashed, Failed
from pydantic import ValidationError

from flows.config import SweepConfig
from flows.dispatch import outcome_of
from tests.helpers import trial_spec

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


def test_a_failed_trial_carries_its_outcome_as_json(tmp_path):
    """Outcomes came back through Prefect's pickle serializer, from a folder every trial
    writes. Now the trial stores JSON and the sweep reads JSON only."""
    spec = trial_spec(learning_rate=10.0, seed=0, epochs=1, batch_size=64, hidden_units=8)
    outcome = {"learning_rate": 10.0, "seed": 0, "status": "diverged", "error": "TrialDiverged: loss nan",
               "history": [{"epoch": 1}], "worker": "gpu-node-1"}
    data = stored_result(tmp_path / "result", json.dumps(outcome).encode(), JSONSerializer())
    run = FlowRun(name="s-lr10-seed0", flow_id=uuid4(), state=Failed(message="diverged", data=data))
    restored = outcome_of(spec, run)
    assert (restored.status, restored.error, restored.worker) == ("diverged", "TrialDiverged: loss nan", "gpu-node-1")


def test_a_result_that_is_not_plain_json_is_never_loaded(tmp_path):
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
