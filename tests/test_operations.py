"""Operating with Prefect, for real: `ragbatch server` starts a server on a free loopback port, deploys
prefect.yaml and starts a worker; runs are triggered through the REST API, read back through it,
and the UI is rendered by headless Chromium. Ctrl-C then stops every process it started.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
import pyarrow.parquet as pq

from tasks.child_process import free_port
from tasks.prefect_server import WORKER_QUERY_SECONDS

from .conftest import ROOT

pytestmark = pytest.mark.slow

SCREENSHOTS = ROOT / ".ragbatch" / "test-output"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Stack:
    def __init__(self, process: subprocess.Popen, port: int, data_dir: Path) -> None:
        self.process = process
        self.ui = f"http://127.0.0.1:{port}"
        self._client = httpx.Client(base_url=f"{self.ui}/api", timeout=60)  # Prefect's client default
        self.data_dir = data_dir

    def log_tails(self, lines: int = 40) -> str:
        """The last lines of the server's and the worker's logs, for failure messages."""
        tails = []
        for log in sorted((self.data_dir / "prefect" / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One API request, retried as Prefect's own client does while the server answers 503 (its SQLite
        database busy, e.g. with the worker and a deployment writing at the same moment) or, for reads,
        does not answer in time; the last failure carries the tails of the stack's logs."""
        for attempt in range(8):
            try:
                response = self._client.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.ReadError, httpx.RemoteProtocolError) as error:
                if attempt == 7 or not (method == "GET" or path.endswith("/filter")):  # never repeat a write
                    raise AssertionError(f"{method} {path}: {error!r}\n{self.log_tails()}") from error
            else:
                if response.status_code != 503:
                    break
            time.sleep(min(0.5 * 2**attempt, 5))
        if response.is_error:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text[:300]}\n{self.log_tails()}")
        return response

    def deployment(self, flow: str, name: str) -> dict:
        return self.call("GET", f"/deployments/name/{flow}/{name}").json()

    def trigger(self, flow: str, name: str, parameters: dict | None = None) -> str:
        body = {"parameters": parameters} if parameters is not None else {}
        return self.call("POST", f"/deployments/{self.deployment(flow, name)['id']}/create_flow_run", json=body).json()["id"]

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.call("GET", f"/flow_runs/{run_id}").json()
            if run["state_type"] in FINAL_STATES:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout} s\n{self.log_tails()}")

    def artifacts(self, run_id: str) -> dict[str, dict]:
        response = self.call("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {artifact["key"]: artifact for artifact in response.json()}

    def task_runs(self, run_id: str) -> list[dict]:
        return self.call("POST", "/task_runs/filter", json={"task_runs": {"flow_run_id": {"any_": [run_id]}}}).json()

    def work_span(self, run_id: str) -> tuple[datetime, datetime]:
        """From the first task's start to the last task's end."""
        tasks = self.task_runs(run_id)
        return (min(datetime.fromisoformat(t["start_time"]) for t in tasks),
                max(datetime.fromisoformat(t["end_time"]) for t in tasks))

    def logs(self, run_id: str) -> str:
        response = self.call("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return "\n".join(entry["message"] for entry in response.json())


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    """`ragbatch server` as a user starts it, in its own session so the test can Ctrl-C it alone."""
    data_dir = tmp_path_factory.mktemp("ops-state")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port), "--data-dir", str(data_dir),
         "--project-dir", str(ROOT)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while not any(line.startswith("Prefect UI:") for line in seen):
        assert time.monotonic() < deadline and process.poll() is None, "ragbatch server did not start:\n" + "".join(seen)
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    yield Stack(process, port, data_dir)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(120)


@pytest.fixture(scope="module")
def runs(stack: Stack, tiny_llm_dir: Path) -> dict[str, dict]:
    """A reindex and a rebuild of the same collection triggered together, then an answer run (with the tiny
    random model: what is tested here is operating the runs; SmolLM2's answers are test_answer_flow's)."""
    reindex = stack.trigger("ingest", "reindex")
    rebuild = stack.trigger("ingest", "rebuild")
    finished = {"reindex": stack.wait(reindex), "rebuild": stack.wait(rebuild)}
    answer = stack.trigger("answer", "answer", {"params": {
        "questions": "data/questions.jsonl", "collection": "sample", "max_tokens": 24,
        "llm_model": str(tiny_llm_dir), "kv_cache_gib": 1,
    }})
    finished["answer"] = stack.wait(answer)
    for name, run in finished.items():
        assert run["state_type"] == "COMPLETED", f"{name}: {run['state_name']}\n{stack.logs(run['id'])}\n{stack.log_tails()}"
    return finished


def test_server_deploys_prefect_yaml_with_typed_forms_and_schedule(stack: Stack):
    pool = stack.call("GET", "/work_pools/ragbatch").json()
    assert pool["type"] == "process"
    reindex = stack.deployment("ingest", "reindex")
    assert reindex["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert reindex["parameters"] == {"params": {"source": "data/corpus", "collection": "sample"}}
    form = reindex["parameter_openapi_schema"]["definitions"]["IngestParams"]["properties"]
    assert list(form)[:2] == ["source", "collection"] and form["rebuild"]["description"]
    assert stack.deployment("ingest", "rebuild")["parameters"]["params"]["rebuild"] is True
    assert stack.deployment("answer", "answer")["work_pool_name"] == "ragbatch"
    assert (stack.data_dir / "prefect" / "prefect.db").is_file()
    assert (stack.data_dir / "prefect" / "memo_store.toml").is_file()  # Prefect put it in ~/.prefect
    [worker] = [p for p in psutil.Process(stack.process.pid).children(recursive=True) if "worker" in p.cmdline()]
    assert worker.environ()["PREFECT_WORKER_QUERY_SECONDS"] == str(WORKER_QUERY_SECONDS)  # a UI run starts within ~2 s, not 10


def test_the_server_refuses_a_run_with_credentials_in_a_url_before_storing_it(stack: Stack):
    """A password in the store URL would be kept and shown with the run's parameters: the form's schema refuses it."""
    parameters = {"params": {"source": "data/corpus", "collection": "sample", "store": "http://team:s3cret@127.0.0.1:6333"}}
    with pytest.raises(AssertionError, match=r"409 .*params\.store"):
        stack.trigger("ingest", "reindex", parameters)
    stored = stack.call("POST", "/flow_runs/filter", json={}).json()
    assert stored is not None and "s3cret" not in json.dumps([run["parameters"] for run in stored])


def test_two_runs_writing_one_collection_queue_instead_of_overlapping(stack: Stack, runs: dict[str, dict]):
    """Both flow runs may be Running at once, but the second waits for the collection's slot before any
    task starts (without it, the embedded store would refuse the second process)."""
    spans = sorted(stack.work_span(runs[name]["id"]) for name in ("reindex", "rebuild"))
    assert spans[0][1] <= spans[1][0], spans


def test_runs_show_counts_validation_progress_and_outputs(stack: Stack, runs: dict[str, dict]):
    ingest = stack.artifacts(runs["reindex"]["id"])
    assert {"ingest-counts-sample", "ingest-validation-sample", "ingest-progress-sample"} <= set(ingest)
    assert json.loads(ingest["ingest-counts-sample"]["data"])[0]["loaded"] == 36
    assert "36" in ingest["ingest-validation-sample"]["data"]
    assert ingest["ingest-progress-sample"]["type"] == "progress" and float(ingest["ingest-progress-sample"]["data"]) == 100.0

    answer = stack.artifacts(runs["answer"]["id"])
    assert {"answer-summary-sample", "answer-sample-sample", "answer-progress-sample"} <= set(answer)
    output = stack.data_dir / "answers" / "sample.parquet"
    assert str(output) in answer["answer-summary-sample"]["data"]
    assert pq.read_table(output).num_rows == 24
    assert float(answer["answer-progress-sample"]["data"]) == 100.0


def test_task_runs_read_as_the_pipeline(stack: Stack, runs: dict[str, dict]):
    def task_names(run_id: str) -> set[str]:
        return {re.sub(r"-[0-9a-f]+$", "", task["name"]) for task in stack.task_runs(run_id)}

    assert {"load", "validate", "find-changed", "chunk", "embed", "upsert", "delete-missing"} <= task_names(runs["rebuild"]["id"])
    assert {"load", "validate", "retrieve", "build-prompts", "generate", "write"} <= task_names(runs["answer"]["id"])


def chromium(*args: str, url: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is missing: `make test` installs Debian's chromium package"
    profile = SCREENSHOTS / "chromium-profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1440,1000", "--virtual-time-budget=20000"]
    return subprocess.run([binary, *flags, *args, url], capture_output=True, text=True, timeout=120)


def rendered_text(url: str) -> str:
    dom = chromium("--dump-dom", url=url).stdout
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_browser_shows_deployments_and_the_completed_run_with_artifacts(stack: Stack, runs: dict[str, dict]):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    deployments = rendered_text(f"{stack.ui}/deployments")
    for name in ("reindex", "rebuild", "answer"):
        assert re.search(rf"\b{name}\b", deployments), f"{name} not on the deployments page: {deployments[:500]}"
    answer_run = runs["answer"]
    run_page = f"{stack.ui}/runs/flow-run/{answer_run['id']}"
    run = rendered_text(run_page)
    assert answer_run["name"] in run and "Completed" in run and "Artifacts" in run
    artifacts = stack.artifacts(answer_run["id"])
    expected = {"answer-summary-sample": "answered", "answer-sample-sample": "q01", "answer-progress-sample": "Progress: 100%"}
    for key, content in expected.items():
        page = rendered_text(f"{stack.ui}/artifacts/artifact/{artifacts[key]['id']}")
        assert content in page and f"Flow Run {answer_run['name']}" in page, f"{key}: {page[:800]}"
    for name, url in (("ui-answer-run.png", run_page),
                      ("ui-answer-sample.png", f"{stack.ui}/artifacts/artifact/{artifacts['answer-sample-sample']['id']}")):
        screenshot = SCREENSHOTS / name
        screenshot.unlink(missing_ok=True)
        chromium(f"--screenshot={screenshot}", url=url)
        assert screenshot.stat().st_size > 10_000


def test_ctrl_c_stops_server_worker_and_their_children(stack: Stack, runs: dict[str, dict]):
    started = psutil.Process(stack.process.pid).children(recursive=True)
    assert len(started) >= 2  # server (with its uvicorn) and worker
    stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(120) == 0
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.ui}/api/health", timeout=5)
