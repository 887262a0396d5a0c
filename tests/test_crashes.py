"""Crashes: an ingest killed part-way and run again leaves the same index as one clean run.

(The answer flow's SIGKILL-and-resume test is in test_answer_flow.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from flows.ingest import ingest
from tasks.settings import IngestParams

from .test_concurrency import small_corpus, snapshot


def completed_upserts(since: datetime) -> int:
    """Upsert task runs completed in ingest runs started after `since` (tests run one at a time)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterStartTime, TaskRunFilter, TaskRunFilterName, TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="upsert"),
                                          state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]), name=None)),
        )
    return len(runs)


@pytest.mark.slow
def test_an_ingest_killed_after_some_batches_and_run_again_equals_a_clean_run(tmp_path, subprocess_env, data_dir):
    corpus = small_corpus(tmp_path / "corpus", 40)
    started = datetime.now(timezone.utc)
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", str(corpus), "--collection", "kb", "--batch-docs", "2"],
        env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while completed_upserts(started) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    params = IngestParams(source=corpus, collection="kb", data_dir=data_dir)
    partial = snapshot(params.store, "kb")
    indexed_before = {doc_id for doc_id, chunk_index, *_ in partial.values() if chunk_index == 0}
    assert 6 <= len(indexed_before) < 40  # killed part-way: some batches written, not all

    again = ingest(params)  # the lock and the embedded store were freed by the kernel with the process
    assert again.unchanged >= len(indexed_before) - 2  # done documents are not re-embedded (the last batch may be half-written)
    assert again.loaded == 40 and again.quarantined == 0

    clean_dir = tmp_path / "clean"
    clean = ingest(IngestParams(source=corpus, collection="kb", data_dir=clean_dir))
    expected = snapshot(f"local:{clean_dir / 'qdrant'}", "kb")
    assert snapshot(params.store, "kb") == expected  # same point ids, count, documents, payload hashes
    assert again.points == clean.points == len(expected)
