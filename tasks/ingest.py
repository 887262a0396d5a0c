"""What an ingest run needs besides the per-batch steps: the target collection, counts, the report."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from tasks.embedding import Embedder
from tasks.errors import QuarantineThresholdExceeded, StoreError
from tasks.store import QdrantStore, new_physical_name

INDEX_FORMAT = 1


class IngestReport(BaseModel):
    """What an ingest run did; the CLI prints it as JSON and the flow publishes it as an artifact."""

    collection: str
    physical_collection: str
    rebuild: bool
    loaded: int = 0
    valid: int = 0
    quarantined: int = 0
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

    @property
    def is_rebuild(self) -> bool:
        return self.replaces is not None


def collection_metadata(embedding_model: str, dimension: int, chunk_tokens: int, chunk_overlap: int) -> dict:
    return {
        "embedding_model": embedding_model,
        "dimension": dimension,
        "distance": "cosine",
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "ragbatch_index_format": INDEX_FORMAT,
    }


def prepare_target(
    store: QdrantStore, alias: str, *, rebuild: bool, embedder: Embedder, chunk_tokens: int, chunk_overlap: int
) -> Target:
    """Reuse the collection behind `alias`, or create a new physical one (first run or rebuild)."""
    current = store.resolve(alias)
    if current is not None and not rebuild:
        built_with = store.collection_metadata(current).get("embedding_model")
        if built_with and built_with != embedder.model_name:
            raise StoreError(
                f"collection {alias!r} was built with embedding model {built_with!r}, not {embedder.model_name!r}; "
                "use --rebuild to re-embed with the new model"
            )
        return Target(alias, current)
    if current == alias:
        raise StoreError(f"{alias!r} is a plain collection, not a ragbatch alias; cannot rebuild it atomically")
    physical = new_physical_name(alias)
    store.create_collection(
        physical,
        dimension=embedder.dimension,
        metadata=collection_metadata(embedder.model_name, embedder.dimension, chunk_tokens, chunk_overlap),
    )
    if current is None:
        store.move_alias(alias, physical)
        return Target(alias, physical)
    return Target(alias, physical, replaces=current)


def finish_rebuild(store: QdrantStore, target: Target) -> list[str]:
    """Move the alias to the new collection in one step, then drop every older physical collection."""
    store.move_alias(target.alias, target.collection)
    dropped = [name for name in store.physical_collections(target.alias) if name != target.collection]
    for name in dropped:
        store.drop_collection(name)
    return dropped


def check_quarantine_share(loaded: int, quarantined: int, max_share: float, source: str) -> None:
    """Refuse to touch the index further when the source looks broken."""
    if loaded == 0:
        raise QuarantineThresholdExceeded(f"{source}: no documents found; nothing was changed in the index")
    share = quarantined / loaded
    if share > max_share:
        raise QuarantineThresholdExceeded(
            f"{source}: {quarantined} of {loaded} rows ({share:.0%}) failed validation, more than the allowed "
            f"{max_share:.0%}; no documents were deleted (see the quarantine file)"
        )
