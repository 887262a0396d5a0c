import socket

import pytest

from tasks.errors import StoreError, StoreUnavailable
from qdrant_client import models

from tasks.store import QdrantStore, VectorLayout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_retryable_one_line_error():
    store = QdrantStore.connect(f"http://127.0.0.1:{closed_port()}", timeout=2)
    with pytest.raises(StoreUnavailable) as error:
        store.resolve("docs")
    message = str(error.value)
    assert message.startswith("cannot reach Qdrant at http://127.0.0.1:") and "\n" not in message


def test_unknown_store_spec():
    with pytest.raises(StoreError, match="unknown store 'qdrant.example'"):
        QdrantStore.connect("qdrant.example")


def test_embedded_store_allows_one_client_at_a_time(tmp_path):
    first = QdrantStore.connect(f"local:{tmp_path}")
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            QdrantStore.connect(f"local:{tmp_path}")
    finally:
        first.close()


def test_alias_moves_atomically_between_physical_collections():
    store = QdrantStore.connect(":memory:")
    for name in ("docs--1", "docs--2"):
        store.create_collection(name, dimension=4, metadata={"name": name})
    store.move_alias("docs", "docs--1")
    assert store.resolve("docs") == "docs--1"
    store.move_alias("docs", "docs--2")
    assert store.resolve("docs") == "docs--2"
    assert store.collection_metadata("docs") == {"name": "docs--2", "vectors": ["dense"]}
    assert store.physical_collections("docs") == ["docs--1", "docs--2"]
    store.create_collection("plain", dimension=4, metadata={})
    with pytest.raises(StoreError, match="is a collection, not an alias"):
        store.move_alias("plain", "docs--1")


def test_readable_collection_names_missing_and_empty_collections():
    store = QdrantStore.connect(":memory:")
    with pytest.raises(StoreError, match="collection 'docs' does not exist in :memory:; run `ragbatch ingest` first"):
        store.readable_collection("docs")
    store.create_collection("docs--1", dimension=4, metadata={"embedding_model": "m"})
    store.move_alias("docs", "docs--1")
    with pytest.raises(StoreError, match="collection 'docs' in :memory: is empty"):
        store.readable_collection("docs")


def test_collections_record_their_vector_layout():
    store = QdrantStore.connect(":memory:")
    for name, layout in (("both", VectorLayout(dense=True, sparse=True)), ("bm25", VectorLayout(dense=False, sparse=True))):
        store.create_collection(name, dimension=4, metadata={}, layout=layout)
        assert VectorLayout.from_metadata(store.collection_metadata(name)) == layout
    config = store.client.get_collection("bm25").config.params
    assert config.vectors == {} and config.sparse_vectors["sparse"].modifier == models.Modifier.IDF
    assert VectorLayout.from_metadata({"embedding_model": "m"}) == VectorLayout(dense=True, sparse=False, named=False)
    store.update_metadata("bm25", {"bm25_avgdl": 12.5})
    assert store.collection_metadata("bm25") == {"vectors": ["sparse"], "bm25_avgdl": 12.5}
