import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.errors import StoreError, StoreUnavailable
from qdrant_client import models

from tasks.store import QdrantStore, VectorLayout


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_a_retryable_one_line_error():
    store = QdrantStore.connect(f"http://127.0.0.1:{closed_port()}", timeout=2)
    with pytest.raises(StoreUnavailable) as error:
        store.resolve("docs")
    message = str(error.value)
    assert message.startswith("cannot reach Qdrant at http://127.0.0.1:") and "\n" not in message


class StubQdrant:
    """A loopback HTTP server answering each (method, path) with a canned status, headers and body, to
    put the store's handling of a Qdrant server's failure answers to the test; it records what it got."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, dict[str, str], dict]]) -> None:
        self.requests: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                stub.requests.append(f"{self.command} {self.path}")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body = answers.get((self.command, self.path.split("?")[0]), (404, {}, {}))
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StubQdrant":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def failure(message: str) -> dict:
    return {"status": {"error": message}, "time": 0.0}


def version(number: str) -> tuple[int, dict, dict]:
    return 200, {}, {"title": "qdrant - vector search engine", "version": number}


def test_a_rate_limited_or_briefly_failing_server_is_retryable_and_a_refusal_or_an_unreadable_answer_final():
    points = [models.PointStruct(id=1, vector={"dense": [0.1, 0.2]}, payload={})]
    with StubQdrant({
        ("GET", "/aliases"): (429, {"Retry-After": "3"}, failure("Too many requests")),
        ("PUT", "/collections/kb/points"): (500, {}, failure("Failed to apply operation to at least one `Active` replica. Please retry")),
        ("POST", "/collections/kb/points/delete"): (400, {}, failure("Bad request: wrong input")),
        ("POST", "/collections/kb/points/count"): (200, {}, {"result": {"points": "many"}, "status": "ok"}),
    }) as qdrant:
        store = QdrantStore.connect(qdrant.url, timeout=5)
        with pytest.raises(StoreUnavailable, match=r"^Qdrant at http://127.0.0.1:\d+ is rate-limiting listing aliases "
                                                   r"\(retry after 3 s\): Too many requests$"):
            store.resolve("kb")
        with pytest.raises(StoreUnavailable, match=r"refused writing points to kb: HTTP 500"):
            store.upsert("kb", points)
        with pytest.raises(StoreError, match=r"refused deleting points from kb: HTTP 400") as refused:
            store.delete("kb", ["1"])
        assert not isinstance(refused.value, StoreUnavailable)
        with pytest.raises(StoreError, match=r"answered counting kb in a form this qdrant-client does not read .*: "
                                             r"obj.result.count: Field required$") as unreadable:
            store.count("kb")
        assert not isinstance(unreadable.value, StoreUnavailable) and "\n" not in str(unreadable.value)


def test_a_timed_out_or_busy_gateway_is_retryable():
    for status in (408, 502, 503, 504):
        with StubQdrant({("GET", "/aliases"): (status, {}, failure("busy"))}) as qdrant:
            with pytest.raises(StoreUnavailable, match=rf"refused listing aliases: HTTP {status}"):
                QdrantStore.connect(qdrant.url, timeout=5).resolve("kb")


def test_a_collection_ragbatch_did_not_build_is_not_read_as_its_own():
    store = QdrantStore.connect(":memory:")
    store.create_collection("kb--1", dimension=2, metadata={})
    store.upsert("kb--1", [models.PointStruct(id=1, vector={"dense": [0.1, 0.2]}, payload={})])
    store.move_alias("kb", "kb--1")
    with pytest.raises(StoreError, match=r"^collection 'kb' was not built by ragbatch \(no embedding model recorded\)$"):
        store.readable_collection("kb")
    store.close()


def test_collections_are_created_only_on_a_recent_enough_server_and_with_the_clients_time_limit():
    with StubQdrant({("GET", "/"): version("1.15.4")}) as old:
        with pytest.raises(StoreError, match=r"^Qdrant at http://127.0.0.1:\d+ is version 1.15.4; ragbatch needs 1.16 or newer"):
            QdrantStore.connect(old.url, timeout=5).create_collection("kb--1", dimension=4, metadata={})
        assert old.requests == ["GET /"]
    with StubQdrant({("GET", "/"): version("1.16.0"),
                     ("PUT", "/collections/kb--1"): (500, {}, failure("Waiting for consensus operation commit failed"))}) as new:
        with pytest.raises(StoreError, match="refused creating collection kb--1: HTTP 500") as refused:
            QdrantStore.connect(new.url, timeout=7).create_collection("kb--1", dimension=4, metadata={})
        assert not isinstance(refused.value, StoreUnavailable)  # it may have been created: not repeated blindly
        assert new.requests == ["GET /", "PUT /collections/kb--1?timeout=7"]


def test_unknown_store_spec():
    with pytest.raises(StoreError, match="unknown store 'qdrant.example'"):
        QdrantStore.connect("qdrant.example")
    with pytest.raises(StoreError, match=r"^--store http://host:99999 is not a valid URL: "):  # was urllib3's traceback
        QdrantStore.connect("http://host:99999")
    from tasks.concurrency import slot_names

    [slot] = slot_names("http://host:99999", "kb", writes=True)  # named as given; connecting then refuses it
    assert slot.startswith("ragbatch-write-kb-")


def test_embedded_store_allows_one_client_at_a_time(tmp_path):
    first = QdrantStore.connect(f"local:{tmp_path}")
    try:
        with pytest.raises(StoreError, match="in use by another process"):
            QdrantStore.connect(f"local:{tmp_path}")
    finally:
        first.close()


def test_alias_moves_atomically_between_physical_collections():
    store = QdrantStore.connect(":memory:")
    for name in ("docs--1", "docs--2"):
        store.create_collection(name, dimension=4, metadata={"name": name})
    store.move_alias("docs", "docs--1")
    assert store.resolve("docs") == "docs--1"
    store.move_alias("docs", "docs--2")
    assert store.resolve("docs") == "docs--2"
    assert store.collection_metadata("docs") == {"name": "docs--2", "vectors": ["dense"]}
    assert store.physical_collections("docs") == ["docs--1", "docs--2"]
    store.create_collection("plain", dimension=4, metadata={})
    with pytest.raises(StoreError, match="is a collection, not an alias"):
        store.move_alias("plain", "docs--1")


def test_a_finished_rebuild_drops_the_older_collections_and_not_a_rebuild_started_after_it():
    from tasks.ingest import Target, finish_rebuild

    store = QdrantStore.connect(":memory:")
    names = ["docs--20261201T101500000000", "docs--20261201T110000000000", "docs--20261201T110100000000",
             "docs--20261201T110200000000"]  # replaced, abandoned by a crash, this run's, another run's
    for name in names:
        store.create_collection(name, dimension=4, metadata={})
    store.move_alias("docs", names[0])
    assert finish_rebuild(store, Target("docs", names[2], replaces=names[0])) == names[:2]
    assert store.resolve("docs") == names[2] and store.physical_collections("docs") == names[2:]


def test_readable_collection_names_missing_and_empty_collections():
    store = QdrantStore.connect(":memory:")
    with pytest.raises(StoreError, match="collection 'docs' does not exist in :memory:; run `ragbatch ingest` first"):
        store.readable_collection("docs")
    store.create_collection("docs--1", dimension=4, metadata={"embedding_model": "m"})
    store.move_alias("docs", "docs--1")
    with pytest.raises(StoreError, match="collection 'docs' in :memory: is empty"):
        store.readable_collection("docs")


def test_collections_record_their_vector_layout():
    store = QdrantStore.connect(":memory:")
    for name, layout in (("both", VectorLayout(dense=True, sparse=True)), ("bm25", VectorLayout(dense=False, sparse=True))):
        store.create_collection(name, dimension=4, metadata={}, layout=layout)
        assert VectorLayout.from_metadata(store.collection_metadata(name)) == layout
    config = store.client.get_collection("bm25").config.params
    assert config.vectors == {} and config.sparse_vectors["sparse"].modifier == models.Modifier.IDF
    assert VectorLayout.from_metadata({"embedding_model": "m"}) == VectorLayout(dense=True, sparse=False, named=False)
    store.update_metadata("bm25", {"bm25_avgdl": 12.5})
    assert store.collection_metadata("bm25") == {"vectors": ["sparse"], "bm25_avgdl": 12.5}


def test_damaged_or_full_embedded_storage_is_one_line(tmp_path):
    """Local mode's SQLite errors (a full disk, a damaged file) and a damaged meta.json or edge
    aliases.json were tracebacks: neither a RagbatchError nor an OSError naming a file."""
    import resource
    import signal

    store = QdrantStore.connect(f"local:{tmp_path / 'local'}")
    store.create_collection("c", dimension=4, metadata={})
    points = [models.PointStruct(id=n, vector={"dense": [0.1, 0.2, 0.3, float(n)]}, payload={"text": "x" * 4000}) for n in range(200)]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limit[1]))  # the disk fills while the points are written
    try:
        with pytest.raises(StoreError, match=r"^Qdrant at local:.*: writing points to c failed: .* \(its SQLite storage\)$"):
            store.upsert("c", points)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    store.close()
    (tmp_path / "local" / "meta.json").write_text('{"collections": ')
    with pytest.raises(StoreError, match=rf"^the embedded store {tmp_path / 'local'} cannot be opened: "):
        QdrantStore.connect(f"local:{tmp_path / 'local'}")
    edge = QdrantStore.connect(f"edge:{tmp_path / 'edge'}")
    edge.close()
    (tmp_path / "edge" / "aliases.json").write_text("{")
    edge = QdrantStore.connect(f"edge:{tmp_path / 'edge'}")
    try:
        with pytest.raises(StoreError, match=rf"^{tmp_path / 'edge' / 'aliases.json'}: not valid JSON \("):
            edge.resolve("c")
    finally:
        edge.close()
