"""A local Prefect stack for operating ragbatch from the UI: server, work pool, deployments, worker.

Everything listens on loopback, keeps its SQLite database and logs under the data directory, and
runs with telemetry off. Each child gets its own session (so Ctrl-C reaches only `ragbatch server`,
which then stops them in order), default SIGINT handling (a worker that inherits an ignored SIGINT
does not stop on one signal) and dies with its parent.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from tasks.child_process import die_with_parent, free_port, http_address, require_free_port, stop_group
from tasks.errors import RagbatchError, first_line
from tasks.settings import PrefectServerParams


# Prefect's default of 10 s suits workers polling a remote API; against this loopback server a run
# started from the UI begins within about 2 s.
WORKER_QUERY_SECONDS = 2


class PrefectServerError(RagbatchError):
    """The local Prefect stack could not start or one of its processes died."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log: IO[bytes]


@dataclass
class PrefectStack:
    """Start with `start()`, stop with `stop()`; `wait()` blocks until a process exits on its own."""

    params: PrefectServerParams
    children: list[_Child] = field(default_factory=list)
    pools: list[str] = field(default_factory=list)  # prefect.yaml's work pools, read by `start`

    @property
    def api_url(self) -> str:
        return f"{http_address(self.params.ui_host, self.params.ui_port)}/api"

    @property
    def ui_url(self) -> str:
        return http_address(self.params.ui_host, self.params.ui_port)

    @property
    def home(self) -> Path:
        return self.params.data_dir / "prefect"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def environment(self) -> dict[str, str]:
        """What every child sees: this server as the API, state under the data dir, no telemetry."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            # Prefect 3.7 puts these under ~/.prefect whatever PREFECT_HOME says (see flows/__init__.py).
            PREFECT_SERVER_MEMO_STORE_PATH=str(self.home / "memo_store.toml"),
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(self.home / "storage"),
            PREFECT_API_URL=self.api_url,
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS=str(WORKER_QUERY_SECONDS),
            DO_NOT_TRACK="1",
            RAGBATCH_DATA_DIR=str(self.params.data_dir),
        )
        return env

    def start(self) -> None:
        """Server, then the work pools and deployments of prefect.yaml, then a worker per pool; stops
        what started if a step fails."""
        self.pools = pools = work_pools(self.params.project_dir / "prefect.yaml")
        require_free_port(self.params.ui_host, self.params.ui_port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn("server", ["server", "start", "--host", self.params.ui_host, "--port", str(self.params.ui_port)])
            self._wait_healthy(timeout=90)
            for pool in pools:
                self._prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
            if self.params.deploy:
                self._prefect("--no-prompt", "deploy", "--all")
            if self.params.worker:
                for pool in pools:
                    self._spawn("worker" if len(pools) == 1 else f"worker-{pool}",
                                ["worker", "start", "--pool", pool, "--name", f"ragbatch-local-{pool}", "--install-policy", "never"])
        except BaseException:
            self.stop()
            raise

    def wait(self, poll_seconds: float = 1.0) -> _Child:
        """Block until one of the processes exits; returns it."""
        while True:
            for child in self.children:
                if child.process.poll() is not None:
                    return child
            time.sleep(poll_seconds)

    def stop(self, grace_seconds: float = 20.0) -> None:
        """Worker first (so runs are not orphaned), then the server; each whole process group."""
        for child in reversed(self.children):
            stop_group(child.process, grace_seconds)
            child.log.close()
        self.children.clear()

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", *args], cwd=self.params.project_dir, env=self.environment(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.children.append(_Child(name, process, log))

    def _prefect(self, *args: str) -> None:
        """A one-shot Prefect CLI command against this server; its output goes to setup.log."""
        with open(self.log_dir / "setup.log", "ab") as log:
            result = subprocess.run(
                [sys.executable, "-m", "prefect", *args], cwd=self.params.project_dir, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=300,
            )
        if result.returncode:
            raise PrefectServerError(f"`prefect {' '.join(args)}` failed (exit {result.returncode}); see {self.log_dir / 'setup.log'}")

    def _wait_healthy(self, timeout: float) -> None:
        wait_healthy(self.api_url, self.children[0].process, self.log_dir / "server.log", timeout)


def work_pools(prefect_yaml: Path) -> list[str]:
    """The work pools the deployments of `prefect_yaml` run on, in order: what the local stack creates
    and starts workers for (a pool named apart from the file deployed to one that had no worker)."""
    import yaml

    if not prefect_yaml.is_file():
        raise PrefectServerError(f"no prefect.yaml in {prefect_yaml.parent}; run from the project directory or pass --project-dir")
    try:
        deployments = (yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}).get("deployments") or []
        pools = [deployment["work_pool"]["name"] for deployment in deployments]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as exc:
        raise PrefectServerError(f"{prefect_yaml}: every deployment needs a work_pool with a name ({first_line(exc)})") from None
    if not pools:
        raise PrefectServerError(f"{prefect_yaml}: no deployments")
    return list(dict.fromkeys(pools))


def prefect_tls_verify() -> ssl.SSLContext:
    """How Prefect's own client checks an https API's certificate: not at all with
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY, else against PREFECT_API_SSL_CERT_FILE (a team's private CA), else certifi's."""
    import certifi
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if api.tls_insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=api.ssl_cert_file or certifi.where())


def require_reachable_api(api_url: str, timeout: float = 10) -> None:
    """Raise `PrefectServerError` in one line when nothing answers at the configured Prefect API: Prefect's
    client would end the run with a traceback. Any HTTP answer counts (a Cloud workspace URL has no /health).
    An https API's certificate is checked as Prefect's client checks it."""
    try:
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout, verify=prefect_tls_verify())
    except httpx.TransportError as exc:
        raise PrefectServerError(
            f"cannot reach the Prefect API at {api_url} (PREFECT_API_URL): {str(exc) or type(exc).__name__}; start that "
            "server (`ragbatch server` for a local one), or unset PREFECT_API_URL to run with a temporary one"
        ) from None


def wait_healthy(api_url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once the server at `api_url` answers its health check; one-line error if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PrefectServerError(f"the Prefect server exited (code {server.returncode}); see {log}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise PrefectServerError(f"the Prefect server did not answer within {timeout:.0f} s; see {log}")


@contextmanager
def temporary_server(home: Path, timeout: float = 120) -> Iterator[str]:
    """A Prefect server for one command's run (no UI, a free loopback port, its database in `home`),
    the API of this process while the context lasts; yields its URL. It dies with this process, also
    when this one is killed: Prefect's own temporary server for runs without PREFECT_API_URL outlives
    a killed or crashed parent, holding its port and database until someone finds it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    (home / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    log_path = home / "logs" / "temporary-server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        wait_healthy(api_url, server, log_path, timeout)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:  # send the logs and events still queued while the server is there to take them
                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        stop_group(server, grace_seconds=10)
