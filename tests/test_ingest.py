"""tasks/ingest.py: the target collection of a run and the checks that stop one, without Prefect."""

from pathlib import Path

import pytest

from tasks.errors import QuarantineThresholdExceeded, StoreError
from tasks.ingest import check_quarantine_share, prepare_target
from tasks.settings import RetrievalMode
from tasks.store import QdrantStore


@pytest.fixture
def store():
    store = QdrantStore.connect(":memory:")
    yield store
    store.close()


def target(store: QdrantStore, alias: str, *, rebuild: bool = False, retrieval: RetrievalMode | None = None,
           dimension=lambda: 4):
    return prepare_target(store, alias, rebuild=rebuild, embedding_model="m", dimension=dimension, chunk_tokens=200,
                          chunk_overlap=32, retrieval=retrieval)


def test_a_plain_collection_is_refused_for_a_rebuild_before_anything_is_written(store):
    """Found only at the final alias move, after embedding everything."""
    store.create_collection("docs", dimension=4, metadata={"embedding_model": "m"})
    with pytest.raises(StoreError, match="'docs' is a plain collection, not a ragbatch alias"):
        target(store, "docs", rebuild=True)
    assert store.physical_collections("docs") == []


def test_a_sparse_collection_never_asks_for_the_embedding_models_dimension(store):
    """Asking loads the embedding model: for a BM25-only index, for nothing."""
    sparse = target(store, "kb", retrieval=RetrievalMode.sparse, dimension=lambda: pytest.fail("the dimension was asked for"))
    assert store.collection_metadata(sparse.collection)["dimension"] == 0


def test_a_new_collection_is_hybrid_unless_told_and_an_existing_one_keeps_its_vectors(store):
    assert (target(store, "kb").layout.dense, target(store, "kb").layout.sparse) == (True, True)
    assert target(store, "kb", rebuild=True).layout.sparse  # a rebuild is a new collection
    dense = target(store, "dense", retrieval=RetrievalMode.dense)
    assert (dense.layout.dense, dense.layout.sparse) == (True, False)
    assert not target(store, "dense").layout.sparse  # a later run without --retrieval


def test_the_quarantine_share_stops_a_run_only_above_the_limit(tmp_path: Path):
    check_quarantine_share(5, 1, 0.2, "src", tmp_path / "q.parquet")  # exactly the limit passes
    with pytest.raises(QuarantineThresholdExceeded, match=r"^src: 2 of 5 rows \(40%\) failed validation"):
        check_quarantine_share(5, 2, 0.2, "src", tmp_path / "q.parquet")
    with pytest.raises(QuarantineThresholdExceeded, match=r"^src: no documents found; nothing was changed in the index$"):
        check_quarantine_share(0, 0, 0.2, "src", tmp_path / "q.parquet")


def test_bm25s_average_length_is_fixed_by_the_first_chunks_written(store):
    """Recomputed by each run, it left the stored sparse vectors computed with another avgdl."""
    from tasks.chunking import Chunk
    from tasks.ingest import bm25_statistics

    def chunks(*texts):
        return [Chunk(f"d{i}", 0, text, 0, len(text), None, "s", {}, "h") for i, text in enumerate(texts)]

    kb = target(store, "kb", retrieval=RetrievalMode.sparse).collection
    first = bm25_statistics(store, kb, chunks("soil probes calibrated", "rain gauge"))
    assert first.avgdl == 2.5 and store.collection_metadata(kb)["bm25_avgdl"] == 2.5
    assert bm25_statistics(store, kb, chunks("a much longer text of many more index terms than before")).avgdl == 2.5
