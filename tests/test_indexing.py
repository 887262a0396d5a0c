import hashlib

import numpy as np
import pytest

from tasks.chunking import Chunk
from tasks.indexing import (
    Marker, build_points, delete_missing_documents, document_hash, index_fingerprint, plan_batch, point_id, read_markers,
    write_documents,
)
from tasks.sources import SourceRow
from tasks.store import QdrantStore


def test_point_ids_are_a_pure_function_of_doc_and_chunk():
    assert point_id("a.txt", 0) == point_id("a.txt", 0)
    ids = {point_id(doc, i) for doc in ("a.txt", "b.txt", "a.txt0") for i in range(50)}
    assert len(ids) == 150
    assert point_id("a", 10) != point_id("a1", 0)


def test_document_hash_follows_text_metadata_and_settings():
    row = SourceRow("x", "x", "text", title="T", source="x", metadata={"k": 1})
    base = document_hash(row, "m|200|32")
    assert base == document_hash(SourceRow("x", "x", "text", title="T", source="x", metadata={"k": 1}), "m|200|32")
    assert base != document_hash(SourceRow("x", "x", "text!", title="T", source="x", metadata={"k": 1}), "m|200|32")
    assert base != document_hash(SourceRow("x", "x", "text", title="T", source="x", metadata={"k": 2}), "m|200|32")
    assert base != document_hash(row, "m|100|32")
    assert base != document_hash(SourceRow("x", "x", "text", title="U", source="x", metadata={"k": 1}), "m|200|32")
    assert base != document_hash(SourceRow("x", "x", "text", title="T", source="y", metadata={"k": 1}), "m|200|32")


def test_plan_skips_documents_whose_marker_matches():
    rows = [SourceRow(d, d, d * 3, source=d) for d in ("same", "changed", "new")]
    markers = {"same": Marker(document_hash(rows[0], "f"), 2), "changed": Marker("old", 5)}
    plan = plan_batch(rows, markers, "f")
    assert [r.doc_id for r, _ in plan.changed] == ["changed", "new"]
    assert plan.previous_chunks == {"changed": 5}
    assert plan.unchanged == 1


def chunks_for(doc_id, n, doc_hash):
    return [Chunk(doc_id, i, f"{doc_id} part {i}", i * 10, i * 10 + 5, None, doc_id, {}, doc_hash) for i in range(n)]


@pytest.fixture
def store():
    store = QdrantStore.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    yield store
    store.close()


def write(store, chunks, previous=None):
    vectors = np.random.default_rng(0).random((len(chunks), 4), dtype=np.float32)
    return write_documents(store, "c", build_points(chunks, vectors, embedding_model="m"), previous or {})


def test_shorter_new_version_deletes_its_leftover_chunks(store):
    write(store, chunks_for("doc", 5, "v1") + chunks_for("other", 2, "o"))
    deleted = write(store, chunks_for("doc", 2, "v2"), previous={"doc": 5})
    assert deleted == 3
    assert store.count("c") == 4
    assert read_markers(store, "c", ["doc", "other", "absent"]) == {"doc": Marker("v2", 2), "other": Marker("o", 2)}


def test_payload_carries_what_readers_need(store):
    write(store, chunks_for("doc", 2, "v1"))
    payload = store.retrieve_payloads("c", [point_id("doc", 1)], ["doc_id", "chunk_index", "text", "content_hash", "embedding_model",
                                                                 "source", "start", "end"])
    assert payload[point_id("doc", 1)] == {
        "doc_id": "doc", "chunk_index": 1, "text": "doc part 1", "source": "doc", "embedding_model": "m", "start": 10, "end": 15,
        "content_hash": hashlib.sha256(b"doc part 1").hexdigest(),  # of the chunk's own text
    }


def test_delete_missing_removes_only_documents_not_in_source(store):
    write(store, chunks_for("keep", 3, "k") + chunks_for("gone", 4, "g"))
    assert delete_missing_documents(store, "c", {"keep"}) == 4
    assert store.count("c") == 3
    assert set(read_markers(store, "c", ["keep", "gone"])) == {"keep"}


def test_a_models_document_prompt_is_part_of_the_fingerprint():
    """Documents embedded before prompts were applied (or under another prompt) must count as changed;
    a model without one keeps the fingerprint, so nothing is embedded again for it."""
    plain = index_fingerprint(embedding_model="m", chunk_tokens=200, chunk_overlap=32)
    assert plain == "m|200|32" == index_fingerprint(embedding_model="m", chunk_tokens=200, chunk_overlap=32, document_prompt="")
    assert index_fingerprint(embedding_model="m", chunk_tokens=200, chunk_overlap=32, document_prompt="passage: ") != plain


class DiesOnDelete(QdrantStore):
    """A store whose `delete` raises from its `dies_at`-th call on: a run killed at that point."""

    dies_at = 1
    deletes = 0

    def delete(self, collection, ids):
        self.deletes += 1
        if self.deletes >= self.dies_at:
            raise RuntimeError("killed")
        super().delete(collection, ids)


def versioned(doc_id, n, version):
    return [Chunk(doc_id, i, f"{version} part {i}", i * 10, i * 10 + 5, None, doc_id, {}, version) for i in range(n)]


def texts_of(store, doc_id):
    return sorted((p.payload["chunk_index"], p.payload["text"]) for p in store.iter_points("c", fields=["doc_id", "chunk_index", "text"])
                  if p.payload["doc_id"] == doc_id)


def test_a_write_cut_short_leaves_no_marker_that_either_version_matches():
    """The old marker stayed until the new version was written: killed in between, with the old text back
    in the source, the document was taken as unchanged over a mix of both versions, for good."""
    store = DiesOnDelete.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    write(store, versioned("doc", 5, "v1"))
    with pytest.raises(RuntimeError, match="killed"):  # after the new body, at the old leftovers' delete
        write(store, versioned("doc", 3, "v2"), previous={"doc": 5})
    marker = read_markers(store, "c", ["doc"])["doc"]
    assert marker.doc_hash not in ("v1", "v2") and marker.n_chunks == 5  # counts the old chunks too
    store.dies_at = 10**9
    assert write(store, versioned("doc", 5, "v1"), previous={"doc": marker.n_chunks}) == 0
    assert texts_of(store, "doc") == [(i, f"v1 part {i}") for i in range(5)]
    store.close()


def test_a_deletion_cut_short_leaves_what_a_later_write_finds_and_deletes():
    """Chunks were deleted in scroll order: a run killed between batches left gaps, the probe for
    leftovers stopped at the first, and the chunks past it stayed, under the document's id, for good."""
    store = DiesOnDelete.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    write(store, versioned("big", 1500, "v1") + versioned("keep", 2, "k"))
    store.dies_at = 2
    with pytest.raises(RuntimeError, match="killed"):
        delete_missing_documents(store, "c", {"keep"})
    left = [index for index, _ in texts_of(store, "big")]
    assert left == list(range(1, len(left) + 1)) and 0 < len(left) < 1499  # chunks 1..k: no marker, no gap
    store.dies_at = 10**9
    write(store, versioned("big", 3, "v2"))  # the document back, shorter, with no marker to say how long it was
    assert texts_of(store, "big") == [(i, f"v2 part {i}") for i in range(3)]
    store.close()
