"""One contract for every embedded store backend: qdrant-client local mode (path and in-memory) and
qdrant-edge. The same operations, through the real indexing and retrieval code, with hand-made
vectors so the suite runs in seconds."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.chunking import Chunk
from tasks.edge_store import EdgeStore
from tasks.errors import StoreError
from tasks.indexing import build_points, point_id, write_documents
from tasks.ingest import LAYOUTS
from tasks.retrieval import Retriever, build_filter
from tasks.settings import FusionMethod, RetrievalMode
from tasks.sparse import Bm25
from tasks.store import QdrantStore, VectorLayout, new_physical_name

HYBRID = LAYOUTS[RetrievalMode.hybrid]
TEXTS = ["calibrating soil probes 0", "rain gauge buckets 1", "the E-219 error code 2", "solar panels 3"]
SOURCES = ["a.md", "b.md", "b.md", "c.md"]
BM25 = Bm25(avgdl=3.0)
OFFSET = np.array([0.08, 0.06, 0.04, 0.02], dtype=np.float32)


class FixedEmbedder:
    """The text's last character picks a unit axis, plus a small common part without ties, so rankings are known."""

    model_name = "fixed"
    dimension = 4

    def embed(self, texts, *, query=False):
        return np.array([np.eye(4, dtype=np.float32)[int(t[-1])] + OFFSET for t in texts])


def spec_for(backend: str, tmp_path) -> str:
    return {"local": f"local:{tmp_path / 'local'}", "memory": ":memory:", "edge": f"edge:{tmp_path / 'edge'}"}[backend]


@pytest.fixture(params=["local", "memory", "edge"])
def spec(request, tmp_path) -> str:
    return spec_for(request.param, tmp_path)


@pytest.fixture(params=["local", "edge"])
def disk_spec(request, tmp_path) -> str:
    return spec_for(request.param, tmp_path)


def chunks_of(texts, sources=SOURCES, doc_hash="h1"):
    return [Chunk(f"d{i}", 0, text, 0, len(text), None, source, {}, doc_hash)
            for i, (text, source) in enumerate(zip(texts, sources))]


def fill(store: QdrantStore, collection: str = "kb--1", alias: str = "kb") -> None:
    """A hybrid collection of four one-chunk documents behind `alias`."""
    store.create_collection(collection, dimension=4, metadata={"embedding_model": "fixed"}, layout=HYBRID)
    points = build_points(chunks_of(TEXTS), FixedEmbedder().embed(TEXTS), embedding_model="fixed", layout=HYBRID, bm25=BM25)
    write_documents(store, collection, points, {})
    store.move_alias(alias, collection)
    store.optimize(collection)


@pytest.fixture
def store(spec):
    store = QdrantStore.connect(spec)
    fill(store)
    yield store
    store.close()


def search(store, mode, texts, filters=None, *, fusion=FusionMethod.rrf, top_k=4, score_threshold=None):
    retriever = Retriever("kb", mode, HYBRID, embedder=FixedEmbedder(), bm25=BM25, fusion=fusion)
    return retriever.search(store, texts, filters or [None] * len(texts), top_k=top_k, score_threshold=score_threshold)


def test_edge_store_implements_every_store_operation():
    shared = {"readable_collection", "iter_payload_field"}  # built on the other operations
    operations = {name for name, value in vars(QdrantStore).items() if callable(value) and not name.startswith("_")}
    assert operations - shared - {"connect"} <= set(vars(EdgeStore))


def test_collection_with_layout_metadata_and_payload_reads(store):
    assert store.resolve("kb") == "kb--1" and store.resolve("kb--1") == "kb--1" and store.resolve("nope") is None
    assert store.count("kb") == 4
    assert store.collection_metadata("kb") == {"embedding_model": "fixed", "vectors": ["dense", "sparse"]}
    assert VectorLayout.from_metadata(store.readable_collection("kb")) == HYBRID
    store.update_metadata("kb", {"bm25_avgdl": 3.0})
    assert store.collection_metadata("kb--1") == {"embedding_model": "fixed", "vectors": ["dense", "sparse"], "bm25_avgdl": 3.0}
    ids = [point_id("d0", 0), point_id("d3", 0), point_id("missing", 0)]
    payloads = store.retrieve_payloads("kb", ids, ["doc_id", "n_chunks"])
    assert payloads == {ids[0]: {"doc_id": "d0", "n_chunks": 1}, ids[1]: {"doc_id": "d3", "n_chunks": 1}}
    assert sorted(store.iter_payload_field("kb", "source")) == sorted(
        (point_id(f"d{i}", 0), source) for i, source in enumerate(SOURCES))


def test_points_read_back_with_payload_and_both_vectors(store):
    points = {str(r.id): r for r in store.iter_points("kb", with_vectors=True)}
    assert set(points) == {point_id(f"d{i}", 0) for i in range(4)}
    d2 = points[point_id("d2", 0)]
    assert d2.payload["text"] == TEXTS[2] and d2.payload["source"] == "b.md"
    [vector] = FixedEmbedder().embed(TEXTS[2:3])
    np.testing.assert_allclose(d2.vector["dense"], vector / np.linalg.norm(vector), atol=1e-6)  # cosine: stored normalized
    expected = BM25.document(TEXTS[2])
    stored = dict(zip(d2.vector["sparse"].indices, d2.vector["sparse"].values))
    assert stored == pytest.approx(dict(zip(expected.indices, expected.values)))
    [only_source] = [r.payload for r in store.iter_points("kb", fields=["source"]) if str(r.id) == point_id("d0", 0)]
    assert only_source == {"source": "a.md"}
    assert all(r.vector is None for r in store.iter_points("kb"))


def test_every_point_is_read_past_the_first_page(store):
    """Deleting documents gone from the source reads every point: past a page, they stayed in the index."""
    more = [Chunk(f"m{i}", 0, f"more {i % 4}", 0, 6, None, "m.md", {}, "h") for i in range(1005)]
    store.upsert("kb", build_points(more, FixedEmbedder().embed([c.text for c in more]), embedding_model="fixed", layout=HYBRID,
                                    bm25=BM25))
    assert len({str(r.id) for r in store.iter_points("kb", fields=["doc_id"])}) == store.count("kb") == 1009


def test_incremental_rewrite_and_delete(store):
    longer = chunks_of(TEXTS[:1], doc_hash="h2") + [Chunk("d0", 1, "more soil 0", 0, 11, None, "a.md", {}, "h2")]
    write_documents(store, "kb", build_points(longer, FixedEmbedder().embed([c.text for c in longer]),
                                              embedding_model="fixed", layout=HYBRID, bm25=BM25), {"d0": 1})
    assert store.count("kb") == 5
    assert store.retrieve_payloads("kb", [point_id("d0", 0)], ["doc_hash", "n_chunks"]) == {
        point_id("d0", 0): {"doc_hash": "h2", "n_chunks": 2}}
    store.delete("kb", [point_id("d0", 1), point_id("d3", 0)])
    assert store.count("kb") == 3
    assert {doc for _, doc in store.iter_payload_field("kb", "doc_id")} == {"d0", "d1", "d2"}


def test_alias_swap_and_drop(store):
    store.create_collection("kb--2", dimension=4, metadata={"embedding_model": "fixed", "generation": 2}, layout=HYBRID)
    for other_alias in ("kb--1", "kb-"):  # names that start with "kb--" (a rebuild of kb dropped them)
        store.create_collection(new_physical_name(other_alias), dimension=4, metadata={}, layout=HYBRID)
    assert store.physical_collections("kb") == ["kb--1", "kb--2"]
    store.move_alias("kb", "kb--2")
    assert store.resolve("kb") == "kb--2" and store.count("kb") == 0
    assert store.collection_metadata("kb")["generation"] == 2
    store.drop_collection("kb--1")
    assert store.physical_collections("kb") == ["kb--2"] and store.resolve("kb--1") is None
    with pytest.raises(StoreError, match="is a collection, not an alias"):
        store.move_alias("kb--2", "kb--2")
    with pytest.raises(StoreError):  # an alias moves only to a collection that exists
        store.move_alias("kb", "kb--9")
    assert store.resolve("kb") == "kb--2"
    with pytest.raises(StoreError):  # nor is a collection created under an alias's name
        store.create_collection("kb", dimension=4, metadata={}, layout=HYBRID)
    if isinstance(store, EdgeStore):  # a directory each: "." and ".." would be the store's own
        for name in (".", ".."):
            with pytest.raises(StoreError, match=rf"^invalid collection name '{re.escape(name)}'"):
                store.create_collection(name, dimension=4, metadata={}, layout=HYBRID)
    store.drop_collection("kb--2")
    assert store.resolve("kb") is None  # dropping a collection drops its aliases
    with pytest.raises(StoreError, match="does not exist"):
        store.readable_collection("kb")


def test_a_boolean_or_huge_integer_filter_is_applied_or_refused_for_its_question_alone(store):
    """qdrant-edge 0.9.0 makes MatchValue(True) the integer 1: on the edge store a boolean filter matched
    nothing (or the 1s), and its question was answered without context and without a word."""
    from tasks.answering import Pending, retrieve_part
    from tasks.questions import Question

    flagged = Chunk("f0", 0, "flagged soil 0", 0, 14, None, "f.md", {"flag": True}, "h")
    store.upsert("kb", build_points([flagged], FixedEmbedder().embed([flagged.text]), embedding_model="fixed", layout=HYBRID, bm25=BM25))
    retriever = Retriever("kb", RetrievalMode.dense, HYBRID, embedder=FixedEmbedder(), bm25=BM25)
    part = [Pending(Question("q1", "soil 0", "q:1", filter={"metadata.flag": True})), Pending(Question("q2", "soil 0", "q:2")),
            Pending(Question("q3", "soil 0", "q:3", filter={"metadata.n": [2**64, 1]})),  # beyond 64 bits: a TypeError failed all three
            Pending(Question("q4", "soil 0", "q:4", filter={"metadata.n": 2**63})), Pending(Question("q5", "soil 0", "q:5", filter={"metadata.n": -2**63}))]
    retrieve_part(part, store, retriever, top_k=10, score_threshold=None)
    if isinstance(store, EdgeStore):
        assert part[0].error.startswith("invalid filter: qdrant-edge 0.9.0 cannot match a boolean") and not part[0].hits
        assert part[2].error == "invalid filter: qdrant-edge cannot match 18446744073709551616, an integer beyond 64 bits"
        assert part[3].error == "invalid filter: qdrant-edge cannot match 9223372036854775808, an integer beyond 64 bits"
        assert part[4].error is None  # the lowest signed 64-bit integer is one
    else:
        assert part[0].error is None and [hit.doc_id for hit in part[0].hits] == ["f0"]
        assert part[2].error is None and part[2].hits == []
    assert part[1].error is None and len(part[1].hits) == 5


def test_a_chunk_without_terms_leaves_bm25_scores_alone(store):
    """A chunk of stop words only had an empty sparse vector, which local mode counted in BM25's document
    total and Qdrant's engine did not: sparse and hybrid scores differed between the backends."""
    [before] = search(store, RetrievalMode.sparse, ["rain gauge 1"])
    empty = Chunk("e0", 0, "of the 1", 0, 8, None, "e.md", {}, "h")
    store.upsert("kb", build_points([empty], FixedEmbedder().embed([empty.text]), embedding_model="fixed", layout=HYBRID, bm25=BM25))
    [after] = search(store, RetrievalMode.sparse, ["rain gauge 1"])
    assert before and [(hit.doc_id, hit.score) for hit in after] == [(hit.doc_id, hit.score) for hit in before]
    assert [hit.doc_id for hit in search(store, RetrievalMode.dense, ["of the 1"], top_k=5)[0]].count("e0") == 1


def test_dense_query_ranks_thresholds_and_filters(store):
    [hits] = search(store, RetrievalMode.dense, ["soil 0"])
    assert [h.doc_id for h in hits][0] == "d0" and [h.rank for h in hits] == [1, 2, 3, 4]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].score > hits[1].score >= hits[3].score
    assert hits[0].point_id == point_id("d0", 0) and hits[0].text == TEXTS[0] and hits[0].source == "a.md"
    [close] = search(store, RetrievalMode.dense, ["soil 0"], score_threshold=0.99)
    assert [h.doc_id for h in close] == ["d0"]
    [by_value, by_any] = search(store, RetrievalMode.dense, ["soil 0", "soil 0"],
                                [build_filter({"source": "b.md"}), build_filter({"source": ["a.md", "c.md"]})])
    assert {h.doc_id for h in by_value} == {"d1", "d2"}
    assert [h.doc_id for h in by_any] == ["d0", "d3"]


def test_sparse_query_is_bm25_with_idf(store):
    [hits, none] = search(store, RetrievalMode.sparse, ["What does E-219 mean? 0", "unrelated words 0"])
    assert [h.doc_id for h in hits] == ["d2"] and none == []
    # Qdrant's idf of a term in 1 of 4 points, ln(1 + (4 - 1 + 0.5) / (1 + 0.5)), times the tf part (1 here).
    assert hits[0].score == pytest.approx(np.log(1 + 3.5 / 1.5), rel=1e-5)


@pytest.mark.parametrize("fusion", list(FusionMethod))
def test_hybrid_query_fuses_both_rankings(store, fusion):
    # Dense points at d0 (the text ends in 0); BM25 points at d1 ("rain gauge").
    [hits, filtered] = search(store, RetrievalMode.hybrid, ["rain gauge 0", "rain gauge 0"],
                              [None, build_filter({"source": ["b.md", "c.md"]})], fusion=fusion)
    assert {h.doc_id for h in hits[:2]} == {"d0", "d1"} and len(hits) == 4
    assert filtered[0].doc_id == "d1" and [h.doc_id for h in filtered][1:] in (["d2", "d3"], ["d3", "d2"])


def test_rrf_scores_reach_the_highest_score_a_threshold_is_checked_against(store):
    """The bound was 2/61 where the engines give 2/60 (ranks counted from 0): a reachable threshold was refused."""
    from tasks.settings import highest_score

    [hits] = search(store, RetrievalMode.hybrid, ["calibrating soil probes 0"])  # d0 first in both rankings
    assert hits[0].doc_id == "d0" and hits[0].score == pytest.approx(highest_score(RetrievalMode.hybrid, FusionMethod.rrf))


def test_edge_ranks_and_scores_like_qdrant_client(tmp_path):
    """The same data and queries give the same rankings and scores in qdrant-edge and local mode."""
    results = {}
    for backend in ("memory", "edge"):
        store = QdrantStore.connect(spec_for(backend, tmp_path))
        fill(store)
        results[backend] = [
            [(h.doc_id, round(h.score, 4)) for h in hits]
            for mode in RetrievalMode for fusion in FusionMethod
            for hits in search(store, mode, ["rain gauge 0", "E-219 code 3"], fusion=fusion)
        ]
        store.close()
    assert results["edge"] == results["memory"]


def test_reopen_keeps_points_aliases_and_metadata(disk_spec):
    store = QdrantStore.connect(disk_spec)
    fill(store)
    store.create_collection("kb--2", dimension=4, metadata={"embedding_model": "fixed"}, layout=HYBRID)
    store.update_metadata("kb", {"bm25_avgdl": 3.0})
    store.close()
    store = QdrantStore.connect(disk_spec)
    try:
        assert store.resolve("kb") == "kb--1" and store.count("kb") == 4 and store.count("kb--2") == 0
        assert store.collection_metadata("kb")["bm25_avgdl"] == 3.0
        assert store.physical_collections("kb") == ["kb--1", "kb--2"]
        [hits] = search(store, RetrievalMode.hybrid, ["rain gauge 1"])
        assert hits[0].doc_id == "d1"
    finally:
        store.close()


def test_second_process_gets_one_line_error(disk_spec):
    store = QdrantStore.connect(disk_spec)
    try:
        code = f"from tasks.store import QdrantStore\nQdrantStore.connect({disk_spec!r})"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                cwd=Path(__file__).parents[1])
        assert result.returncode != 0
        assert "is in use by another process" in result.stderr.strip().splitlines()[-1]
    finally:
        store.close()


def test_edge_store_errors_are_one_line(tmp_path):
    store = QdrantStore.connect(f"edge:{tmp_path}")
    try:
        with pytest.raises(StoreError, match="collection 'nope' not found"):
            store.count("nope")
        store.create_collection("c", dimension=4, metadata={})
        with pytest.raises(StoreError, match="already exists"):
            store.create_collection("c", dimension=4, metadata={})
        with pytest.raises(StoreError, match="invalid collection name"):
            store.create_collection("../c", dimension=4, metadata={})
        points = build_points(chunks_of(TEXTS[:1]), np.ones((1, 3)), embedding_model="fixed", layout=VectorLayout())
        with pytest.raises(StoreError) as error:
            store.upsert("c", points)
        assert "writing points to c failed" in str(error.value) and "\n" not in str(error.value)
    finally:
        store.close()
    with pytest.raises(StoreError, match="edge: needs a path"):
        QdrantStore.connect("edge:")


@pytest.mark.parametrize("interval, flushed", [(3600.0, False), (0.0, True)])
def test_edge_writes_flush_the_shard_at_the_interval(tmp_path, interval, flushed):
    """The engine writes a segment's point-id mappings to disk on flush only (until then, opening the
    shard replays the writes from the WAL); every write reaches the WAL and survives either way."""
    store = EdgeStore.open(f"edge:{tmp_path}", flush_interval_s=interval)
    store.create_collection("c", dimension=4, metadata={}, layout=HYBRID)
    write_documents(store, "c", build_points(chunks_of(TEXTS), FixedEmbedder().embed(TEXTS), embedding_model="fixed",
                                             layout=HYBRID, bm25=BM25), {})
    assert any(tmp_path.glob("collections/c/shard/segments/*/mutable_id_tracker.mappings")) is flushed
    store.close()
    reopened = EdgeStore.open(f"edge:{tmp_path}")
    assert reopened.count("c") == 4
    reopened.close()


def test_opening_the_edge_store_removes_what_crashed_creations_left(tmp_path):
    store = EdgeStore.open(f"edge:{tmp_path}")
    fill(store)
    store.close()
    crashed = tmp_path / "collections" / "kb--20261129T000000000000" / "shard" / "segments"
    crashed.mkdir(parents=True)  # a creation killed before its metadata file was written
    store = EdgeStore.open(f"edge:{tmp_path}")
    try:
        assert not crashed.parents[1].exists()
        assert store.physical_collections("kb") == ["kb--1"] and store.count("kb") == 4
    finally:
        store.close()
