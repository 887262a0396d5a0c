"""The ingest flow: load -> validate -> chunk -> embed -> upsert -> delete stale -> (rebuild) move alias."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks import steps
from tasks.chunking import TokenChunker, load_tokenizer
from tasks.embedding import SentenceTransformerEmbedder
from tasks.indexing import build_points, index_fingerprint
from tasks.ingest import IngestReport, check_quarantine_share, finish_rebuild, prepare_target
from tasks.models import resolve_embedding_model
from tasks.outputs import QuarantineWriter, run_file
from tasks.settings import IngestParams
from tasks.sources import batched, read_rows
from tasks.store import QdrantStore
from tasks.validation import DocumentValidator


@flow(name="ingest", description="Index a document collection into Qdrant, incrementally or as a full rebuild.")
def ingest(params: IngestParams) -> IngestReport:
    started = time.perf_counter()
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    rows = read_rows(params.source, params.format)  # fails here, before any store work, if the source is unusable
    store = QdrantStore.connect(params.store)
    try:
        embedder = SentenceTransformerEmbedder(
            model_name=params.embedding_model, device=params.device, batch_size=params.embed_batch_size
        )
        target = prepare_target(
            store, params.collection, rebuild=params.rebuild, embedder=embedder,
            chunk_tokens=params.chunk_tokens, chunk_overlap=params.chunk_overlap,
        )
        fingerprint = index_fingerprint(
            embedding_model=params.embedding_model, chunk_tokens=params.chunk_tokens, chunk_overlap=params.chunk_overlap
        )
        validator = DocumentValidator(max_chars=params.max_chars)
        chunker = _LazyChunker(params)
        report = IngestReport(collection=params.collection, physical_collection=target.collection,
                              rebuild=target.is_rebuild, run_id=run_id)
        present_doc_ids: set[str] = set()
        quarantine_path = run_file(params.data_dir, params.collection, run_id, "quarantine.parquet")
        with QuarantineWriter(quarantine_path, run_id=run_id) as quarantine:
            for batch in batched(_progress(rows, params.show_progress), params.batch_docs):
                present_doc_ids.update(row.doc_id for row in batch if row.doc_id is not None)
                valid, rejected = steps.validate(validator, batch)
                quarantine.write(rejected)
                plan = steps.find_changed(store, target.collection, valid, fingerprint)
                chunks = steps.chunk(chunker.get(), plan) if plan.changed else []
                vectors = steps.embed(embedder, chunks) if chunks else None
                points = build_points(chunks, vectors, embedding_model=params.embedding_model) if chunks else []
                deleted = steps.upsert(store, target.collection, points, plan.previous_chunks) if points else 0
                report.loaded += len(batch)
                report.valid += len(valid)
                report.quarantined += len(rejected)
                report.unchanged += plan.unchanged
                report.chunks += len(chunks)
                report.embedded += len(chunks)
                report.upserted += len(points)
                report.deleted += deleted
        report.quarantine_path = str(quarantine_path)
        create_markdown_artifact(validator.summary.to_markdown(params.max_chars), key=_key("validation", params.collection),
                                 description="Document validation")
        check_quarantine_share(report.loaded, report.quarantined, params.max_quarantined_share, str(params.source))
        report.deleted += steps.delete_missing(store, target.collection, present_doc_ids)
        if target.is_rebuild:
            dropped = finish_rebuild(store, target)
            logger.info("alias %s now points at %s; dropped %s", target.alias, target.collection, ", ".join(dropped))
        report.points = store.count(target.collection)
    finally:
        store.close()
    report.seconds = round(time.perf_counter() - started, 3)
    create_table_artifact([report.model_dump()], key=_key("ingest", params.collection), description="Ingest counts")
    logger.info("ingest finished: %s", report.model_dump_json())
    return report


class _LazyChunker:
    """Loads the tokenizer only when a batch has something to chunk, so no-op runs stay fast."""

    def __init__(self, params: IngestParams) -> None:
        self.params = params
        self._chunker: TokenChunker | None = None

    def get(self) -> TokenChunker:
        if self._chunker is None:
            self._chunker = TokenChunker(
                tokenizer=load_tokenizer(resolve_embedding_model(self.params.embedding_model)),
                chunk_tokens=self.params.chunk_tokens,
                overlap_tokens=self.params.chunk_overlap,
            )
        return self._chunker


def _progress(rows, enabled: bool):
    if not enabled:
        return rows
    from tqdm import tqdm

    return tqdm(rows, desc="ingest", unit="doc", dynamic_ncols=True)


def _key(kind: str, collection: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in collection.lower())
