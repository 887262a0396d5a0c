"""Which Prefect concurrency limits a run holds (the queueing itself is shown in test_operations)."""

import threading

from tasks.concurrency import ensure_limits, slot_names


def test_embedded_store_is_one_slot_per_path_for_readers_and_writers(tmp_path, monkeypatch):
    store = f"local:{tmp_path / 'qdrant'}"
    writer = slot_names(store, "a", writes=True)
    assert writer == slot_names(store, "b", writes=False) == slot_names(f"local:{tmp_path}/./qdrant", "c", writes=True)
    assert writer != slot_names(f"local:{tmp_path / 'other'}", "a", writes=True)
    assert slot_names(f"edge:{tmp_path / 'edge'}", "a", writes=False) == slot_names(f"edge:{tmp_path}/edge", "b", writes=True)
    # A relative path and one through `..` name the same store (deployments spelled it either way).
    monkeypatch.chdir(tmp_path)
    assert slot_names("local:qdrant", "a", writes=True) == writer == slot_names(f"local:{tmp_path}/x/../qdrant", "b", writes=False)


def test_server_store_serialises_writers_of_one_collection_only():
    url = "http://127.0.0.1:6333"
    assert slot_names(url, "docs", writes=True) != slot_names(url, "other", writes=True)
    assert slot_names(url, "docs", writes=True) != slot_names("http://10.0.0.2:6333", "docs", writes=True)
    assert slot_names(url, "docs", writes=False) == []
    # One server however it is written: each spelling held a slot of its own, and two writers overlapped.
    for spelling in ("http://127.0.0.1:6333/", "HTTP://127.0.0.1", "http://127.0.0.1/"):
        assert slot_names(spelling, "docs", writes=True) == slot_names(url, "docs", writes=True)
    assert slot_names("http://Qdrant.Internal:6333", "d", writes=True) == slot_names("http://qdrant.internal", "d", writes=True)
    assert slot_names("https://127.0.0.1:6333", "docs", writes=True) != slot_names(url, "docs", writes=True)
    assert slot_names(":memory:", "docs", writes=True) == []


def test_runs_starting_together_each_find_their_new_limit(prefect_api_url):
    """Prefect's upsert of a limit reads, then creates: of runs creating one new limit at the same moment,
    all but the first got a 409 and failed. Eight threads at a time, on each of five new limits."""
    from prefect import get_client

    names = [f"test-slot-race-{n}" for n in range(5)]
    failures: list[str] = []

    def create(name: str, start: threading.Barrier) -> None:
        with get_client(sync_client=True) as client:
            start.wait()
            try:
                ensure_limits(client, [name])
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    for name in names:
        start = threading.Barrier(8)
        threads = [threading.Thread(target=create, args=(name, start)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    with get_client(sync_client=True) as client:
        assert [client.read_global_concurrency_limit_by_name(name).limit for name in names] == [1] * 5
