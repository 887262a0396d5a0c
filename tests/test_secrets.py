"""Keys given by environment variable or Prefect Secret block are sent to their server and appear nowhere
else: not in flow run parameters, logs (read back through the Prefect API), artifacts, output or
quarantine Parquet, state files, or error messages.

The servers here are small HTTP endpoints in the test that check and record the key header, as
Qdrant and `vllm serve --api-key` do, and that echo the key back in their refusals, as some servers
do. No Qdrant server can run on this machine; vLLM's own key check is covered in test_llm.py.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr

from flows.answer import answer
from flows.ingest import ingest
from tasks.errors import RagbatchError, StoreError
from tasks.settings import AnswerParams, IngestParams

from .test_concurrency import small_corpus


@contextmanager
def key_checking_server(header: str, key: str, respond: Callable[[dict, str], tuple[int, dict]]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback answering with `respond(request, key)` when `header` carries `key`, else
    401 with the received key echoed in the body. Yields (base URL, received header values)."""
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            given = self.headers.get(header, "")
            received.append(given)
            status, body = respond(request, given) if given.removeprefix("Bearer ") == key else (
                401, {"error": {"message": f"invalid key {given}"}, "status": f"invalid key {given}"})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def completion(request: dict, given: str) -> tuple[int, dict]:
    return 200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": request.get("model", "m"),
            "choices": [{"index": 0, "text": " The station checks it weekly [1].", "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 8, "total_tokens": 48}}


def save_secret_block(value: str) -> str:
    from prefect.blocks.system import Secret

    name = f"key-{uuid.uuid4().hex[:8]}"
    Secret(value=value).save(name)
    return name


def last_flow_run_texts(flow_name: str) -> dict[str, str]:
    """Parameters, logs and artifacts of the latest run of `flow_name`, as text, from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches; send what is pending first
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return {
        "parameters": json.dumps(run.parameters, default=str),
        "state": str(run.state.message if run.state else ""),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in artifacts),
        "log_count": str(len(logs)),
    }


def files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def assert_nowhere(secret: str, *texts: str, roots: tuple[Path, ...] = ()) -> None:
    for text in texts:
        assert secret not in text
    for root in roots:
        assert files_containing(root, secret) == []


@pytest.mark.parametrize("via", ["block", "env"])
def test_the_qdrant_key_is_sent_and_never_shown(prefect_api_url, tmp_path, data_dir, monkeypatch, caplog, via):
    key = f"qdrant-{uuid.uuid4().hex}"
    corpus = small_corpus(tmp_path / "corpus", 2)
    block = None
    if via == "block":
        block = save_secret_block(key)
        monkeypatch.setenv("RAGBATCH_QDRANT_API_KEY", "not-the-key-from-the-block")
    else:
        monkeypatch.setenv("RAGBATCH_QDRANT_API_KEY", key)
    forbidden = lambda request, given: (403, {"status": {"error": f"{given} may not list aliases"}})  # noqa: E731
    with key_checking_server("api-key", key, forbidden) as (url, received):
        # The server takes the key but refuses the request, echoing the key: the run must fail cleanly.
        params = IngestParams(source=corpus, collection="kb", data_dir=data_dir, store=url, qdrant_api_key_block=block)
        with pytest.raises(StoreError) as error:
            ingest(params)
    assert received and received[0] == key  # the key reached the server (from the block, not the variable)
    run = last_flow_run_texts("ingest")
    assert block is None or block in run["parameters"]  # the flow run names the block, which is all it knows
    assert int(run["log_count"]) > 0
    assert_nowhere(key, str(error.value), caplog.text, *run.values(), roots=(data_dir,))


def test_the_llm_key_is_sent_and_never_shown_and_an_echoed_key_is_redacted(
    prefect_api_url, tmp_path, data_dir, tiny_llm_dir, monkeypatch, caplog
):
    key = f"llm-{uuid.uuid4().hex}"
    corpus = small_corpus(tmp_path / "corpus", 4)
    ingest(IngestParams(source=corpus, collection="kb", data_dir=data_dir))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in
                                 enumerate(["How often is the rain gauge checked?", "What about the battery?", " "])))
    block = save_secret_block(key)
    out = tmp_path / "out" / "answers.parquet"
    with key_checking_server("authorization", key, completion) as (url, received):
        params = AnswerParams(questions=questions, out=out, collection="kb", data_dir=data_dir, llm_model=str(tiny_llm_dir),
                              max_model_len=512, llm_url=url + "/v1", llm_api_key_block=block)
        report = answer(params)
        assert (report.answered, report.quarantined) == (2, 1)
        assert received == [f"Bearer {key}"] * 2
        run = last_flow_run_texts("answer")
        assert block in run["parameters"] and int(run["log_count"]) > 0
        assert_nowhere(key, caplog.text, *run.values(), roots=(data_dir, out.parent))

        # A wrong key from the environment: the server refuses and echoes it; the error must not show it.
        wrong = f"wrong-{uuid.uuid4().hex}"
        monkeypatch.setenv("RAGBATCH_LLM_API_KEY", wrong)
        again = params.model_copy(update={"llm_api_key_block": None, "overwrite": True})
        with pytest.raises(RagbatchError) as error:
            answer(again)
    assert "HTTP 401" in str(error.value) and "***" in str(error.value)
    run = last_flow_run_texts("answer")
    assert "HTTP 401" in run["logs"]  # the failure itself was logged, redacted
    assert_nowhere(wrong, str(error.value), caplog.text, *run.values(), roots=(data_dir, out.parent))


def test_qdrants_own_variable_is_read_and_every_echo_of_a_key_is_redacted(monkeypatch):
    """QDRANT_API_KEY, the variable Qdrant's tools use, is the fallback of RAGBATCH_QDRANT_API_KEY; a
    server echoing the key twice had the second copy shown."""
    from tasks.secrets import qdrant_api_key, redact

    monkeypatch.delenv("RAGBATCH_QDRANT_API_KEY", raising=False)
    monkeypatch.setenv("QDRANT_API_KEY", "from-qdrant")
    assert qdrant_api_key(None).get_secret_value() == "from-qdrant"
    monkeypatch.setenv("RAGBATCH_QDRANT_API_KEY", "from-ragbatch")
    assert qdrant_api_key(None).get_secret_value() == "from-ragbatch"
    assert redact("key k1 refused: k1 is unknown", "k1") == "key *** refused: *** is unknown"
    # An empty key (a Secret block holding "", an empty variable) redacts nothing: not *** between every letter.
    assert redact("refused: HTTP 401", "", SecretStr(""), None) == "refused: HTTP 401"
    monkeypatch.setenv("RAGBATCH_QDRANT_API_KEY", "")  # set but empty: the fallback still counts
    assert qdrant_api_key(None).get_secret_value() == "from-qdrant"


def test_a_secret_block_that_cannot_be_loaded_is_one_line(prefect_api_url):
    from tasks.secrets import SecretNotFound, qdrant_api_key

    with pytest.raises(SecretNotFound, match=r"^cannot load the Prefect Secret block 'no-such-block' with the Qdrant API key: \w+$"):
        qdrant_api_key("no-such-block")
