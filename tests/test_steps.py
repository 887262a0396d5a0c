"""The Prefect task layer: store steps retry when the store is unreachable, then fail clearly."""

import time

import numpy as np
import pytest

from tasks import steps
from tasks.errors import StoreError, StoreUnavailable
from tasks.sources import SourceRow
from tasks.store import QdrantStore

from .test_store import closed_port


def test_store_steps_retry_an_unreachable_store_then_fail(prefect_api_url):
    store = QdrantStore.connect(f"http://127.0.0.1:{closed_port()}", timeout=2)
    undelayed = steps.find_changed.with_options(retry_delay_seconds=0)  # the step's retries, without 15 s of waiting
    state = undelayed(store, "docs", [SourceRow("a", "a", "text")], "f", return_state=True)
    with pytest.raises(StoreUnavailable, match="cannot reach Qdrant"):
        state.result()
    assert final_task_run(state.state_details.task_run_id).run_count == 1 + len(steps.STORE_RETRIES["retry_delay_seconds"])


def test_a_store_step_does_not_retry_what_retrying_cannot_fix(prefect_api_url):
    """Only an unreachable store is tried again; a missing collection fails at once, not after 15 s."""
    store = QdrantStore.connect(":memory:")
    state = steps.find_changed(store, "missing", [SourceRow("a", "a", "text")], "f", return_state=True)
    with pytest.raises(StoreError, match="Collection missing not found"):
        state.result()
    assert final_task_run(state.state_details.task_run_id).run_count == 1


def test_the_embed_step_embeds_each_chunk_with_its_documents_title(embedder, tmp_path):
    """The title gives every chunk its document's context in the dense vector (BM25 indexes it too)."""
    from tasks.chunking import Chunk
    from tasks.settings import EmbeddingBackend
    from tasks.sharding import EmbedderSpec

    spec = EmbedderSpec(EmbeddingBackend.sentence_transformers, "all-MiniLM-L6-v2", tmp_path, batch_size=32)
    chunk = Chunk("d", 0, "Restart it after the alarm clears.", 0, 7, "Cooling pump E-219", "s", {}, "h")
    [vector] = steps.embed.fn(spec, [chunk])
    [titled, bare] = embedder.embed(["Cooling pump E-219\nRestart it after the alarm clears.", chunk.text])
    assert np.dot(vector, titled) > 0.9999 and np.dot(vector, bare) < 0.99


def final_task_run(task_run_id, timeout: float = 30):
    """The task run as the API has it once it is finished: task runs reach the API as events, a moment later."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                task_run = client.read_task_run(task_run_id)
                if task_run.state and task_run.state.is_final():
                    return task_run
            except ObjectNotFound:
                pass
            assert time.monotonic() < deadline, f"task run {task_run_id} did not finish in the API"
            time.sleep(0.2)
