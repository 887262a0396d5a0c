"""Prefect task wrappers around the pipeline steps: names for the UI, retries, logging. No logic here.

Inputs are live objects (store, models) and large batches, so input hashing and result caching are
off; the incremental index itself is what makes re-runs cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import evaluation, indexing, ingest
from tasks.answering import Pending, build_prompts, generate_part, retrieve_part
from tasks.chunking import Chunk, TokenChunker
from tasks.evaluation import EvalQuery
from tasks.errors import StoreUnavailable
from tasks.llm import Generator, SamplingConfig
from tasks.outputs import AnswerCheckpoint
from tasks.prompts import PromptBuilder
from tasks.retrieval import Retriever
from tasks.sharding import EmbedderSpec, ServerSpec, Shard
from tasks.sources import SourceRow
from tasks.sparse import Bm25
from tasks.store import QdrantStore, VectorLayout
from tasks.validation import DocumentValidator, QuarantinedRow


def _store_unavailable(task, task_run, state) -> bool:
    """Retry only when the store could not be reached; other failures are final."""
    return isinstance(state.result(raise_on_failure=False), StoreUnavailable)


STORE_RETRIES = dict(retries=4, retry_delay_seconds=[1, 2, 4, 8], retry_condition_fn=_store_unavailable)
STEP = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="load", **STEP)
def load(batches: Iterator[list[SourceRow]]) -> list[SourceRow] | None:
    """The next batch of source rows (reading happens here, streamed); None when the source is done."""
    return next(batches, None)


@task(name="validate", **STEP)
def validate(validator: DocumentValidator, rows: list[SourceRow]) -> tuple[list[SourceRow], list[QuarantinedRow]]:
    valid, quarantined = validator.validate(rows)
    _log_quarantined(quarantined)
    return valid, quarantined


@task(name="load-dataset", **STEP)
def load_dataset(path: Path, split: str, *, max_chars: int) -> tuple[list[EvalQuery], list[QuarantinedRow]]:
    queries, quarantined = evaluation.load_dataset(path, split, max_chars=max_chars)
    _log_quarantined(quarantined)
    return queries, quarantined


def _log_quarantined(rows: list[QuarantinedRow]) -> None:
    logger = get_run_logger()
    for row in rows[:20]:
        logger.warning("quarantined %s: %s", row.locator, row.reason)


@task(name="find-changed", **STEP, **STORE_RETRIES)
def find_changed(store: QdrantStore, collection: str, rows: list[SourceRow], fingerprint: str) -> indexing.BatchPlan:
    markers = indexing.read_markers(store, collection, [row.doc_id for row in rows])
    return indexing.plan_batch(rows, markers, fingerprint)


@task(name="chunk", **STEP)
def chunk(chunker: TokenChunker, plan: indexing.BatchPlan) -> list[Chunk]:
    return chunker.chunk(plan.changed)


@task(name="embedding-dimension", **STEP)
def embedding_dimension(embedder: EmbedderSpec) -> int:
    """The model's vector size for a new collection, measured where the shards embed: a cluster's
    worker, so the flow's process does not load a model (or need the workers' device) for it."""
    return embedder.open().dimension


@task(name="embed", **STEP)
def embed(embedder: EmbedderSpec, chunks: Sequence[Chunk]) -> np.ndarray:
    """Runs on the shard task runner (a thread or a worker process), which opens the model once."""
    return embedder.open().embed([c.embedding_text for c in chunks])


@task(name="embed-upsert", **STEP, **STORE_RETRIES)
def embed_upsert(embedder: EmbedderSpec, server: ServerSpec, collection: str, shard: Shard, *, embedding_model: str,
                 layout: VectorLayout, bm25: Bm25 | None) -> int:
    """A shard for a Qdrant server, done wholly where it runs: embed, build the points, write them."""
    vectors = embed.fn(embedder, shard.chunks) if layout.dense else None
    return indexing.write_chunks(server.open(), collection, shard.chunks, vectors, shard.previous_chunks,
                                 embedding_model=embedding_model, layout=layout, bm25=bm25)


@task(name="bm25-statistics", **STEP, **STORE_RETRIES)
def bm25_statistics(store: QdrantStore, collection: str, chunks: list[Chunk]) -> Bm25:
    return ingest.bm25_statistics(store, collection, chunks)


@task(name="upsert", **STEP, **STORE_RETRIES)
def upsert(store: QdrantStore, collection: str, chunks: list[Chunk], vectors: np.ndarray | None, previous_chunks: dict[str, int],
           *, embedding_model: str, layout: VectorLayout, bm25: Bm25 | None) -> int:
    """Points (with their sparse vectors) are built here, not passed in: Prefect inspects task inputs,
    and walking thousands of 384-float vectors in PointStructs cost about a second per batch."""
    return indexing.write_chunks(store, collection, chunks, vectors, previous_chunks,
                                 embedding_model=embedding_model, layout=layout, bm25=bm25)


@task(name="delete-missing", **STEP, **STORE_RETRIES)
def delete_missing(store: QdrantStore, collection: str, present_doc_ids: set[str], *, unidentified: int) -> int:
    """Deletes nothing while rows without a readable id were quarantined: any missing document may be
    one of them (a broken JSON line), and deleting it would lose data that a fixed row keeps."""
    if unidentified:
        get_run_logger().warning("deleted nothing: %d quarantined rows have no readable id, so documents missing from "
                                 "this run may be among them; fix those rows to let deletions through", unidentified)
        return 0
    deleted = indexing.delete_missing_documents(store, collection, present_doc_ids)
    get_run_logger().info("deleted %d points of documents no longer in the source", deleted)
    return deleted


@task(name="retrieve", **STEP, **STORE_RETRIES)
def retrieve(part: list[Pending], store: QdrantStore, retriever: Retriever, *, top_k: int,
             score_threshold: float | None) -> None:
    retrieve_part(part, store, retriever, top_k=top_k, score_threshold=score_threshold)


@task(name="build-prompts", **STEP)
def prompts(part: list[Pending], builder: PromptBuilder) -> None:
    build_prompts(part, builder)
    dropped = sum(item.prompt.dropped for item in part if item.prompt)
    if dropped:
        get_run_logger().info("dropped %d lowest-ranked passages to fit the context", dropped)


@task(name="generate", **STEP)
def generate(part: list[Pending], generator: Generator, sampling: SamplingConfig) -> None:
    generate_part(part, generator, sampling)


@task(name="write", **STEP)
def write(checkpoint: AnswerCheckpoint, rows: list[dict]) -> None:
    """Checkpoint a part of answer rows (atomically), so a re-run skips these questions."""
    checkpoint.write_part(rows)


@task(name="rank-documents", **STEP, **STORE_RETRIES)
def rank_documents(queries: list[EvalQuery], store: QdrantStore, retriever: Retriever, *, depth: int,
                   filters: dict[str, Any]) -> dict[str, list[str]]:
    def search(pending: list[EvalQuery], top_k: int) -> list[list[str]]:
        hits = retriever.search(store, [query.text for query in pending], [filters[query.id] for query in pending], top_k=top_k)
        return [[hit.doc_id for hit in query_hits] for query_hits in hits]

    return evaluation.document_rankings(queries, search, depth=depth)
