"""Which Prefect concurrency limits a run holds (the queueing itself is shown in test_operations)."""

from tasks.concurrency import slot_names


def test_embedded_store_is_one_slot_per_path_for_readers_and_writers(tmp_path):
    store = f"local:{tmp_path / 'qdrant'}"
    writer = slot_names(store, "a", writes=True)
    assert writer == slot_names(store, "b", writes=False) == slot_names(f"local:{tmp_path}/./qdrant", "c", writes=True)
    assert writer != slot_names(f"local:{tmp_path / 'other'}", "a", writes=True)
    assert slot_names(f"edge:{tmp_path / 'edge'}", "a", writes=False) == slot_names(f"edge:{tmp_path}/edge", "b", writes=True)


def test_server_store_serialises_writers_of_one_collection_only():
    url = "http://127.0.0.1:6333"
    assert slot_names(url, "docs", writes=True) != slot_names(url, "other", writes=True)
    assert slot_names(url, "docs", writes=True) != slot_names("http://10.0.0.2:6333", "docs", writes=True)
    assert slot_names(url, "docs", writes=False) == []
    assert slot_names(":memory:", "docs", writes=True) == []
