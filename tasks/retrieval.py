"""Retrieval inside Qdrant: dense, sparse (BM25) or hybrid (both prefetched, then fused), batched,
with optional payload filters, as ranked hits."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.embedding import Embedder, open_embedder
from tasks.errors import StoreError
from tasks.settings import RRF_K, EmbeddingBackend, FusionMethod, RetrievalMode, default_data_dir
from tasks.sparse import Bm25
from tasks.store import SPARSE, QdrantStore, VectorLayout

# Each branch of a hybrid query contributes at least this many candidates to the fusion.
MIN_PREFETCH = 100


class InvalidFilter(ValueError):
    """A question's filter is not a mapping of payload field to value(s)."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk, as it goes into a prompt and the answers file."""

    rank: int
    score: float
    point_id: str
    doc_id: str
    chunk_index: int
    text: str
    source: str
    title: str | None = None


# A payload field as Qdrant's filters name it: keys (plain, or quoted when they hold other characters)
# joined by dots, each optionally indexing an array (`tags[]`, `tags[0]`). The store refuses any other
# key for the whole batch of questions it came with.
_KEY = r'(?:[A-Za-z0-9_-]+|"[^"]+")(?:\[\d*\])*'
_FIELD_PATH = re.compile(rf"{_KEY}(?:\.{_KEY})*")


def build_filter(spec: dict[str, Any] | None):
    """`{"source": "a.md"}` or `{"source": ["a.md", "b.md"]}` -> a Qdrant filter that must match every field."""
    from qdrant_client import models

    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec:
        raise InvalidFilter(f"filter must be a non-empty object of payload field to value, got {spec!r}")
    conditions = []
    for key, value in spec.items():
        if not isinstance(key, str) or not _FIELD_PATH.fullmatch(key):
            raise InvalidFilter(f"{key!r} is not a payload field (like source or metadata.lang)")
        if isinstance(value, list) and value and (all(isinstance(v, str) for v in value)
                                                  or all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            conditions.append(models.FieldCondition(key=key, match=models.MatchAny(any=value)))
        elif isinstance(value, (str, int, bool)):
            conditions.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
        else:
            raise InvalidFilter(f"filter value for {key!r} must be a string, number, boolean, or a list of strings or of integers")
    return models.Filter(must=conditions)


@dataclass
class Retriever:
    """Queries one collection in one retrieval mode; texts in, ranked hits out."""

    collection: str
    mode: RetrievalMode
    layout: VectorLayout
    embedder: Embedder | None = None
    bm25: Bm25 | None = None
    fusion: FusionMethod = FusionMethod.rrf

    def requests(self, texts: Sequence[str], filters: Sequence[Any | None], *, top_k: int,
                 score_threshold: float | None = None) -> list[Any]:
        """One Query API request per text; hybrid prefetches max(top_k, 100) per branch and fuses them."""
        from qdrant_client import models

        dense = self.embedder.embed(list(texts), query=True) if self.mode != RetrievalMode.sparse else None
        sparse = [self.bm25.query(text) for text in texts] if self.mode != RetrievalMode.dense else None
        if self.mode == RetrievalMode.hybrid:
            fusion = (models.RrfQuery(rrf=models.Rrf(k=RRF_K)) if self.fusion == FusionMethod.rrf
                      else models.FusionQuery(fusion=models.Fusion.DBSF))
        requests = []
        for index, query_filter in enumerate(filters):
            branches = []
            if dense is not None:
                branches.append(dict(query=[float(x) for x in dense[index]], using=self.layout.dense_name))
            if sparse is not None:
                vector = models.SparseVector(indices=sparse[index].indices, values=sparse[index].values)
                branches.append(dict(query=vector, using=SPARSE))
            if len(branches) == 1:
                request = models.QueryRequest(**branches[0], filter=query_filter, limit=top_k,
                                              score_threshold=score_threshold, with_payload=True)
            else:
                prefetch = [models.Prefetch(**branch, filter=query_filter, limit=max(top_k, MIN_PREFETCH))
                            for branch in branches]
                request = models.QueryRequest(prefetch=prefetch, query=fusion, limit=top_k,
                                              score_threshold=score_threshold, with_payload=True)
            requests.append(request)
        return requests

    def search(self, store: QdrantStore, texts: Sequence[str], filters: Sequence[Any | None], *, top_k: int,
               score_threshold: float | None = None) -> list[list[Hit]]:
        """Top-k hits per text, ranked from 1, in one batched request."""
        if not texts:
            return []
        requests = self.requests(texts, filters, top_k=top_k, score_threshold=score_threshold)
        return [to_hits(points) for points in store.query_batch(self.collection, requests)]


def open_retriever(store: QdrantStore, collection: str, mode: RetrievalMode, *, fusion: FusionMethod = FusionMethod.rrf,
                   embed_batch_size: int = 64, backend: EmbeddingBackend = EmbeddingBackend.sentence_transformers,
                   data_dir: Path | None = None, gpu_share: float | None = None) -> Retriever:
    """A retriever for a ragbatch collection; one-line errors when it lacks the vectors `mode` needs.
    `gpu_share` is the vLLM embedding engine's share of a GPU (see `open_embedder`)."""
    metadata = store.readable_collection(collection)
    layout = VectorLayout.from_metadata(metadata)
    needs = {"dense": mode != RetrievalMode.sparse, "sparse": mode != RetrievalMode.dense}
    missing = [kind for kind, needed in needs.items() if needed and not getattr(layout, kind)]
    if missing:
        raise StoreError(
            f"collection {collection!r} has no {' or '.join(missing)} vectors, so it cannot serve {mode.value} retrieval; "
            f"use --retrieval {'sparse' if layout.sparse else 'dense'}, or re-ingest with --rebuild --retrieval {mode.value}"
        )
    embedder = None
    if mode != RetrievalMode.sparse:
        embedder = open_embedder(backend, model_name=metadata["embedding_model"], batch_size=embed_batch_size,
                                 data_dir=data_dir or default_data_dir(), gpu_share=gpu_share)
    bm25 = None
    if mode != RetrievalMode.dense:
        # Queries need only the analyzer; avgdl matters for documents alone.
        bm25 = Bm25(avgdl=float(metadata.get("bm25_avgdl", 1.0)), analyzer_version=int(metadata.get("bm25_analyzer", 1)))
    return Retriever(collection, mode, layout, embedder=embedder, bm25=bm25, fusion=fusion)


def to_hits(points: Sequence[Any]) -> list[Hit]:
    """Ranked hits; equal scores (exact RRF ties are common) ordered by document and chunk, since the
    engines break them differently, and the edge engine not even the same way on every open. Which
    of several tied points makes the top-k cut stays the engine's choice."""
    ordered = sorted(points, key=lambda p: (-float(p.score), p.payload["doc_id"], int(p.payload["chunk_index"])))
    return [
        Hit(
            rank=rank, score=float(point.score), point_id=str(point.id),
            doc_id=point.payload["doc_id"], chunk_index=int(point.payload["chunk_index"]),
            text=point.payload["text"], source=point.payload.get("source", ""), title=point.payload.get("title"),
        )
        for rank, point in enumerate(ordered, start=1)
    ]
