"""The vector store on qdrant-edge: Qdrant's Rust engine in-process (HNSW, payload indexes, WAL).

qdrant-client's embedded mode is exact search in pure Python; qdrant-edge runs the server's own
engine inside this process, so an embedded index stays fast past a few thousand points. An edge
shard is one collection; ragbatch keeps its collections and aliases on disk as

    PATH/aliases.json                     {"alias": "physical collection", ...}
    PATH/collections/<name>/ragbatch.json  the collection's metadata (it exists once the shard is complete)
    PATH/collections/<name>/shard/         the EdgeShard

The JSON files are replaced whole (`tasks.disk.write_whole`: a temporary file, then a rename), so an alias swap
is one rename. Callers keep using qdrant_client.models objects (PointStruct, QueryRequest, Filter):
this module translates them into qdrant_edge's look-alike classes and the results back.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import qdrant_edge as edge
from qdrant_client import models

from tasks.disk import MIN_FREE_BYTES, allocated_bytes, require_free_space, write_whole
from tasks.errors import RagbatchError, StoreError, first_line
from tasks.store import DENSE, SCROLL_PAGE, SPARSE, QdrantStore, VectorLayout, physical_names_of

ALIASES_FILE = "aliases.json"
METADATA_FILE = "ragbatch.json"
LOCK_FILE = ".lock"
# Where the engine builds a collection's new segments while optimizing (qdrant's TEMP_SEGMENTS_PATH).
OPTIMIZER_SCRATCH = "temp_segments"
# Payload fields with a keyword index, as the qdrant-client backend creates them.
INDEXED_FIELDS = ("doc_id", "source")
# Qdrant's default k when a FusionQuery asks for RRF without parameters.
DEFAULT_RRF_K = 2
COLLECTION_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A Qdrant server flushes its segments every 5 s (storage.optimizers.flush_interval_sec); an edge shard
# has no background flusher, so writes flush at the server's pace. Durability does not depend on it (the
# WAL has every acknowledged write), but recovery time does, because opening a shard replays the WAL
# past its last flush (12.4 s after a crashed load of 300k never-flushed points, 0.5 s with flushes).
FLUSH_INTERVAL_S = 5.0


@contextmanager
def _translate_errors(location: str, action: str) -> Iterator[None]:
    """qdrant_edge raises bare `Exception`s: turn them into one-line `StoreError`s."""
    try:
        yield
    except RagbatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - qdrant_edge has no exception classes of its own
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"Qdrant edge at {location}: {action} failed: {reason}") from None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda temporary: temporary.write_text(json.dumps(data, sort_keys=True), encoding="utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # damaged, or cut short by a full disk before the store wrote files whole
        raise StoreError(f"{path}: not valid JSON ({first_line(exc)}); the edge store cannot read it") from None


# -- translation of qdrant_client.models into qdrant_edge -----------------------------------------


def _edge_vector(vector: Any) -> Any:
    """A dense list (passed through uncopied: this runs once per point), a sparse vector, or a dict of named ones."""
    if isinstance(vector, list):
        return vector
    if isinstance(vector, dict):
        return {name: _edge_vector(value) for name, value in vector.items()}
    if isinstance(vector, models.SparseVector):
        return edge.SparseVector(indices=vector.indices, values=vector.values)
    return vector.tolist() if hasattr(vector, "tolist") else list(vector)


def edge_point(point: Any) -> Any:
    """`models.PointStruct` -> `qdrant_edge.Point`."""
    return edge.Point(point.id, _edge_vector(point.vector), point.payload)


def _matchable(values: list[Any]) -> list[Any]:
    """Filter values qdrant-edge 0.9.0 can match: its binding takes 64-bit integers only (a larger one
    was a TypeError, failing every question retrieved beside it), and no booleans."""
    for value in values:
        if isinstance(value, bool):
            raise StoreError("qdrant-edge 0.9.0 cannot match a boolean (it would match the integer 1 or 0); "
                             "use a Qdrant server or --store local:PATH for boolean filters")
        if isinstance(value, int) and not -2**63 <= value < 2**63:
            raise StoreError(f"qdrant-edge cannot match {value}, an integer beyond 64 bits")
    return values


def _edge_condition(condition: Any) -> Any:
    if isinstance(condition, models.Filter):
        return edge_filter(condition)
    if isinstance(condition, models.FieldCondition) and isinstance(condition.match, models.MatchValue):
        [value] = _matchable([condition.match.value])
        return edge.FieldCondition(key=condition.key, match=edge.MatchValue(value))
    if isinstance(condition, models.FieldCondition) and isinstance(condition.match, models.MatchAny):
        return edge.FieldCondition(key=condition.key, match=edge.MatchAny(any=_matchable(list(condition.match.any))))
    raise StoreError(f"the edge store supports match-value and match-any filters only, not {condition!r}")


def edge_filter(query_filter: Any | None) -> Any | None:
    """`models.Filter` of must/should/must_not field matches -> `qdrant_edge.Filter`."""
    if query_filter is None:
        return None

    def conditions(value: Any) -> list[Any] | None:
        if value is None:
            return None
        return [_edge_condition(c) for c in (value if isinstance(value, list) else [value])]

    return edge.Filter(must=conditions(query_filter.must), should=conditions(query_filter.should),
                       must_not=conditions(query_filter.must_not))


def _edge_query(query: Any, using: str | None) -> Any:
    """A nearest-vector query, or a fusion of the prefetches (RRF with its k, or DBSF)."""
    if query is None:
        return None
    if isinstance(query, models.RrfQuery):
        return edge.Fusion.Rrf(k=query.rrf.k if query.rrf.k is not None else DEFAULT_RRF_K, weights=query.rrf.weights)
    if isinstance(query, models.FusionQuery):
        return edge.Fusion.Dbsf() if query.fusion == models.Fusion.DBSF else edge.Fusion.Rrf(k=DEFAULT_RRF_K)
    if isinstance(query, models.NearestQuery):
        query = query.nearest
    if isinstance(query, (list, models.SparseVector)):
        return edge.Query.Nearest(_edge_vector(query), using=using)
    raise StoreError(f"the edge store supports nearest-vector and fusion queries only, not {type(query).__name__}")


def _edge_payload_selector(with_payload: Any) -> Any:
    if isinstance(with_payload, (list, tuple)):
        return edge.PayloadSelector.Include(list(with_payload))
    return bool(with_payload)


def _edge_prefetch(prefetch: Any) -> Any:
    return edge.Prefetch(limit=prefetch.limit if prefetch.limit is not None else 10,
                         query=_edge_query(prefetch.query, prefetch.using), prefetches=_edge_prefetches(prefetch.prefetch),
                         filter=edge_filter(prefetch.filter), score_threshold=prefetch.score_threshold)


def _edge_prefetches(prefetch: Any) -> list[Any] | None:
    if prefetch is None:
        return None
    return [_edge_prefetch(p) for p in (prefetch if isinstance(prefetch, list) else [prefetch])]


def edge_query_request(request: Any) -> Any:
    """`models.QueryRequest` -> `qdrant_edge.QueryRequest` (vectors, prefetch, fusion, filter, threshold)."""
    return edge.QueryRequest(
        limit=request.limit if request.limit is not None else 10, offset=request.offset,
        query=_edge_query(request.query, request.using), prefetches=_edge_prefetches(request.prefetch),
        filter=edge_filter(request.filter), score_threshold=request.score_threshold,
        with_payload=_edge_payload_selector(request.with_payload), with_vector=False,
    )


def _client_id(point_id: Any) -> str | int:
    """Point ids as qdrant-client returns them: UUID strings or integers."""
    return point_id if isinstance(point_id, int) else str(point_id)


def client_scored_point(point: Any) -> Any:
    """`qdrant_edge.ScoredPoint` -> `models.ScoredPoint` (id, score, payload)."""
    return models.ScoredPoint(id=_client_id(point.id), version=point.version, score=point.score, payload=point.payload)


def _client_vector(vector: Any) -> Any:
    if isinstance(vector, dict):
        return {name: _client_vector(value) for name, value in vector.items()}
    if hasattr(vector, "indices"):
        return models.SparseVector(indices=list(vector.indices), values=list(vector.values))
    return vector


def client_record(record: Any) -> Any:
    """`qdrant_edge.Record` -> `models.Record` (ids as qdrant-client gives them, sparse vectors as models)."""
    vector = _client_vector(record.vector) if record.vector is not None else None
    return models.Record(id=_client_id(record.id), payload=record.payload, vector=vector)


# -- the store ---------------------------------------------------------------------------------------


class EdgeStore(QdrantStore):
    """`QdrantStore`'s operations on qdrant-edge shards under one directory, for one process at a time."""

    def __init__(self, root: Path, *, location: str, flush_interval_s: float = FLUSH_INTERVAL_S,
                 min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.root = root
        self.location = location
        self.flush_interval_s = flush_interval_s
        self.min_free_bytes = min_free_bytes
        self._shards: dict[str, Any] = {}
        self._flushed_at: dict[str, float] = {}
        self._lock = self._acquire_lock()
        self._remove_incomplete_collections()

    @classmethod
    def open(cls, spec: str, *, flush_interval_s: float = FLUSH_INTERVAL_S) -> "EdgeStore":
        """Open `edge:PATH`, creating the directory on first use. Writes are refused while its disk has
        less than `MIN_FREE_BYTES` free (tasks/disk.py: a full disk would kill the process)."""
        path = spec.removeprefix("edge:")
        if not path:
            raise StoreError("--store edge: needs a path, e.g. edge:.ragbatch/edge")
        root = Path(path)
        (root / "collections").mkdir(parents=True, exist_ok=True)
        return cls(root, location=spec, flush_interval_s=flush_interval_s)

    def _acquire_lock(self) -> Any:
        """Hold an exclusive lock on PATH/.lock while open: each shard's WAL admits one process,
        and the aliases file must have a single writer."""
        file = open(self.root / LOCK_FILE, "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise StoreError(
                f"the embedded store {self.root} is in use by another process; it allows one process at a time "
                "(wait for the other run, or use a Qdrant server)"
            ) from None
        return file

    def _remove_incomplete_collections(self) -> None:
        """Delete what crashed creations left: a collection's metadata file is written last, and the lock
        held here means no creation is under way, so a directory without one is never going to be used."""
        for directory in (self.root / "collections").iterdir():
            if directory.is_dir() and not (directory / METADATA_FILE).exists():
                shutil.rmtree(directory)

    def close(self) -> None:
        if self._lock.closed:
            return
        for name in list(self._shards):
            self._close_shard(name)
        self._lock.close()

    # -- files --------------------------------------------------------------------------------------

    def _require_room(self, action: str, *, also: int = 0) -> None:
        """Refuse a write unless the disk keeps `min_free_bytes` free, plus `also` bytes it will need."""
        require_free_space(self.root, self.min_free_bytes + also, f"Qdrant edge at {self.location}: {action}")

    def _collection_dir(self, name: str) -> Path:
        if not COLLECTION_NAME.fullmatch(name) or name in (".", ".."):
            raise StoreError(f"invalid collection name {name!r}: use letters, digits, '_', '.' and '-'")
        return self.root / "collections" / name

    def _aliases(self) -> dict[str, str]:
        path = self.root / ALIASES_FILE
        return _read_json(path) if path.exists() else {}

    def _exists(self, name: str) -> bool:
        return (self._collection_dir(name) / METADATA_FILE).exists()

    def _physical(self, name: str) -> str:
        """The collection behind alias or collection `name`; one-line error when there is none."""
        physical = self.resolve(name)
        if physical is None:
            raise StoreError(f"Qdrant edge at {self.location}: collection {name!r} not found")
        return physical

    def _shard(self, name: str) -> Any:
        """The open shard of collection or alias `name` (opened once, kept until close or drop).

        Before opening, the optimizer's scratch goes: an optimize killed part-way (the HNSW build of
        a large ingest takes minutes) leaves a half-built copy of the collection there, which
        qdrant-edge 0.9 neither loads nor removes, even on the next optimize. With the store's lock
        held and the shard not yet open, no optimization can be using it."""
        physical = self._physical(name)
        if physical not in self._shards:
            shard_dir = self._collection_dir(physical) / "shard"
            shutil.rmtree(shard_dir / OPTIMIZER_SCRATCH, ignore_errors=True)
            with _translate_errors(self.location, f"opening collection {physical}"):
                self._shards[physical] = edge.EdgeShard.load(str(shard_dir))
        return self._shards[physical]

    def _close_shard(self, physical: str) -> None:
        self._flushed_at.pop(physical, None)
        shard = self._shards.pop(physical, None)
        if shard is not None:
            with _translate_errors(self.location, f"closing collection {physical}"):
                shard.close()

    # -- collections and aliases --------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        aliases = self._aliases()
        if name in aliases:
            return aliases[name]
        return name if self._exists(name) else None

    def physical_collections(self, alias: str) -> list[str]:
        names = [path.parent.name for path in (self.root / "collections").glob(f"*/{METADATA_FILE}")]
        return physical_names_of(alias, names)

    def create_collection(
        self, name: str, *, dimension: int, metadata: dict[str, Any], layout: VectorLayout = VectorLayout(),
        shard_number: int | None = None, replication_factor: int | None = None,
    ) -> None:
        """A shard with the layout's named vectors and keyword indexes on doc_id and source; the
        metadata file is written last, so a half-created collection does not exist. One shard in this
        process: `shard_number` and `replication_factor` (refused by IngestParams) do not apply."""
        directory = self._collection_dir(name)
        if self._exists(name) or name in self._aliases():
            raise StoreError(f"Qdrant edge at {self.location}: collection {name!r} already exists")
        dense = {DENSE: edge.EdgeVectorParams(size=dimension, distance=edge.Distance.Cosine)} if layout.dense else None
        sparse = {SPARSE: edge.EdgeSparseVectorParams(modifier=edge.Modifier.Idf)} if layout.sparse else None
        shutil.rmtree(directory, ignore_errors=True)  # what a failed creation of this name left in this session
        self._require_room(f"creating collection {name}")
        with _translate_errors(self.location, f"creating collection {name}"):
            shard = edge.EdgeShard.create(str(directory / "shard"), edge.EdgeConfig(vectors=dense, sparse_vectors=sparse))
            self._shards[name] = shard
            for field in INDEXED_FIELDS:
                shard.update(edge.UpdateOperation.create_field_index(field, edge.PayloadSchemaType.Keyword))
        _write_json(directory / METADATA_FILE, {**metadata, "vectors": layout.names})

    def collection_metadata(self, name: str) -> dict[str, Any]:
        return _read_json(self._collection_dir(self._physical(name)) / METADATA_FILE)

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        physical = self._physical(name)
        _write_json(self._collection_dir(physical) / METADATA_FILE, {**self.collection_metadata(physical), **metadata})

    def count(self, name: str) -> int:
        shard = self._shard(name)
        with _translate_errors(self.location, f"counting {name}"):
            return shard.count(edge.CountRequest(exact=True))

    def move_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` by replacing the aliases file in one rename."""
        aliases = self._aliases()
        if alias not in aliases and self._exists(alias):
            raise StoreError(f"{alias!r} is a collection, not an alias; ragbatch cannot swap it atomically")
        if not self._exists(collection):
            raise StoreError(f"Qdrant edge at {self.location}: collection {collection!r} not found")
        _write_json(self.root / ALIASES_FILE, {**aliases, alias: collection})

    def drop_collection(self, name: str) -> None:
        """Delete a physical collection and the aliases that point at it (as Qdrant does); a missing
        collection is no error, as with Qdrant."""
        if not self._exists(name):
            return
        aliases = self._aliases()
        remaining = {alias: target for alias, target in aliases.items() if target != name}
        if remaining != aliases:
            _write_json(self.root / ALIASES_FILE, remaining)
        self._close_shard(name)
        directory = self._collection_dir(name)
        (directory / METADATA_FILE).unlink()  # from here on the collection does not exist
        shutil.rmtree(directory)

    def optimize(self, collection: str) -> None:
        """Build the HNSW and payload indexes after a bulk load; queries before that are brute force.
        Optimizing writes the collection's segments anew before it drops the old ones, so it needs as much
        free space again as the collection takes."""
        physical = self._physical(collection)
        self._require_room(f"optimizing {collection}", also=allocated_bytes(self._collection_dir(physical)))
        shard = self._shard(physical)
        with _translate_errors(self.location, f"optimizing {collection}"):
            shard.optimize()

    # -- points -------------------------------------------------------------------------------------

    def retrieve_payloads(self, collection: str, ids: Sequence[str], fields: list[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        shard = self._shard(collection)
        with _translate_errors(self.location, f"reading points of {collection}"):
            records = shard.retrieve(list(ids), edge.PayloadSelector.Include(fields), False)
        return {str(record.id): record.payload or {} for record in records}

    def _update(self, collection: str, action: str, operation: Callable[[], Any]) -> None:
        """Build and apply one write; flush the shard when `flush_interval_s` has passed since its last flush."""
        physical = self._physical(collection)
        shard = self._shard(physical)
        self._require_room(f"{action} {collection}")
        with _translate_errors(self.location, f"{action} {collection}"):
            shard.update(operation())
            now = time.monotonic()
            if now - self._flushed_at.setdefault(physical, now) >= self.flush_interval_s:
                shard.flush()
                self._flushed_at[physical] = time.monotonic()

    def upsert(self, collection: str, points: Sequence[Any]) -> None:
        if points:
            self._update(collection, "writing points to",
                         lambda: edge.UpdateOperation.upsert_points([edge_point(point) for point in points]))

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._update(collection, "deleting points from", lambda: edge.UpdateOperation.delete_points(list(ids)))

    def filter_problem(self, query_filter: Any) -> str | None:
        """Why the filter does not translate into qdrant_edge's (a boolean match, say), or None."""
        try:
            edge_filter(query_filter)
        except StoreError as exc:
            return str(exc)
        return None

    def query_batch(self, collection: str, requests: Sequence[Any]) -> list[list[Any]]:
        """Run `models.QueryRequest`s on the shard; the points of each as `models.ScoredPoint`s."""
        if not requests:
            return []
        shard = self._shard(collection)
        with _translate_errors(self.location, f"querying {collection}"):
            batch = edge.QueryBatchRequest([edge_query_request(request) for request in requests])
            responses = shard.query_batch(batch)
        return [[client_scored_point(point) for point in points] for points in responses]

    def iter_points(self, collection: str, *, fields: list[str] | None = None, with_vectors: bool = False) -> Iterator[Any]:
        shard = self._shard(collection)
        payload = edge.PayloadSelector.Include(fields) if fields is not None else True
        offset = None
        while True:
            with _translate_errors(self.location, f"scrolling {collection}"):
                records, offset = shard.scroll(
                    edge.ScrollRequest(offset=offset, limit=SCROLL_PAGE, with_payload=payload, with_vector=with_vectors)
                )
            for record in records:
                yield client_record(record)
            if offset is None:
                return
