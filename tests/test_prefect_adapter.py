"""flows/prefect_adapter.py: the Prefect internals lr-sweep leans on, pinned against a real server."""

import threading
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from flows.prefect_adapter import renewed_lease


def renewal_threads(lease) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"concurrency-lease-renewal-{lease}" and t.is_alive()]


def test_a_lease_is_renewed_from_a_thread_while_the_block_runs_and_kept_after_it(prefect_server):
    name = f"adapter-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        response = client.increment_concurrency_slots_with_lease(names=[name], slots=1, mode="concurrency",
                                                                 lease_duration=60)
        lease = uuid.UUID(response.json()["lease_id"])
        with renewed_lease(lease, 60):
            assert len(renewal_threads(lease)) == 1
            client.renew_concurrency_lease(lease, 60)  # the lease is alive while the block runs
        assert renewal_threads(lease) == []
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # not released
        client.release_concurrency_slots_with_lease(lease)
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_a_lease_that_cannot_be_renewed_does_not_stop_the_block(prefect_server):
    ran = []
    with renewed_lease(uuid.uuid4(), 60):  # no such lease: every renewal fails
        ran.append(True)
    assert ran == [True]
