"""Retrieval: batched nearest-neighbour queries with optional payload filters, as ranked hits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.store import QdrantStore


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


def build_filter(spec: dict[str, Any] | None):
    """`{"source": "a.md"}` or `{"source": ["a.md", "b.md"]}` -> a Qdrant filter that must match every field."""
    from qdrant_client import models

    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec:
        raise InvalidFilter(f"filter must be a non-empty object of payload field to value, got {spec!r}")
    conditions = []
    for key, value in spec.items():
        if isinstance(value, list) and value and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            conditions.append(models.FieldCondition(key=key, match=models.MatchAny(any=value)))
        elif isinstance(value, (str, int, bool)):
            conditions.append(models.FieldCondition(key=key, match=models.MatchValue(value=value)))
        else:
            raise InvalidFilter(f"filter value for {key!r} must be a string, number, boolean or a list of them")
    return models.Filter(must=conditions)


def retrieve(
    store: QdrantStore, collection: str, vectors: np.ndarray, filters: Sequence[Any | None], *,
    top_k: int, score_threshold: float | None = None,
) -> list[list[Hit]]:
    """Top-k hits per query vector, ranked from 1, in one batched request."""
    results = store.query_batch(collection, vectors, limit=top_k, filters=filters, score_threshold=score_threshold)
    return [
        [
            Hit(
                rank=rank, score=float(point.score), point_id=str(point.id),
                doc_id=point.payload["doc_id"], chunk_index=int(point.payload["chunk_index"]),
                text=point.payload["text"], source=point.payload.get("source", ""), title=point.payload.get("title"),
            )
            for rank, point in enumerate(points, start=1)
        ]
        for points in results
    ]
