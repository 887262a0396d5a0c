"""The vector store: Qdrant through qdrant-client (server, embedded local mode or in-memory), or
qdrant-edge in-process (`edge:PATH`, see tasks/edge_store.py).

All client calls go through `QdrantStore`, which turns transport failures into `StoreUnavailable`
(retryable) and other failures into one-line `StoreError`s.
"""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import SecretStr

from tasks.errors import StoreError, StoreUnavailable, first_line

API_KEY_ENV = ("RAGBATCH_QDRANT_API_KEY", "QDRANT_API_KEY")
DENSE = "dense"
SPARSE = "sparse"
SCROLL_PAGE = 1000
PHYSICAL_SEPARATOR = "--"
MIN_SERVER_VERSION = (1, 16)  # collection metadata and `Rrf(k=...)` arrived in Qdrant 1.16


def qdrant_api_key() -> str | None:
    """The Qdrant API key from the environment (never a parameter, so it never reaches a log or form)."""
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def is_server(spec: str) -> bool:
    """Whether a store spec names a Qdrant server (rather than an in-process store)."""
    return spec.startswith(("http://", "https://"))


def require_server_version(location: str, version: str) -> None:
    """Refuse a Qdrant server older than MIN_SERVER_VERSION: an older one silently drops the collection
    metadata that records how the index was built, and lacks the RRF constant hybrid retrieval sets."""
    try:
        found = tuple(int(part) for part in version.split("-")[0].split(".")[:2])
    except ValueError:
        return  # a development build's version string; let the server answer for itself
    if found < MIN_SERVER_VERSION:
        needed = ".".join(map(str, MIN_SERVER_VERSION))
        raise StoreError(f"Qdrant at {location} is version {version}; ragbatch needs {needed} or newer "
                         "(collection metadata, RRF with k)")


def physical_names_of(alias: str, names: list[str]) -> list[str]:
    """Those of `names` that `new_physical_name(alias)` made, sorted (so by creation): `<alias>--`
    and a timestamp's digits and T, not another alias's that starts with `<alias>-` (`kb--1--…`, `kb---…`)."""
    pattern = re.compile(re.escape(alias + PHYSICAL_SEPARATOR) + r"[0-9T]+")
    return sorted(name for name in names if pattern.fullmatch(name))


def new_physical_name(alias: str) -> str:
    """A fresh physical collection name for an alias: `<alias>--<UTC timestamp>`."""
    return f"{alias}{PHYSICAL_SEPARATOR}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"


@dataclass(frozen=True)
class VectorLayout:
    """Which vectors a collection's points carry: named "dense" and/or "sparse" (BM25 with Qdrant's IDF).

    Collections from before named vectors hold one unnamed dense vector (`named=False`); their
    metadata has no "vectors" entry.
    """

    dense: bool = True
    sparse: bool = False
    named: bool = True

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "VectorLayout":
        if "vectors" not in metadata:
            return cls(dense=True, sparse=False, named=False)
        names = set(metadata["vectors"])
        return cls(dense=DENSE in names, sparse=SPARSE in names)

    @property
    def names(self) -> list[str]:
        return [name for name, present in ((DENSE, self.dense), (SPARSE, self.sparse)) if present]

    @property
    def dense_name(self) -> str | None:
        """The `using` of dense queries: None for the unnamed vector of older collections."""
        return DENSE if self.named else None

    def point_vector(self, dense: Any | None, sparse: Any | None) -> Any:
        """The `vector` of a PointStruct in this layout (without a sparse vector when `sparse` is None)."""
        if not self.named:
            return dense
        vector = {}
        if self.dense:
            vector[DENSE] = dense
        if self.sparse and sparse is not None:
            vector[SPARSE] = sparse
        return vector


@contextmanager
def _translate_errors(location: str, action: str, *, idempotent: bool = True) -> Iterator[None]:
    """Qdrant client errors -> one-line `StoreUnavailable` (worth retrying) or `StoreError` (final).

    Timeouts, rate limits (429 with Retry-After) and a busy or unreachable server are retryable; so is
    an internal error (500) of an `idempotent` action: a cluster reports a replica that is briefly not
    active, or a consensus that timed out, that way, and every read and point write can be repeated.
    An answer the client cannot read (a server of another version, or not Qdrant) is final.
    """
    import httpx
    from pydantic import ValidationError
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    try:
        yield
    except (ResponseHandlingException, httpx.TransportError) as exc:
        if isinstance(getattr(exc, "source", None), ValidationError):
            first = exc.source.errors()[0]
            raise StoreError(f"Qdrant at {location} answered {action} in a form this qdrant-client does not read "
                             f"(another version, or not a Qdrant server): {'.'.join(map(str, first['loc']))}: "
                             f"{first['msg']}") from None
        cause = exc.__cause__ or exc.__context__ or exc
        reason = str(getattr(exc, "source", None) or cause) or type(cause).__name__
        raise StoreUnavailable(f"cannot reach Qdrant at {location} ({action}): {reason}") from None
    except ResourceExhaustedResponse as exc:
        raise StoreUnavailable(f"Qdrant at {location} is rate-limiting {action} (retry after {exc.retry_after_s} s): "
                               f"{first_line(exc)}") from None
    except UnexpectedResponse as exc:
        message = f"Qdrant at {location} refused {action}: HTTP {exc.status_code} {exc.reason_phrase}"
        if exc.status_code in (408, 429, 502, 503, 504) or (exc.status_code == 500 and idempotent):
            raise StoreUnavailable(message) from None
        raise StoreError(message) from None
    except (ValueError, KeyError) as exc:  # local mode reports missing collections this way
        raise StoreError(f"Qdrant at {location}: {action} failed: {exc}") from None
    except sqlite3.Error as exc:  # local mode's storage: a full disk, a damaged file
        raise StoreError(f"Qdrant at {location}: {action} failed: {first_line(exc)} (its SQLite storage)") from None


class QdrantStore:
    """A Qdrant connection with the few operations the pipelines need."""

    def __init__(self, client, *, location: str, timeout: int = 60) -> None:
        self.client = client
        self.location = location
        self.timeout = timeout  # also the server's own time limit for collection operations (its default: 10 s)

    @classmethod
    def connect(cls, spec: str, *, timeout: int = 60, api_key: SecretStr | None = None) -> "QdrantStore":
        """Open `http(s)://host:port` (with `api_key`, else the one from the environment), `local:PATH`,
        `edge:PATH` (an `EdgeStore`, same operations) or `:memory:`."""
        from qdrant_client import QdrantClient

        if spec.startswith("edge:"):
            from tasks.edge_store import EdgeStore

            return EdgeStore.open(spec)

        if is_server(spec):
            key = api_key.get_secret_value() if api_key is not None else qdrant_api_key()
            try:
                client = QdrantClient(url=spec, api_key=key, timeout=timeout, check_compatibility=False)
            except ValueError as exc:  # a port out of range, say
                raise StoreError(f"--store {spec} is not a valid URL: {first_line(exc)}") from None
            return cls(client, location=spec, timeout=timeout)
        if spec == ":memory:":
            return cls(QdrantClient(location=":memory:"), location=spec)
        if spec.startswith("local:"):
            path = spec.removeprefix("local:")
            if not path:
                raise StoreError("--store local: needs a path, e.g. local:.ragbatch/qdrant")
            os.makedirs(path, exist_ok=True)
            try:
                client = QdrantClient(path=path)
            except RuntimeError as exc:
                if "already accessed" in str(exc):
                    raise StoreError(
                        f"the embedded store {path} is in use by another process; it allows one process at a time "
                        "(wait for the other run, or use a Qdrant server)"
                    ) from None
                raise
            except (ValueError, sqlite3.Error) as exc:  # a damaged meta.json or storage.sqlite
                raise StoreError(f"the embedded store {path} cannot be opened: {first_line(exc)}") from None
            return cls(client, location=spec)
        raise StoreError(f"unknown store {spec!r}: use http(s)://host:port, local:PATH, edge:PATH or :memory:")

    def close(self) -> None:
        self.client.close()

    # -- collections and aliases --------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """The physical collection behind alias `name`, `name` itself if it is a plain collection, or None."""
        with _translate_errors(self.location, "listing aliases"):
            for alias in self.client.get_aliases().aliases:
                if alias.alias_name == name:
                    return alias.collection_name
            return name if self.client.collection_exists(name) else None

    def physical_collections(self, alias: str) -> list[str]:
        """Physical collections ragbatch created for `alias` (current, previous or abandoned)."""
        with _translate_errors(self.location, "listing collections"):
            names = [c.name for c in self.client.get_collections().collections]
        return physical_names_of(alias, names)

    def create_collection(
        self, name: str, *, dimension: int, metadata: dict[str, Any], layout: VectorLayout = VectorLayout(),
        shard_number: int | None = None, replication_factor: int | None = None,
    ) -> None:
        """A collection with the layout's named vectors (dense: cosine of `dimension`; sparse: IDF
        modifier), its vector names recorded in the metadata, and payload indexes on doc_id and source.
        On a Qdrant cluster, `shard_number` and `replication_factor` place it over the nodes."""
        from qdrant_client import models

        dense = {DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)} if layout.dense else {}
        sparse = {SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)} if layout.sparse else None
        with _translate_errors(self.location, f"creating collection {name}", idempotent=False):
            if is_server(self.location):
                require_server_version(self.location, self.client.info().version)
            self.client.create_collection(
                name, vectors_config=dense, sparse_vectors_config=sparse, metadata={**metadata, "vectors": layout.names},
                shard_number=shard_number, replication_factor=replication_factor, timeout=self.timeout,
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Payload indexes have no effect")
                for field in ("doc_id", "source"):
                    self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD, timeout=self.timeout)

    def collection_metadata(self, name: str) -> dict[str, Any]:
        with _translate_errors(self.location, f"reading collection {name}"):
            return dict(self.client.get_collection(name).config.metadata or {})

    def update_metadata(self, name: str, metadata: dict[str, Any]) -> None:
        """Add or replace these metadata keys; the others stay."""
        with _translate_errors(self.location, f"updating collection {name}"):
            self.client.update_collection(name, metadata=metadata, timeout=self.timeout)

    def readable_collection(self, name: str) -> dict[str, Any]:
        """Metadata of a collection that exists and holds points; one-line errors otherwise."""
        if self.resolve(name) is None:
            raise StoreError(f"collection {name!r} does not exist in {self.location}; run `ragbatch ingest` first")
        if self.count(name) == 0:
            raise StoreError(f"collection {name!r} in {self.location} is empty; run `ragbatch ingest` first")
        metadata = self.collection_metadata(name)
        if "embedding_model" not in metadata:
            raise StoreError(f"collection {name!r} was not built by ragbatch (no embedding model recorded)")
        return metadata

    def count(self, name: str) -> int:
        with _translate_errors(self.location, f"counting {name}"):
            return self.client.count(name, exact=True).count

    def move_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` in one atomic aliases update."""
        from qdrant_client import models

        operations: list[Any] = []
        with _translate_errors(self.location, f"moving alias {alias}"):
            if any(a.alias_name == alias for a in self.client.get_aliases().aliases):
                operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            elif self.client.collection_exists(alias):
                raise StoreError(f"{alias!r} is a collection, not an alias; ragbatch cannot swap it atomically")
            operations.append(
                models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))
            )
            self.client.update_collection_aliases(change_aliases_operations=operations, timeout=self.timeout)

    def drop_collection(self, name: str) -> None:
        with _translate_errors(self.location, f"dropping collection {name}"):
            self.client.delete_collection(name, timeout=self.timeout)

    def optimize(self, collection: str) -> None:
        """Called once after the last write of an ingest; Qdrant servers index in the background and
        local mode has no index, so only the edge store has work to do here."""

    def filter_problem(self, query_filter: Any) -> str | None:
        """Why this store cannot apply `query_filter` as written, or None (a server and local mode can)."""
        return None

    # -- points -------------------------------------------------------------------------------------

    def retrieve_payloads(self, collection: str, ids: Sequence[str], fields: list[str]) -> dict[str, dict[str, Any]]:
        """Payload fields of the points that exist among `ids`, by point id."""
        if not ids:
            return {}
        with _translate_errors(self.location, f"reading points of {collection}"):
            records = self.client.retrieve(collection, list(ids), with_payload=fields, with_vectors=False)
        return {str(record.id): record.payload or {} for record in records}

    def upsert(self, collection: str, points: Sequence[Any]) -> None:
        if not points:
            return
        with _translate_errors(self.location, f"writing points to {collection}"):
            self.client.upsert(collection, points=list(points), wait=True)

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids:
            return
        with _translate_errors(self.location, f"deleting points from {collection}"):
            self.client.delete(collection, points_selector=models.PointIdsList(points=list(ids)), wait=True)

    def query_batch(self, collection: str, requests: Sequence[Any]) -> list[list[Any]]:
        """Run many Query API requests (`models.QueryRequest`) in one call; the points of each."""
        if not requests:
            return []
        with _translate_errors(self.location, f"querying {collection}"):
            responses = self.client.query_batch_points(collection, requests=requests)
        return [response.points for response in responses]

    def iter_payload_field(self, collection: str, field: str) -> Iterator[tuple[str, Any]]:
        """(point id, payload[field]) for every point, paging through the collection."""
        for record in self.iter_points(collection, fields=[field]):
            yield str(record.id), (record.payload or {}).get(field)

    def iter_points(self, collection: str, *, fields: list[str] | None = None, with_vectors: bool = False) -> Iterator[Any]:
        """Every point as a `models.Record` (payload: all or `fields`; named vectors if asked), page by page."""
        offset = None
        while True:
            with _translate_errors(self.location, f"scrolling {collection}"):
                records, offset = self.client.scroll(
                    collection, limit=SCROLL_PAGE, offset=offset, with_payload=fields if fields is not None else True,
                    with_vectors=with_vectors,
                )
            yield from records
            if offset is None:
                return
