"""The Prefect task layer: store steps retry when the store is unreachable, then fail clearly."""

import pytest

from tasks import steps
from tasks.errors import StoreUnavailable
from tasks.sources import SourceRow
from tasks.store import QdrantStore

from .test_store import closed_port


def test_store_steps_retry_an_unreachable_store_then_fail(prefect_api_url):
    from prefect import get_client

    store = QdrantStore.connect(f"http://127.0.0.1:{closed_port()}", timeout=2)
    state = steps.find_changed(store, "docs", [SourceRow("a", "a", "text")], "f", return_state=True)
    with pytest.raises(StoreUnavailable, match="cannot reach Qdrant"):
        state.result()
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(state.state_details.task_run_id)
    assert task_run.run_count == 1 + len(steps.STORE_RETRIES["retry_delay_seconds"])
