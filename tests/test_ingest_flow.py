"""The ingest flow end to end: real Prefect server, real model, real embedded Qdrant (edge by default)."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from qdrant_client import models

from flows.ingest import ingest
from tasks.errors import QuarantineThresholdExceeded, StoreError
from tasks.indexing import point_id
from tasks.models import resolve_embedding_model
from tasks.settings import IngestParams, RetrievalMode
from tasks.store import QdrantStore


@pytest.fixture
def params(prefect_api_url, corpus: Path, data_dir: Path):
    def make(**overrides) -> IngestParams:
        return IngestParams(source=corpus, collection="kb", data_dir=data_dir, **overrides)

    return make


def open_store(params: IngestParams) -> QdrantStore:
    return QdrantStore.connect(params.store)


def points_by_doc(store: QdrantStore, collection: str) -> dict[str, set[str]]:
    docs: dict[str, set[str]] = {}
    for pid, doc_id in store.iter_payload_field(collection, "doc_id"):
        docs.setdefault(doc_id, set()).add(pid)
    return docs


def test_first_run_indexes_the_sample_corpus(params, embedder):
    report = ingest(params())
    assert (report.loaded, report.valid, report.quarantined, report.deleted) == (36, 36, 0, 0)
    assert report.chunks == report.embedded == report.upserted == report.points > 36
    assert report.loaded == report.valid + report.quarantined
    store = open_store(params())
    try:
        assert store.resolve("kb") == report.physical_collection
        assert store.collection_metadata("kb")["embedding_model"] == "all-MiniLM-L6-v2"
        docs = points_by_doc(store, "kb")
        assert len(docs) == 36
        for doc_id, ids in docs.items():
            assert ids == {point_id(doc_id, i) for i in range(len(ids))}
        question = embedder.embed(["What does error code E-219 mean?"])[0]
        [hits] = store.query_batch("kb", [models.QueryRequest(query=question.tolist(), using="dense", limit=3, with_payload=True)])
        assert hits[0].payload["source"] == "troubleshooting-guide.txt"
        assert "E-219" in hits[0].payload["text"]
    finally:
        store.close()
    assert pq.read_table(report.quarantine_path).num_rows == 0


def test_re_runs_embed_only_what_changed(params, corpus):
    first = ingest(params())
    unchanged = ingest(params())
    assert (unchanged.embedded, unchanged.upserted, unchanged.deleted, unchanged.unchanged) == (0, 0, 0, 36)
    assert unchanged.points == first.points

    store = open_store(params())
    before = points_by_doc(store, "kb")
    store.close()
    long_doc = "troubleshooting-guide.txt"
    assert len(before[long_doc]) > 2
    (corpus / long_doc).write_text("Troubleshooting\n\nError E-219 means the wind sensor bus timed out.")
    (corpus / "glossary.md").unlink()
    (corpus / "new-note.txt").write_text("The LG-1 gateway reboots nightly at 03:00.")

    changed = ingest(params())
    assert changed.loaded == 36 and changed.unchanged == 34
    assert changed.embedded == changed.upserted == 2
    assert changed.deleted == (len(before[long_doc]) - 1) + len(before["glossary.md"])
    store = open_store(params())
    try:
        after = points_by_doc(store, "kb")
        assert after[long_doc] == {point_id(long_doc, 0)}
        assert "glossary.md" not in after and "new-note.txt" in after
        assert {d: ids for d, ids in after.items() if d not in (long_doc, "new-note.txt")} == {
            d: ids for d, ids in before.items() if d not in (long_doc, "glossary.md")
        }
        marker = store.retrieve_payloads("kb", [point_id(long_doc, 0)], ["text", "n_chunks"])[point_id(long_doc, 0)]
        assert "E-219" in marker["text"] and marker["n_chunks"] == 1
    finally:
        store.close()


def test_rebuild_swaps_the_alias_to_an_identical_new_collection(params):
    first = ingest(params())
    store = open_store(params())
    hashes_before = dict(store.iter_payload_field("kb", "content_hash"))
    store.close()

    rebuilt = ingest(params(rebuild=True))
    assert rebuilt.rebuild and rebuilt.physical_collection != first.physical_collection
    assert rebuilt.embedded == first.embedded and rebuilt.points == first.points
    store = open_store(params())
    try:
        assert store.resolve("kb") == rebuilt.physical_collection
        assert store.physical_collections("kb") == [rebuilt.physical_collection]
        assert dict(store.iter_payload_field("kb", "content_hash")) == hashes_before
    finally:
        store.close()


def test_a_broken_source_fails_the_run_and_deletes_nothing(params, corpus):
    first = ingest(params())
    files = sorted(p for p in corpus.rglob("*.txt"))
    for path in files:
        path.write_bytes(b"\x00\x01binary garbage")
    with pytest.raises(QuarantineThresholdExceeded, match="failed validation, more than the allowed 20%") as refused:
        ingest(params())
    store = open_store(params())
    try:
        assert store.count("kb") == first.points
    finally:
        store.close()
    quarantine = sorted(params().data_dir.glob("runs/kb/*/quarantine.parquet"), key=lambda p: p.stat().st_mtime)[-1]
    assert str(refused.value).endswith(f"; the rows and reasons are in {quarantine}")  # a failed run prints no summary
    table = pq.read_table(quarantine).to_pylist()
    assert len(table) == len(files)
    assert {row["reason"] for row in table} == {"binary content (NUL bytes)"}


def test_changing_the_embedding_model_needs_a_rebuild(params):
    ingest(params())
    with pytest.raises(StoreError, match="was built with embedding model 'all-MiniLM-L6-v2'"):
        ingest(params(embedding_model=resolve_embedding_model("all-MiniLM-L6-v2")))


def test_run_publishes_counts_and_validation_artifacts(params):
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    report = ingest(params())
    this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report.run_id)]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=this_run)}
    assert set(artifacts) == {"ingest-counts-kb", "ingest-validation-kb", "ingest-progress-kb"}
    assert artifacts["ingest-progress-kb"].type == "progress" and artifacts["ingest-progress-kb"].data == 100.0
    assert artifacts["ingest-counts-kb"].type == "table" and f'"points": {report.points}' in str(artifacts["ingest-counts-kb"].data)
    assert "36 rows checked: **36 valid**, **0 quarantined**" in artifacts["ingest-validation-kb"].data


def test_vectors_are_chosen_when_the_collection_is_created(params):
    sparse_only = ingest(params(retrieval=RetrievalMode.sparse))
    assert sparse_only.embedded == 0 and sparse_only.upserted == sparse_only.points > 36
    store = open_store(params())
    try:
        metadata = store.collection_metadata("kb")
        assert metadata["vectors"] == ["sparse"] and metadata["bm25_avgdl"] > 10
        [point] = [p for p in store.iter_points("kb", fields=[], with_vectors=True) if str(p.id) == point_id("glossary.md", 0)]
        assert set(point.vector) == {"sparse"} and point.vector["sparse"].indices
    finally:
        store.close()
    assert ingest(params()).unchanged == 36  # an incremental run keeps the collection's vectors
    with pytest.raises(StoreError, match="collection 'kb' stores sparse vectors, not hybrid; use --rebuild"):
        ingest(params(retrieval=RetrievalMode.hybrid))
    rebuilt = ingest(params(retrieval=RetrievalMode.hybrid, rebuild=True))
    assert rebuilt.embedded == rebuilt.points == sparse_only.points


def test_the_local_mode_store_still_indexes_rebuilds_and_answers_queries(params, data_dir):
    """The whole flow on qdrant-client's local mode (the default before edge, and the default still
    when a data directory holds one): first run, no-op re-run, rebuild with an alias swap, hybrid retrieval."""
    from tasks.retrieval import open_retriever

    (data_dir / "qdrant").mkdir()
    local = params()
    assert local.store == f"local:{data_dir / 'qdrant'}"
    first = ingest(local)
    assert first.loaded == first.valid == 36 and first.points == first.upserted > 36
    assert ingest(local).unchanged == 36
    rebuilt = ingest(params(rebuild=True))
    assert rebuilt.points == first.points and rebuilt.physical_collection != first.physical_collection
    store = open_store(local)
    try:
        assert store.resolve("kb") == rebuilt.physical_collection
        assert store.physical_collections("kb") == [rebuilt.physical_collection]
        retriever = open_retriever(store, "kb", RetrievalMode.hybrid, data_dir=data_dir)
        [hits] = retriever.search(store, ["What does error code E-219 mean?"], [None], top_k=3)
        # The E-219 chunk is first for dense and second for BM25, its neighbour the reverse: an exact RRF
        # tie (1/61 + 1/62), ordered by chunk index.
        assert hits[0].source == hits[1].source == "troubleshooting-guide.txt"
        assert hits[0].score == hits[1].score and hits[0].chunk_index < hits[1].chunk_index
        assert any("E-219" in hit.text for hit in hits[:2])
    finally:
        store.close()
