"""What an ingest run needs besides the per-batch steps: the target collection, counts, the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from tasks.chunking import Chunk
from tasks.errors import QuarantineThresholdExceeded, StoreError
from tasks.settings import RetrievalMode
from tasks.sparse import ANALYZER_VERSION, B, K1, Bm25, mean_length
from tasks.store import QdrantStore, VectorLayout, new_physical_name

INDEX_FORMAT = 1


class IngestReport(BaseModel):
    """What an ingest run did; the CLI prints it as JSON and the flow publishes it as an artifact."""

    collection: str
    physical_collection: str
    rebuild: bool
    loaded: int = 0
    valid: int = 0
    quarantined: int = 0
    unidentified: int = 0  # quarantined rows whose id could not be read; while any, nothing is deleted as missing
    unchanged: int = 0
    chunks: int = 0
    embedded: int = 0
    upserted: int = 0
    deleted: int = 0
    points: int = 0
    seconds: float = 0.0
    quarantine_path: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class Target:
    """Where a run writes: the alias users query, and the physical collection behind it."""

    alias: str
    collection: str
    replaces: str | None = None
    layout: VectorLayout = field(default_factory=VectorLayout)

    @property
    def is_rebuild(self) -> bool:
        return self.replaces is not None


LAYOUTS = {
    RetrievalMode.dense: VectorLayout(dense=True, sparse=False),
    RetrievalMode.sparse: VectorLayout(dense=False, sparse=True),
    RetrievalMode.hybrid: VectorLayout(dense=True, sparse=True),
}
BM25_AVGDL = "bm25_avgdl"
BM25_ANALYZER = "bm25_analyzer"  # absent from collections built before it was recorded: version 1


def layout_mode(layout: VectorLayout) -> RetrievalMode:
    return RetrievalMode.hybrid if layout.dense and layout.sparse else RetrievalMode.sparse if layout.sparse else RetrievalMode.dense


def collection_metadata(
    embedding_model: str, dimension: int, chunk_tokens: int, chunk_overlap: int, layout: VectorLayout = VectorLayout()
) -> dict:
    metadata = {
        "embedding_model": embedding_model,
        "dimension": dimension,
        "distance": "cosine",
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "ragbatch_index_format": INDEX_FORMAT,
    }
    if layout.sparse:
        metadata.update({"bm25_k1": K1, "bm25_b": B, BM25_ANALYZER: ANALYZER_VERSION})
    return metadata


def prepare_target(
    store: QdrantStore, alias: str, *, rebuild: bool, embedding_model: str, dimension: Callable[[], int],
    chunk_tokens: int, chunk_overlap: int, retrieval: RetrievalMode | None = None, shard_number: int | None = None,
    replication_factor: int | None = None,
) -> Target:
    """Reuse the collection behind `alias`, or create a new physical one (first run or rebuild).

    `retrieval` picks the vectors of a new collection (default hybrid); an existing collection keeps
    its own, and asking for others needs a rebuild. `dimension` gives the embedding model's vector
    size; it is called only for a new collection with dense vectors. `shard_number` and
    `replication_factor` place a new collection on a Qdrant cluster.
    """
    current = store.resolve(alias)
    if current is not None and not rebuild:
        metadata = store.collection_metadata(current)
        built_with = metadata.get("embedding_model")
        if built_with and built_with != embedding_model:
            raise StoreError(
                f"collection {alias!r} was built with embedding model {built_with!r}, not {embedding_model!r}; "
                "use --rebuild to re-embed with the new model"
            )
        layout = VectorLayout.from_metadata(metadata)
        if retrieval is not None and layout_mode(layout) != retrieval:
            raise StoreError(
                f"collection {alias!r} stores {layout_mode(layout).value} vectors, not {retrieval.value}; "
                f"use --rebuild to re-index it for {retrieval.value} retrieval"
            )
        return Target(alias, current, layout=layout)
    if current == alias:
        raise StoreError(f"{alias!r} is a plain collection, not a ragbatch alias; cannot rebuild it atomically")
    layout = LAYOUTS[retrieval or RetrievalMode.hybrid]
    size = dimension() if layout.dense else 0
    physical = new_physical_name(alias)
    store.create_collection(
        physical,
        dimension=size,
        metadata=collection_metadata(embedding_model, size, chunk_tokens, chunk_overlap, layout),
        layout=layout,
        shard_number=shard_number,
        replication_factor=replication_factor,
    )
    if current is None:
        store.move_alias(alias, physical)
        return Target(alias, physical, layout=layout)
    return Target(alias, physical, replaces=current, layout=layout)


def bm25_statistics(store: QdrantStore, collection: str, chunks: Sequence[Chunk]) -> Bm25:
    """The collection's BM25 parameters. avgdl is a collection statistic fixed when the first chunks
    are written (their mean length, recorded in the collection metadata before any sparse vector), so
    incremental runs never leave stored vectors computed with a different avgdl."""
    metadata = store.collection_metadata(collection)
    version = int(metadata.get(BM25_ANALYZER, 1))
    avgdl = metadata.get(BM25_AVGDL)
    if avgdl is None:
        avgdl = round(mean_length([chunk.sparse_text for chunk in chunks], version), 3)
        store.update_metadata(collection, {BM25_AVGDL: avgdl})
    return Bm25(avgdl=float(avgdl), k1=float(metadata.get("bm25_k1", K1)), b=float(metadata.get("bm25_b", B)),
                analyzer_version=version)


def finish_rebuild(store: QdrantStore, target: Target) -> list[str]:
    """Move the alias to the new collection in one step, then drop every older physical collection (the
    replaced one, abandoned ones); a newer one is a rebuild started after this one, still being written."""
    store.move_alias(target.alias, target.collection)
    dropped = [name for name in store.physical_collections(target.alias) if name < target.collection]
    for name in dropped:
        store.drop_collection(name)
    return dropped


def check_rebuild_complete(target: Target, unidentified: int, source: str, quarantine: Path) -> None:
    """Refuse to move the alias to a rebuild that lacks documents it cannot name: a row without a readable
    id may be a document the old collection holds, and the rebuild would drop it (an incremental run
    keeps it, deleting nothing)."""
    if target.is_rebuild and unidentified:
        raise QuarantineThresholdExceeded(
            f"{source}: {unidentified} quarantined rows have no readable id (listed in {quarantine}), so the rebuild "
            "may lack documents the index holds; the alias still points at the old collection; fix those rows and rebuild"
        )


def check_quarantine_share(loaded: int, quarantined: int, max_share: float, source: str, quarantine: Path) -> None:
    """Refuse to touch the index further when the source looks broken; the message names the file that
    says why, as a failed run prints no summary."""
    if loaded == 0:
        raise QuarantineThresholdExceeded(f"{source}: no documents found; nothing was changed in the index")
    share = quarantined / loaded
    if share > max_share:
        raise QuarantineThresholdExceeded(
            f"{source}: {quarantined} of {loaded} rows ({share:.0%}) failed validation, more than the allowed "
            f"{max_share:.0%}; no documents were deleted; the rows and reasons are in {quarantine}"
        )
