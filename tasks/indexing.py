"""Incremental indexing rules: deterministic point ids, document hashes, and a safe write order.

Each document's chunk 0 is its marker: its payload holds the document hash and chunk count. A
document is unchanged when its marker carries the same hash. A changed document's chunks are
written first, then its leftover chunks are deleted, and its marker is written last, so a crash at
any point leaves the old marker and the next run redoes that document.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tasks.chunking import Chunk
from tasks.sources import SourceRow
from tasks.sparse import Bm25
from tasks.store import QdrantStore, VectorLayout

POINT_NAMESPACE = uuid.UUID("6f1c1d1e-5b7a-4c61-9a55-2f0e8f1f3a10")
UPSERT_BATCH = 256


def point_id(doc_id: str, chunk_index: int) -> str:
    """The point id of a chunk: a UUID derived from (doc_id, chunk_index) alone."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{doc_id}\x1f{chunk_index}"))


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def document_hash(row: SourceRow, fingerprint: str) -> str:
    """Changes whenever the document or the way it is chunked and embedded changes."""
    parts = [fingerprint, row.title or "", row.source, json.dumps(row.metadata, sort_keys=True, default=str), row.text or ""]
    return content_hash("\x1e".join(parts))


def index_fingerprint(*, embedding_model: str, chunk_tokens: int, chunk_overlap: int, document_prompt: str = "") -> str:
    """Settings that change the points produced from the same document. The model's document prompt
    counts where it has one (documents embedded before prompts were applied are embedded again)."""
    return f"{embedding_model}|{chunk_tokens}|{chunk_overlap}" + (f"|{document_prompt}" if document_prompt else "")


@dataclass(frozen=True)
class Marker:
    doc_hash: str
    n_chunks: int


@dataclass(frozen=True)
class BatchPlan:
    """Which documents of a batch need (re)indexing, with their hashes and previous chunk counts."""

    changed: list[tuple[SourceRow, str]]
    previous_chunks: dict[str, int]
    unchanged: int


def read_markers(store: QdrantStore, collection: str, doc_ids: Sequence[str]) -> dict[str, Marker]:
    """The markers of those documents that are in the collection."""
    ids = {point_id(doc_id, 0): doc_id for doc_id in doc_ids}
    payloads = store.retrieve_payloads(collection, list(ids), ["doc_hash", "n_chunks"])
    return {ids[pid]: Marker(p["doc_hash"], int(p["n_chunks"])) for pid, p in payloads.items() if "doc_hash" in p}


def plan_batch(rows: Sequence[SourceRow], markers: dict[str, Marker], fingerprint: str) -> BatchPlan:
    """Compare each valid row's hash with its marker; unchanged documents are skipped entirely."""
    changed, previous = [], {}
    for row in rows:
        digest = document_hash(row, fingerprint)
        marker = markers.get(row.doc_id)
        if marker is not None and marker.doc_hash == digest:
            continue
        changed.append((row, digest))
        if marker is not None:
            previous[row.doc_id] = marker.n_chunks
    return BatchPlan(changed, previous, len(rows) - len(changed))


def build_points(
    chunks: Sequence[Chunk], vectors: np.ndarray | None, *, embedding_model: str, layout: VectorLayout = VectorLayout(),
    bm25: Bm25 | None = None,
) -> list:
    """Qdrant points for chunks in the collection's vector layout (dense vectors from `vectors`, BM25
    sparse vectors of the same text the model embeds from `bm25`); every payload names its document,
    position and model."""
    from qdrant_client import models

    n_chunks: dict[str, int] = {}
    for chunk in chunks:
        n_chunks[chunk.doc_id] = max(n_chunks.get(chunk.doc_id, 0), chunk.chunk_index + 1)

    def vector(index: int, chunk: Chunk):
        dense = vectors[index].tolist() if layout.dense else None
        sparse = None
        if layout.sparse:
            assert bm25 is not None, "a sparse layout needs BM25 statistics"
            encoded = bm25.document(chunk.sparse_text)
            # A chunk without a term (stop words only) gets no sparse vector: an empty one counted in
            # BM25's document total in local mode and not in Qdrant's engine, so scores differed.
            if encoded.indices:
                sparse = models.SparseVector(indices=encoded.indices, values=encoded.values)
        return layout.point_vector(dense, sparse)

    return [
        models.PointStruct(id=point_id(chunk.doc_id, chunk.chunk_index), vector=vector(index, chunk),
                           payload=chunk_payload(chunk, n_chunks=n_chunks[chunk.doc_id], embedding_model=embedding_model))
        for index, chunk in enumerate(chunks)
    ]


def chunk_payload(chunk: Chunk, *, n_chunks: int, embedding_model: str) -> dict:
    """A point's payload: the chunk and its place in the document, the document's hash and chunk
    count (read from chunk 0, the marker) and the model that embedded it."""
    return {
        "doc_id": chunk.doc_id,
        "chunk_index": chunk.chunk_index,
        "text": chunk.text,
        "title": chunk.title,
        "source": chunk.source,
        "start": chunk.start,
        "end": chunk.end,
        "metadata": chunk.metadata,
        "content_hash": content_hash(chunk.text),
        "doc_hash": chunk.doc_hash,
        "n_chunks": n_chunks,
        "embedding_model": embedding_model,
    }


def _in_batches(items: Sequence, size: int = UPSERT_BATCH) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stored_chunk_ends(store: QdrantStore, collection: str, starts: dict[str, int]) -> dict[str, int]:
    """For each document, one past the last of its chunks stored from index `starts[doc]` on (that start
    when there are none). A write that crashed between a document's chunks and its marker leaves chunks
    its marker does not count; they are contiguous, as chunks are written in order, so probing upward
    finds them all: one point per document first, then growing windows for those that go on."""
    ends, probing, width = dict(starts), dict(starts), 1
    while probing:
        ids = {point_id(doc_id, index): (doc_id, index)
               for doc_id, start in probing.items() for index in range(start, start + width)}
        for found in store.retrieve_payloads(collection, list(ids), ["doc_id"]):
            doc_id, index = ids[found]
            ends[doc_id] = max(ends[doc_id], index + 1)
        probing = {doc_id: start + width for doc_id, start in probing.items() if ends[doc_id] == start + width}
        width = min(width * 16, 4096)
    return ends


def write_documents(store: QdrantStore, collection: str, points: Sequence, previous_chunks: dict[str, int]) -> int:
    """Write new chunks, delete leftovers of shorter new versions (also those of a longer version whose
    write crashed before its marker), then write markers; returns points deleted.

    A document indexed before first gets its new chunk 0 with an empty hash, counting the old chunks
    too: a write cut short then leaves no marker that matches either version (with the old marker
    kept, the old text back in the source was taken as unchanged over a mix of both versions), and a
    write that fails at once leaves the old version whole. One point more per changed document
    (bench/bench_rewrite.py), beside its embedding's cost."""
    from qdrant_client import models

    body = [p for p in points if p.payload["chunk_index"] != 0]
    markers = [p for p in points if p.payload["chunk_index"] == 0]
    new_counts = {marker.payload["doc_id"]: marker.payload["n_chunks"] for marker in markers}
    ends = stored_chunk_ends(store, collection, {doc_id: max(count, previous_chunks.get(doc_id, 0))
                                                 for doc_id, count in new_counts.items()})
    unmarked = [models.PointStruct(id=p.id, vector=p.vector, payload={**p.payload, "doc_hash": "", "n_chunks": ends[doc_id]})
                for p in markers if (doc_id := p.payload["doc_id"]) in previous_chunks]
    for part in _in_batches([*unmarked, *body]):
        store.upsert(collection, part)
    leftovers = [point_id(doc_id, index) for doc_id, count in new_counts.items() for index in range(count, ends[doc_id])]
    for part in _in_batches(leftovers):
        store.delete(collection, part)
    for part in _in_batches(markers):
        store.upsert(collection, part)
    return len(leftovers)


def write_chunks(
    store: QdrantStore, collection: str, chunks: Sequence[Chunk], vectors: np.ndarray | None, previous_chunks: dict[str, int],
    *, embedding_model: str, layout: VectorLayout, bm25: Bm25 | None,
) -> int:
    """Build the chunks' points and write them in the safe order; returns points deleted."""
    points = build_points(chunks, vectors, embedding_model=embedding_model, layout=layout, bm25=bm25)
    return write_documents(store, collection, points, previous_chunks)


def delete_missing_documents(store: QdrantStore, collection: str, keep_doc_ids: set[str]) -> int:
    """Delete every point whose document was not seen in this run; markers go first, so a deletion cut
    short leaves no marker over a partly deleted document (a later run would skip it as unchanged and
    never restore its chunks), then the other chunks from the last one down, so what it leaves of a
    document is chunks 1..k, which a later run's probe (`stored_chunk_ends`) finds whole; deleted in
    scroll order, the gaps hid the chunks past them for good. Returns points deleted."""
    stale = [(str(record.id), int(payload.get("chunk_index") or 0))
             for record in store.iter_points(collection, fields=["doc_id", "chunk_index"])
             if (payload := record.payload or {}).get("doc_id") not in keep_doc_ids]
    ordered = [pid for pid, _ in sorted(stale, key=lambda point: (point[1] != 0, -point[1]))]  # markers, then descending
    for part in _in_batches(ordered, 1000):
        store.delete(collection, part)
    return len(ordered)
