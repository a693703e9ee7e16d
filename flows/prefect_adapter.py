"""What lr-sweep needs of Prefect that Prefect has no public API for, in one place.

Each name here is pinned by tests/test_prefect_adapter.py against a real server: a Prefect
upgrade that moves or changes one fails that test, not a sweep on a GPU node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from uuid import UUID

# Prefect renews the leases of its own `concurrency()` blocks with this; it exports nothing public
# that keeps a lease alive for a block of ours.
from prefect.concurrency._leases import maintain_concurrency_lease


@contextlib.contextmanager
def renewed_lease(lease: UUID, seconds: float) -> Iterator[None]:
    """Keep a concurrency-slot lease alive while the block runs: a thread renews it every fraction
    of `seconds`. A renewal that fails (the server is away) is logged by Prefect and does not stop
    the block: a trial trains on. Leaving the block stops the renewals; it does not release the
    slot (the caller gives it back)."""
    with maintain_concurrency_lease(lease, seconds, raise_on_lease_renewal_failure=False):
        yield
