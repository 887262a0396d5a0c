"""Runs from deployments that touch the same index queue for each other (Prefect global concurrency limits).

Ingest runs of one collection must not overlap (an incremental reindex and a rebuild would both
write it). An embedded store (local: or edge:) allows one process at a time whatever the
collection, so with it every run that opens the store takes the same slot. Ad-hoc CLI runs do not
queue: the embedded store refuses a second process with a clear message, and a crashed ad-hoc run
must not hold a slot that the next one waits on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from prefect import get_client, get_run_logger
from prefect.client.orchestration import SyncPrefectClient
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import deployment

QDRANT_PORT = 6333  # what qdrant-client reaches when a server's URL names no port

# A crashed run's slot is freed when its lease expires; a live run renews it in the background.
LEASE_SECONDS = 60


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def slot_names(store: str, collection: str, *, writes: bool) -> list[str]:
    """Concurrency-limit names a run must hold: the embedded store's path, or the written collection."""
    if store == ":memory:":
        return []
    if store.startswith(("local:", "edge:")):
        return [f"ragbatch-local-store-{_digest(str(Path(store.split(':', 1)[1]).resolve()))}"]
    return [f"ragbatch-write-{collection}-{_digest(_server_address(store))}"] if writes else []


def _server_address(url: str) -> str:
    """A Qdrant server's URL as its client reaches it, so that every spelling of one server holds one
    slot (a trailing slash, capitals in the host name, the default port 6333 left out)."""
    parts = urlsplit(url)
    try:
        port = parts.port or QDRANT_PORT
    except ValueError:  # no port at all: the store refuses the URL when it connects
        return url
    return f"{parts.scheme.lower()}://{parts.hostname or ''}:{port}{parts.path.rstrip('/')}"


def ensure_limits(client: SyncPrefectClient, names: Sequence[str]) -> None:
    """Create each one-slot limit that does not exist. Prefect's upsert reads, then creates: a run starting
    at the same moment (a scheduled reindex and a manual rebuild of a new collection) may create it in
    between, and the server's 409 then means it is there, as wanted."""
    for name in names:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        except ObjectAlreadyExists:
            pass


@contextmanager
def exclusive(store: str, collection: str, *, writes: bool) -> Iterator[None]:
    """Hold one slot of each limit from `slot_names` for the block when running from a deployment."""
    names = slot_names(store, collection, writes=writes)
    if not names or deployment.id is None:
        yield
        return
    with get_client(sync_client=True) as client:
        ensure_limits(client, names)
    get_run_logger().info("waiting for %s", ", ".join(names))
    with concurrency(names, occupy=1, lease_duration=LEASE_SECONDS, strict=True):
        yield
