import numpy as np
import pytest

from tasks.chunking import Chunk
from tasks.errors import StoreError
from tasks.indexing import build_points, write_documents
from tasks.ingest import LAYOUTS
from tasks.retrieval import Retriever, build_filter, open_retriever, to_hits
from tasks.settings import FusionMethod, RetrievalMode
from tasks.sparse import Bm25
from tasks.store import QdrantStore, VectorLayout


class FixedEmbedder:
    """Maps each known text to a fixed unit vector (the real model is tested on the sample corpus)."""

    model_name = "fixed"
    dimension = 4

    def __init__(self):
        self.roles: set[bool] = set()  # query=True or False, as asked

    def embed(self, texts, *, query=False):
        self.roles.add(query)
        return np.array([np.eye(4, dtype=np.float32)[int(t[-1])] + 0.05 for t in texts])


def test_dense_retrieval_ranks_filters_and_thresholds():
    store = QdrantStore.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    vectors = FixedEmbedder().embed([f"text {i}" for i in range(4)])
    chunks = [Chunk(f"d{i}", 0, f"text {i}", 0, 6, None, f"s{i % 2}.md", {}, "h") for i in range(4)]
    write_documents(store, "c", build_points(chunks, vectors, embedding_model="m"), {})
    embedder = FixedEmbedder()
    retriever = Retriever("c", RetrievalMode.dense, VectorLayout(), embedder=embedder)

    [hits] = retriever.search(store, ["text 0"], [None], top_k=3)
    assert embedder.roles == {True}  # questions go in as queries (after an asymmetric model's query prompt)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].doc_id == "d0" and hits[0].text == "text 0"
    assert hits[0].score > hits[1].score >= hits[2].score

    [only_close] = retriever.search(store, ["text 0"], [None], top_k=3, score_threshold=0.99)
    assert [h.doc_id for h in only_close] == ["d0"]

    [odd] = retriever.search(store, ["text 0"], [build_filter({"source": "s1.md"})], top_k=3)
    assert {h.doc_id for h in odd} == {"d1", "d3"} and {h.source for h in odd} == {"s1.md"}


@pytest.fixture
def hybrid_store():
    """Four one-chunk documents with dense and BM25 vectors."""
    store = QdrantStore.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={"embedding_model": "fixed"}, layout=LAYOUTS[RetrievalMode.hybrid])
    texts = ["calibrating soil probes 0", "rain gauge buckets 1", "the E-219 error code 2", "solar panels 3"]
    chunks = [Chunk(f"d{i}", 0, text, 0, len(text), None, "s.md", {}, "h") for i, text in enumerate(texts)]
    bm25 = Bm25(avgdl=3.0)
    points = build_points(chunks, FixedEmbedder().embed(texts), embedding_model="fixed",
                          layout=LAYOUTS[RetrievalMode.hybrid], bm25=bm25)
    write_documents(store, "c", points, {})
    yield store, bm25
    store.close()


def test_sparse_retrieval_is_bm25_with_qdrant_idf(hybrid_store):
    store, bm25 = hybrid_store
    retriever = Retriever("c", RetrievalMode.sparse, LAYOUTS[RetrievalMode.hybrid], bm25=bm25)
    [hits, none] = retriever.search(store, ["What does E-219 mean? 0", "unrelated words 0"], [None, None], top_k=4)
    assert [h.doc_id for h in hits] == ["d2"]  # the one document sharing a term ("219") with the query
    # Qdrant's idf of a term in 1 of 4 points, ln(1 + (4 - 1 + 0.5) / (1 + 0.5)), times the stored tf
    # part, which is 1 for tf = 1 in a document of average length.
    assert bm25.document("the E-219 error code 2").values == [1.0, 1.0, 1.0]
    assert hits[0].score == pytest.approx(np.log(1 + 3.5 / 1.5), rel=1e-5)
    assert none == []


@pytest.mark.parametrize("fusion", list(FusionMethod))
def test_hybrid_fuses_both_rankings(hybrid_store, fusion):
    store, bm25 = hybrid_store
    retriever = Retriever("c", RetrievalMode.hybrid, LAYOUTS[RetrievalMode.hybrid], embedder=FixedEmbedder(), bm25=bm25,
                          fusion=fusion)
    # Dense points at d0 (the text ends in 0); BM25 points at d1 ("rain gauge").
    [hits] = retriever.search(store, ["rain gauge 0"], [None], top_k=4)
    assert {h.doc_id for h in hits[:2]} == {"d0", "d1"}
    # Each branch keeps its top 100, not its top k: what ranks past k in both lists can still make the fused top k.
    assert [branch.limit for branch in retriever.requests(["rain gauge 0"], [None], top_k=3)[0].prefetch] == [100, 100]
    if fusion == FusionMethod.rrf:  # the threshold applies to the fused score: 2/61 for first in both lists
        [first_in_both] = retriever.search(store, ["rain gauge 1"], [None], top_k=4, score_threshold=0.0325)
        assert [h.doc_id for h in first_in_both] == ["d1"]


def test_collections_without_the_needed_vectors_are_refused_in_one_line():
    store = QdrantStore.connect(":memory:")
    store.create_collection("dense--1", dimension=4, metadata={"embedding_model": "fixed"})
    store.move_alias("dense", "dense--1")
    write_documents(store, "dense", build_points([Chunk("d", 0, "t 0", 0, 3, None, "s", {}, "h")], FixedEmbedder().embed(["0"]),
                                                 embedding_model="fixed"), {})
    for mode in (RetrievalMode.sparse, RetrievalMode.hybrid):
        with pytest.raises(StoreError) as error:
            open_retriever(store, "dense", mode)
        assert str(error.value) == (
            f"collection 'dense' has no sparse vectors, so it cannot serve {mode.value} retrieval; "
            f"use --retrieval dense, or re-ingest with --rebuild --retrieval {mode.value}"
        )
    assert open_retriever(store, "dense", RetrievalMode.dense).layout == VectorLayout()


def test_equal_scores_rank_by_document_and_chunk_whatever_order_the_engine_returns():
    from qdrant_client import models

    def point(doc_id: str, chunk_index: int, score: float):
        return models.ScoredPoint(id=f"{doc_id}-{chunk_index}", version=0, score=score,
                                  payload={"doc_id": doc_id, "chunk_index": chunk_index, "text": "t"})

    tie = 1 / 61 + 1 / 62
    engine_order = [point("b", 2, tie), point("b", 1, tie), point("a", 9, tie), point("c", 0, 0.5), point("a", 0, 0.01)]
    hits = to_hits(engine_order)
    assert [(h.rank, h.doc_id, h.chunk_index) for h in hits] == [
        (1, "c", 0), (2, "a", 9), (3, "b", 1), (4, "b", 2), (5, "a", 0)]
    assert to_hits(list(reversed(engine_order))) == hits


def test_a_score_threshold_no_passage_can_reach_is_refused(tmp_path):
    """Hybrid RRF scores are at most 2/60: a threshold meant for cosine dropped every passage of every
    question, and the answers came out without context and without a word. (The bound itself is
    checked against the engines' scores in test_store_contract.py.)"""
    from pydantic import ValidationError

    from tasks.settings import AnswerParams

    def params(**given):
        return AnswerParams(questions=tmp_path / "q.jsonl", collection="kb", data_dir=tmp_path, **given)

    with pytest.raises(ValidationError, match=r"score_threshold 0.3 is above the highest score of hybrid retrieval with rrf "
                                              r"fusion \(0.03333\): every passage would be dropped"):
        params(score_threshold=0.3)
    with pytest.raises(ValidationError, match=r"above the highest score of dense retrieval \(1\)"):
        params(score_threshold=1.5, retrieval=RetrievalMode.dense)
    assert params(score_threshold=0.02).score_threshold == 0.02
    assert params(score_threshold=0.3, retrieval=RetrievalMode.dense).score_threshold == 0.3
    assert params(score_threshold=2.5, fusion=FusionMethod.dbsf).score_threshold == 2.5  # DBSF: unbounded
    assert params(score_threshold=12.0, retrieval=RetrievalMode.sparse).score_threshold == 12.0  # BM25: unbounded


def test_a_collection_keeps_the_bm25_analyzer_it_was_built_with():
    """Queries analysed otherwise than the stored documents miss them: a collection from before the
    analyzer recorded its version keeps version 1 until a rebuild, for queries and for later writes."""
    from tasks.ingest import bm25_statistics, collection_metadata

    store = QdrantStore.connect(":memory:")
    sparse = LAYOUTS[RetrievalMode.sparse]
    store.create_collection("new", dimension=4, metadata=collection_metadata("m", 4, 200, 32, sparse), layout=sparse)
    old_metadata = {key: value for key, value in collection_metadata("m", 4, 200, 32, sparse).items() if key != "bm25_analyzer"}
    store.create_collection("old", dimension=4, metadata=old_metadata, layout=sparse)
    chunks = [Chunk("d", 0, "Error E-504", 0, 11, None, "s", {}, "h")]
    assert [bm25_statistics(store, name, chunks).analyzer_version for name in ("new", "old")] == [2, 1]
    for name in ("new", "old"):
        write_documents(store, name, build_points(chunks, None, embedding_model="m", layout=sparse,
                                                  bm25=bm25_statistics(store, name, chunks)), {})
    assert [open_retriever(store, name, RetrievalMode.sparse).bm25.analyzer_version for name in ("new", "old")] == [2, 1]
    store.close()
