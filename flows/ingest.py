"""The ingest flow: load -> validate -> chunk -> embed -> upsert -> delete stale -> (rebuild) move alias."""

from __future__ import annotations

import flows  # noqa: F401  the environment defaults, also when a Prefect worker loads this file as a script

import time
from collections.abc import Iterator
from functools import cache

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner

from tasks import steps
from tasks.child_process import end_descendants_with_this_process
from tasks.chunking import TokenChunker, load_tokenizer
from tasks.concurrency import exclusive
from tasks.indexing import index_fingerprint
from tasks.ingest import IngestReport, Target, check_quarantine_share, check_rebuild_complete, finish_rebuild, prepare_target
from tasks.locks import CollectionLock
from tasks.memory import fix_mmap_threshold
from tasks.models import embedding_prompts, embedding_text_limit, require_chunks_fit, resolve_embedding_model
from tasks.outputs import QuarantineWriter, artifact_key, run_file
from tasks.progress import RunProgress
from tasks.secrets import qdrant_api_key
from tasks.settings import IngestParams
from tasks.sharding import EmbedderSpec, ServerSpec, Shard, settled_results, split_shards, task_runner
from tasks.sources import SourceRow, batched, count_rows, read_rows
from tasks.sparse import Bm25
from tasks.store import QdrantStore, is_server
from tasks.validation import DocumentValidator


@flow(name="ingest", description="Index a document collection into Qdrant, incrementally or as a full rebuild.")
def ingest(params: IngestParams) -> IngestReport:
    started = time.perf_counter()
    end_descendants_with_this_process()  # Prefect's temporary API server outlived a killed run
    fix_mmap_threshold()  # batch-sized arrays go back to the OS when freed: memory stays flat over batches
    run_id = str(flow_run.get_id() or "local")
    # Fails here, before any store work, if the source is unusable or the chunks would not fit the model.
    rows = read_rows(params.source, params.format, max_chars=params.max_chars)
    require_chunks_fit(params.chunk_tokens, params.embedding_model)
    # Deployment runs queue for the collection; any second run in this data directory refuses.
    with (exclusive(params.store, params.collection, writes=True), CollectionLock(params.data_dir, params.collection),
          task_runner(params.task_runner, workers=params.shards, address=params.cluster_address,
                      api_url=str(get_client(sync_client=True).api_url), state_dir=params.data_dir) as runner):
        report = _index(params, rows, run_id, runner)
    report.seconds = round(time.perf_counter() - started, 3)
    create_table_artifact([report.model_dump()], key=artifact_key("ingest-counts", params.collection), description="Ingest counts")
    get_run_logger().info("ingest finished: %s", report.model_dump_json())
    return report


def _index(params: IngestParams, rows: Iterator[SourceRow], run_id: str, runner: TaskRunner) -> IngestReport:
    store = QdrantStore.connect(params.store, api_key=qdrant_api_key(params.qdrant_api_key_block))
    try:
        embedder = EmbedderSpec.of(params)
        target = prepare_target(
            store, params.collection, rebuild=params.rebuild, embedding_model=params.embedding_model,
            dimension=lambda: runner.submit(steps.embedding_dimension, dict(embedder=embedder)).result(),
            chunk_tokens=params.chunk_tokens, chunk_overlap=params.chunk_overlap, retrieval=params.retrieval,
            shard_number=params.shard_number, replication_factor=params.replication_factor,
        )
        bm25 = None
        fingerprint = index_fingerprint(
            embedding_model=params.embedding_model, chunk_tokens=params.chunk_tokens, chunk_overlap=params.chunk_overlap,
            document_prompt=embedding_prompts(resolve_embedding_model(params.embedding_model)).document,
        )
        validator = DocumentValidator(max_chars=params.max_chars)

        @cache
        def chunker() -> TokenChunker:
            """Loaded only when a batch has something to chunk, so no-op runs stay fast."""
            tokenizer = load_tokenizer(resolve_embedding_model(params.embedding_model))
            return TokenChunker(tokenizer=tokenizer, chunk_tokens=params.chunk_tokens, overlap_tokens=params.chunk_overlap,
                                model_tokens=embedding_text_limit(params.embedding_model))

        report = IngestReport(collection=params.collection, physical_collection=target.collection,
                              rebuild=target.is_rebuild, run_id=run_id)
        present_doc_ids: set[str] = set()
        quarantine_path = run_file(params.data_dir, params.collection, run_id, "quarantine.parquet")
        progress = RunProgress(key=artifact_key("ingest-progress", params.collection), label=f"ingest {params.collection}",
                               total=count_rows(params.source, params.format, max_chars=params.max_chars),
                               terminal=params.show_progress)
        batches = batched(rows, params.batch_docs)
        with QuarantineWriter(quarantine_path, run_id=run_id) as quarantine:
            while (batch := steps.load(batches)) is not None:
                present_doc_ids.update(row.doc_id for row in batch if row.doc_id is not None)
                valid, rejected = steps.validate(validator, batch)
                quarantine.write(rejected)
                report.unidentified += sum(row.doc_id is None for row in batch)
                check_rebuild_complete(target, report.unidentified, str(params.source), quarantine_path)  # before embedding this batch
                plan = steps.find_changed(store, target.collection, valid, fingerprint)
                chunks = steps.chunk(chunker(), plan) if plan.changed else []
                if chunks and target.layout.sparse and bm25 is None:
                    bm25 = steps.bm25_statistics(store, target.collection, chunks)
                shards = split_shards(chunks, plan.previous_chunks, params.shards)
                deleted = _embed_and_upsert(runner, params, store, target, shards, embedder, bm25)
                report.loaded += len(batch)
                report.valid += len(valid)
                report.quarantined += len(rejected)
                report.unchanged += plan.unchanged
                report.chunks += len(chunks)
                report.embedded += len(chunks) if target.layout.dense else 0
                report.upserted += len(chunks)
                report.deleted += deleted
                progress.advance(len(batch))
        progress.close()
        report.quarantine_path = str(quarantine_path)
        create_markdown_artifact(validator.summary.to_markdown(params.max_chars), key=artifact_key("ingest-validation", params.collection),
                                 description="Document validation")
        check_quarantine_share(report.loaded, report.quarantined, params.max_quarantined_share, str(params.source), quarantine_path)
        report.deleted += steps.delete_missing(store, target.collection, present_doc_ids, unidentified=report.unidentified)
        store.optimize(target.collection)
        if target.is_rebuild:
            dropped = finish_rebuild(store, target)
            get_run_logger().info("alias %s now points at %s; dropped %s", target.alias, target.collection, ", ".join(dropped))
        report.points = store.count(target.collection)
    finally:
        store.close()
    return report


def _embed_and_upsert(runner: TaskRunner, params: IngestParams, store: QdrantStore, target: Target, shards: list[Shard],
                      embedder: EmbedderSpec, bm25: Bm25 | None) -> int:
    """Run a batch's shards in parallel on the task runner; returns the points deleted. With a Qdrant
    server each shard embeds and writes; an embedded store is written here, shard by shard."""
    written = dict(embedding_model=params.embedding_model, layout=target.layout, bm25=bm25)
    if is_server(params.store):
        server = ServerSpec(params.store, qdrant_api_key(params.qdrant_api_key_block))
        futures = [runner.submit(steps.embed_upsert, dict(embedder=embedder, server=server, collection=target.collection,
                                                          shard=shard, **written)) for shard in shards]
        return sum(settled_results(futures))
    futures = [runner.submit(steps.embed, dict(embedder=embedder, chunks=shard.chunks)) if target.layout.dense else None
               for shard in shards]
    return sum(steps.upsert(store, target.collection, shard.chunks, future.result() if future else None,
                            shard.previous_chunks, **written) for shard, future in zip(shards, futures, strict=True))
