import numpy as np

from tasks.chunking import Chunk
from tasks.indexing import build_points, write_documents
from tasks.retrieval import build_filter, retrieve
from tasks.store import QdrantStore


def test_retrieve_ranks_filters_and_thresholds():
    store = QdrantStore.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    vectors = np.eye(4, dtype=np.float32) + 0.05
    chunks = [Chunk(f"d{i}", 0, f"text {i}", 0, 6, None, f"s{i % 2}.md", {}, "h") for i in range(4)]
    write_documents(store, "c", build_points(chunks, vectors, embedding_model="m"), {})

    [hits] = retrieve(store, "c", vectors[:1], [None], top_k=3)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].doc_id == "d0" and hits[0].text == "text 0"
    assert hits[0].score > hits[1].score >= hits[2].score

    [only_close] = retrieve(store, "c", vectors[:1], [None], top_k=3, score_threshold=0.99)
    assert [h.doc_id for h in only_close] == ["d0"]

    [odd] = retrieve(store, "c", vectors[:1], [build_filter({"source": "s1.md"})], top_k=3)
    assert {h.doc_id for h in odd} == {"d1", "d3"} and {h.source for h in odd} == {"s1.md"}
