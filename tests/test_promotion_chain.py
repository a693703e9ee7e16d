"""A promotion triggers the export, on a real Prefect server.

`prefect server start` on 127.0.0.1 (a free port, its own PREFECT_HOME and SQLite database), the
process pool, `prefect --no-prompt deploy --name lr-sweep-export/export-local` from prefect.yaml (which
creates the deployment's trigger as an automation), a process worker; then the events the sweep
emits, sent by `emit_event` from a separate process pointed at that server:

1. `lr-sweep.model.promoted` for the model that holds `production`: the automation starts a flow
   run of lr-sweep-export with the event's collection, alias and digest, on the deployment's own
   registry (the payload's registry_dir, a container's path, is not used); it completes and its
   bundle carries the promoted digest.
2. `lr-sweep.sweep.finished`: starts nothing.
3. a `lr-sweep.model.promoted` that is out of date (the alias names another model by the time it
   is handled): the export run fails with HolderChanged and writes nothing.

The events, their payloads and the resulting flow runs are printed (`pytest -s` shows them).
Every process started here is stopped by its process group at the end.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from models.local_registry import LocalRegistry
from tasks.export import bundle_name
from tests.stack import BIN, Stack, free_port, wait_until_healthy
from tests.test_export import COLLECTION, log

pytestmark = pytest.mark.slow

RUN_SECONDS = 240
DEPLOYMENT = "lr-sweep-export/export-local"
AUTOMATION = "lr-sweep-export on promotion"

# The sweep's side, as it will emit it: run in a process of its own, like the sweep.
EMIT = textwrap.dedent("""
    import json, sys
    from prefect.events import emit_event
    spec = json.loads(sys.argv[1])
    event = emit_event(event=spec["event"], resource=spec["resource"], payload=spec["payload"])
    assert event is not None, "events are not being sent (no API URL?)"
    print(event.model_dump_json())
    # the events worker drains its queue when the process exits
""")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-chain")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LR_SWEEP_", "PREFECT_"))}
    env.update({
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker notices new runs quickly
        "PREFECT_LOGGING_LEVEL": "INFO",
    })
    stack = Stack(env=env, api_url=api_url, home=home, processes=[])
    try:
        server = stack.start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port))
        print(f"\nprefect server healthy after {wait_until_healthy(stack, server):.0f} s on {api_url}")
        stack.run(str(BIN / "prefect"), "work-pool", "create", "lr-sweep-process", "--type", "process", "--overwrite")
        # The deployment's own registry and bundle folder (under the test's folder, not the
        # checkout's defaults): the events only select collection, alias and digest.
        deployed = stack.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", DEPLOYMENT,
                             "--param", f"output_dir={home / 'exports'}", "--param", f"registry_dir={home / 'registry'}")
        for line in deployed.splitlines():
            if "lr-sweep-export" in line or "rigger" in line or "utomation" in line:
                print(line.strip(" │╭╰─"))
        stack.start("worker", str(BIN / "prefect"), "worker", "start", "--pool", "lr-sweep-process",
                    "--name", "export-worker", "--limit", "2")
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def registry(stack) -> LocalRegistry:
    """Two models; `production` goes to v1, as a sweep's promotion would leave it."""
    registry = LocalRegistry(stack.home / "registry")
    log(registry, 0.01, 1)
    log(registry, 0.001, 0)
    return registry


def emit(stack: Stack, event: str, resource: dict, payload: dict) -> dict:
    spec = {"event": event, "resource": resource, "payload": payload}
    result = subprocess.run([sys.executable, "-c", EMIT, json.dumps(spec)], env=stack.env, cwd=stack.home,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sent = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nemitted {sent['event']} (id {sent['id']}, occurred {sent['occurred']})")
    print("  resource:", json.dumps(sent["resource"]))
    print("  payload: ", json.dumps(sent["payload"], indent=2).replace("\n", "\n  "))
    return sent


def promote_and_emit(stack: Stack, registry: LocalRegistry, version: str, previous_version: str | None,
                     move: bool = True) -> dict:
    """What the sweep does after the champion/challenger gate: move the alias, then tell."""
    ref = registry.resolve(COLLECTION, version)
    if move:
        registry.move_alias(ref, "production", reason="promotion chain test")
    previous = registry.resolve(COLLECTION, previous_version) if previous_version else None
    stored = registry.fetch(ref)
    return emit(stack, "lr-sweep.model.promoted",
                resource={"prefect.resource.id": f"lr-sweep.model.{COLLECTION}", "lr-sweep.collection": COLLECTION,
                          "lr-sweep.alias": "production"},
                payload={"collection": COLLECTION, "alias": "production", "version": ref.version,
                         "previous_version": previous.version if previous else None, "digest": ref.digest,
                         "previous_digest": previous.digest if previous else None,
                         "metrics": stored.metadata["metrics"], "sweep_id": "chain-test",
                         # what a container's sweep sends: a path of its own; never opened here
                         "registry_dir": "/opt/lr-sweep/registry"})


def export_runs(stack: Stack) -> list:
    with temporary_settings({PREFECT_API_URL: stack.api_url}), stack.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return sorted(runs, key=lambda run: run.created)


def wait_for_run(stack: Stack, digest: str) -> object:
    """The export flow run the automation made for the event with this digest, once it has ended."""
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        runs = [run for run in export_runs(stack) if run.parameters.get("digest") == digest]
        if runs and runs[0].state is not None and runs[0].state.is_final():
            return runs[0]
        time.sleep(2)
    pytest.fail(f"no finished export run for digest {digest[:12]} after {RUN_SECONDS} s; runs: "
                f"{[(r.name, r.state_type, r.parameters) for r in export_runs(stack)]}\n"
                f"worker log:\n{stack.log('worker')[-4000:]}\nserver log:\n{stack.log('server')[-4000:]}")


LOGS_SECONDS = 60  # the server stores a run's logs in batches, after the run ended; slower under load


def describe(stack: Stack, run, emitted_at: float) -> tuple[list[str], list]:
    deadline = time.monotonic() + LOGS_SECONDS
    with temporary_settings({PREFECT_API_URL: stack.api_url}), stack.client() as client:
        while True:  # until the flow's own lines (its last one says what was exported) have arrived
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if any("Finished in state" in entry.message for entry in logs) or time.monotonic() > deadline:
                break
            time.sleep(1)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    print(f"flow run {run.name} ({run.id}) of {DEPLOYMENT}: {run.state_type.value}, "
          f"{(run.end_time - run.created).total_seconds():.1f} s from creation to end, "
          f"created {run.created.timestamp() - emitted_at:+.1f} s after the event was sent")
    print("  parameters:", json.dumps(run.parameters))
    print("  state message:", run.state.message)
    for entry in logs:
        if "export" in entry.message or "Error" in entry.message:
            print("  log:", entry.message.splitlines()[0])
    cards = [artifact for artifact in artifacts if artifact.key]  # Prefect adds keyless ones of its own
    for artifact in cards:
        print(f"  artifact {artifact.key} ({artifact.type}): {len(artifact.data)} characters of markdown")
    return [entry.message for entry in logs], cards


def test_the_automation_is_the_deployments_trigger(stack):
    with temporary_settings({PREFECT_API_URL: stack.api_url}), stack.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        automations = client.read_automations_by_name(AUTOMATION)
    assert deployment.work_pool_name == "lr-sweep-process" and deployment.entrypoint == "flows.export:lr_sweep_export"
    assert deployment.parameters == {"output_dir": str(stack.home / "exports"),
                                     "registry_dir": str(stack.home / "registry")}
    assert len(automations) == 1
    automation = automations[0]
    trigger, action = automation.trigger, automation.actions[0]
    print(f"\nautomation {automation.name!r}: match {trigger.match.model_dump()}, expect {sorted(trigger.expect)}, "
          f"posture {trigger.posture}, threshold {trigger.threshold}")
    print(f"  action {action.type} deployment {action.deployment_id}, parameters {json.dumps(action.parameters)}")
    assert automation.enabled and sorted(trigger.expect) == ["lr-sweep.model.promoted"]
    assert action.type == "run-deployment" and action.deployment_id == deployment.id
    assert action.parameters["digest"] == "{{ event.payload.digest }}"


def test_a_promotion_runs_the_export_of_the_promoted_model(stack, registry):
    emitted_at = time.time()
    sent = promote_and_emit(stack, registry, "v1", previous_version=None)
    run = wait_for_run(stack, sent["payload"]["digest"])
    logs, artifacts = describe(stack, run, emitted_at)
    assert run.state.is_completed(), run.state
    payload = sent["payload"]
    assert run.parameters == {"collection": COLLECTION, "alias": "production", "digest": payload["digest"],
                              "registry_dir": str(stack.home / "registry"), "output_dir": str(stack.home / "exports")}

    holder = registry.resolve(COLLECTION, "production")
    path = stack.home / "exports" / bundle_name(holder)
    bundle = json.loads((path / "bundle.json").read_text())
    print(f"  bundle {path}: {bundle['model']} digest {bundle['digest']}, "
          f"max abs logit diff {bundle['verification']['max_abs_diff']:.3g}")
    assert bundle["digest"] == payload["digest"] == holder.digest and bundle["model"] == f"{COLLECTION}:v1"
    assert bundle["verification"]["max_abs_diff"] <= 1e-5
    assert any(m.startswith(f"exported {COLLECTION}:v1 (digest {holder.digest[:12]}…) -> {path}") for m in logs)
    assert [a.key for a in artifacts] == ["model-card-fashion-mnist-cnn"] and holder.digest in artifacts[0].data

    received = stack.api("/events/filter", {"filter": {"event": {"name": ["lr-sweep.model.promoted"]}}, "limit": 10})
    assert sent["id"] in [event["id"] for event in received["events"]]  # the server stored the event as sent


def test_an_out_of_date_promotion_is_not_exported_and_other_events_start_nothing(stack, registry):
    before = {run.id for run in export_runs(stack)}
    emit(stack, "lr-sweep.sweep.finished", resource={"prefect.resource.id": "lr-sweep.sweep.chain-test"},
         payload={"sweep_id": "chain-test", "promoted": True})
    # v0's promotion announced while `production` names v1: the export must refuse it.
    emitted_at = time.time()
    sent = promote_and_emit(stack, registry, "v0", previous_version="v1", move=False)
    run = wait_for_run(stack, sent["payload"]["digest"])
    _, cards = describe(stack, run, emitted_at)
    assert cards == []
    assert run.state.is_failed() and "HolderChanged" in run.state.message, run.state
    stale = registry.resolve(COLLECTION, "v0")
    assert not (stack.home / "exports" / bundle_name(stale)).exists()
    assert sorted(p.name for p in (stack.home / "exports").iterdir()) == [
        bundle_name(registry.resolve(COLLECTION, "v1"))]  # no staging folder left either
    new = [run for run in export_runs(stack) if run.id not in before]
    assert [r.parameters["digest"] for r in new] == [stale.digest], "sweep.finished started a run"


def test_a_rollback_with_promote_force_is_exported_too(stack, registry):
    """`lr-sweep promote --force` moved the alias without the event: the automation never ran
    and the bundle of the model rolled back to was never made. A real CLI process now sends it."""
    from tests.helpers import LR_SWEEP

    target = registry.resolve(COLLECTION, "v0")
    done = subprocess.run([str(LR_SWEEP), "promote", f"{COLLECTION}:v0", "--alias", "production", "--force",
                           "--registry-dir", str(registry.root)], env=stack.env, capture_output=True, text=True,
                          timeout=120)
    print(done.stdout, done.stderr)
    assert done.returncode == 0 and f"sent lr-sweep.model.promoted for {COLLECTION}:v0" in done.stderr, done.stderr
    assert registry.resolve(COLLECTION, "production") == target
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:  # a second run for v0's digest: the first was the stale event's
        runs = [r for r in export_runs(stack) if r.parameters.get("digest") == target.digest]
        if len(runs) > 1 and runs[-1].state is not None and runs[-1].state.is_final():
            break
        time.sleep(2)
    else:
        pytest.fail(f"no export run after the rollback: {[(r.name, r.state_type) for r in export_runs(stack)]}")
    assert runs[-1].state.is_completed(), runs[-1].state
    bundle = json.loads((stack.home / "exports" / bundle_name(target) / "bundle.json").read_text())
    assert bundle["digest"] == target.digest and bundle["model"] == f"{COLLECTION}:v0"
