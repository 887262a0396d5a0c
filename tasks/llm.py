"""Text generation behind one small protocol: vLLM in-process, or an OpenAI-compatible server.

Both backends take final prompt text (chat template already applied) and return one `Completion`
per prompt, in order. With greedy sampling they give the same text for the same model, because the
server is sent the same templated text through `/v1/completions` that the engine gets in-process.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from tasks.child_process import end_descendants_with_this_process
from tasks.errors import ModelError, RagbatchError, first_line
from tasks.locks import gpu_start_lock, waiting_for
from tasks.secrets import redact, reveal

GiB = 1 << 30
UNIX_SOCKET_PATH_MAX = 107  # bytes of a socket path (sun_path); vLLM adds "/<uuid4>" to its base path
UUID_LENGTH = 36


# Refusals of one request (a prompt over the server's context, a bad parameter): its question fails, the
# others go on. Any other refusal (401, 404: a wrong key or model) ends the run.
PROMPT_REFUSALS = (400, 413, 422)
CONNECT_TIMEOUT_S = 10
# Answers of a busy server or proxy: the OpenAI client tries them again, and ServerChat after these pauses.
BUSY_STATUSES = (408, 429, 502, 503, 504)
BUSY_RETRY_PAUSES_S = (0.5, 1.0)


class LLMServerError(RagbatchError):
    """The LLM server refused a request."""


class LLMUnavailable(LLMServerError):
    """The LLM server could not be reached or timed out; worth retrying."""


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample; the defaults are greedy (deterministic)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One generated answer; `finish_reason` is "stop" (end of text or a stop string) or "length"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None  # the server refused this prompt alone; its question is answered as failed


class Generator(Protocol):
    """Turns final prompt texts into completions, one per prompt, in the same order."""

    model_name: str

    @property
    def max_model_len(self) -> int: ...

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]: ...


def vllm_environment(cache_dir: Path, *, cuda: bool, kv_cache_gib: float = 1) -> dict[str, str]:
    """Environment for a vLLM engine or server, on GPUs or CPU: its caches in `cache_dir` (the data
    directory's; vLLM's defaults are under the home directory and /tmp), no usage statistics, and hub
    access as the caller's `HF_HUB_OFFLINE` says (off when it is unset).

    vLLM's cache root, whose model-class inspection a fresh one repeats in a subprocess (15 s on 2
    cores), is the caller's `VLLM_CACHE_ROOT` when set, so data directories can share one. The
    ZeroMQ sockets live in `cache_dir/rpc` (created here) unless that path is too long for a Unix
    socket, then in the system temp directory.

    On CPU also: the engine runs in the calling process unless the caller's
    `VLLM_ENABLE_V1_MULTIPROCESSING` is 1 (vLLM's own default: an engine process of its own), bound to
    all our cores, with `kv_cache_gib` of KV cache (vLLM reads whole GiB, so it is rounded up).
    """
    cache_dir = Path(cache_dir).absolute()
    rpc = cache_dir / "rpc"
    if len(str(rpc)) + len("/") + UUID_LENGTH <= UNIX_SOCKET_PATH_MAX:
        rpc.mkdir(parents=True, exist_ok=True)
    else:
        rpc = Path(tempfile.gettempdir())
    vllm_cache = Path(os.environ.get("VLLM_CACHE_ROOT") or cache_dir / "vllm")
    environment = {
        "VLLM_CACHE_ROOT": str(vllm_cache),
        # Not under VLLM_CACHE_ROOT by default, but under XDG_CACHE_HOME (or ~/.cache):
        "VLLM_ASSETS_CACHE": str(vllm_cache / "assets"),
        "VLLM_XLA_CACHE_PATH": str(vllm_cache / "xla_cache"),
        "VLLM_CONFIG_ROOT": str(cache_dir / "vllm-config"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
        # GPU kernels vLLM compiles at start-up go under the home directory otherwise (~/.triton,
        # ~/.cache/flashinfer, ~/.cache/torch_extensions, the driver's ~/.nv/ComputeCache):
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
        "FLASHINFER_WORKSPACE_BASE": str(cache_dir / "flashinfer"),  # it adds .cache/flashinfer
        "TORCH_EXTENSIONS_DIR": str(cache_dir / "torch_extensions"),
        "CUDA_CACHE_PATH": str(cache_dir / "nv-compute-cache"),
        "VLLM_RPC_BASE_PATH": str(rpc),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if cuda:
        return environment
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    return environment | {
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
    }


def has_cuda() -> bool:
    """Whether torch sees a GPU (vLLM then runs on it)."""
    import torch

    return torch.cuda.is_available()


def _error_message(response: Any) -> str:
    """The message of an OpenAI-style error body, else the body's first line."""
    try:
        return first_line(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return first_line(response.text)


class ServerChat:
    """A vLLM server's own chat template and tokenizer (its `/tokenize` and `/detokenize`), for a served
    model that is not on this machine: the prompt is templated and counted exactly as the server will.

    `base_url` is the OpenAI base URL (`.../v1`); vLLM serves these two endpoints beside it, at the root.
    Prompts are built `concurrency` at a time, as the generator's requests are sent.
    """

    def __init__(self, *, base_url: str, model: str, api_key: SecretStr | str | None = None, timeout: float = 60,
                 concurrency: int = 8) -> None:
        import httpx

        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self._api_key = api_key
        self._root = base_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {reveal(api_key)}"} if reveal(api_key) else {}
        # As the generator's OpenAI client: a host that takes no connection is known within CONNECT_TIMEOUT_S,
        # and a failed connection is tried twice more.
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
                                  transport=httpx.HTTPTransport(retries=2, limits=httpx.Limits(
                                      max_connections=concurrency, max_keepalive_connections=concurrency)))

    def _post(self, endpoint: str, body: dict[str, Any], field: str) -> Any:
        """`field` of the server's answer to `body` at `endpoint`. Busy answers (429, 502-504, from a
        proxy) are tried twice more after a pause, as the generator's client does; an answer that is not
        vLLM's is a ModelError, like a missing endpoint."""
        import httpx

        where = f"the LLM server at {self.base_url}"
        for pause in (*BUSY_RETRY_PAUSES_S, None):
            try:
                response = self._http.post(self._root + endpoint, json={"model": self.model, **body})
            except httpx.TransportError as exc:
                raise LLMUnavailable(redact(f"cannot reach {where}: {first_line(exc)}", self._api_key)) from None
            if response.status_code not in BUSY_STATUSES or pause is None:
                break
            time.sleep(pause)
        not_vllm = (f"so it cannot template prompts for {self.model}; give the model's local directory as "
                    "--llm-model, or serve it with vLLM")
        if response.status_code in (404, 405) and "model" not in response.text:
            raise ModelError(f"{where} has no {endpoint} endpoint (not vLLM?), {not_vllm}")
        if response.status_code != 200:
            error = LLMUnavailable if response.status_code in BUSY_STATUSES else LLMServerError
            raise error(redact(f"{where} refused {endpoint}: HTTP {response.status_code} "
                               f"{_error_message(response)}", self._api_key))
        try:
            return response.json()[field]
        except (ValueError, KeyError, TypeError):
            raise ModelError(f"{where} answered {endpoint} without {field!r} (not vLLM?), {not_vllm}") from None

    def render(self, content: str) -> str:
        """The template's text, less the tokens `/v1/completions` adds to any prompt when the template
        writes them too (a BOS: Llama 3, Mistral, Gemma), so the model sees them once."""
        tokens = self._post("/tokenize", {"messages": [{"role": "user", "content": content}],
                                          "add_generation_prompt": True}, "tokens")
        added = self._added_tokens
        if added and tokens[:len(added)] == added:
            tokens = tokens[len(added):]
        return self._post("/detokenize", {"tokens": tokens}, "prompt")

    def count(self, text: str) -> int:
        """Tokens of the text as `/v1/completions` will see it (special tokens added as there)."""
        return int(self._post("/tokenize", {"prompt": text}, "count"))

    def max_model_len(self) -> int:
        """The context length the server was started with."""
        return int(self._post("/tokenize", {"prompt": ""}, "max_model_len"))

    @functools.cached_property
    def _added_tokens(self) -> list[int]:
        """What `/v1/completions` adds to every prompt (a BOS, or nothing): the tokens of an empty one."""
        return self._post("/tokenize", {"prompt": ""}, "tokens")


def engine_dtype(dtype: str, *, cuda: bool | None = None) -> str:
    """The dtype to run in. "auto" on CPU: bfloat16 where the CPU computes it natively (AVX512-BF16 or
    AMX), else float32, which is 5x faster than bfloat16 on an AVX2-only CPU; on GPU (`cuda`, default:
    detected here) the model's own.
    """
    if dtype != "auto" or (has_cuda() if cuda is None else cuda):
        return dtype
    import torch

    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native_bf16 else "float32"


def load_chat_tokenizer(model: str):
    """The transformers tokenizer of an LLM directory: its chat template and token counts."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of model {model}: {first_line(exc)}") from None


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub id ("name" or "org/name")."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


class VLLMGenerator:
    """vLLM's offline engine in this process; one `vllm.LLM`, created on first use and then kept.

    It sets the environment of `vllm_environment` (process-wide, before vLLM is imported). On CPU it
    resolves `dtype` "auto" with `engine_dtype`, and uses the single-process executor, which also works
    from a worker thread (a Prefect task) and holds `kv_cache_gib` of KV cache (whole GiB). On GPU,
    `dtype` and `tensor_parallel_size` go to vLLM as given, and the engine takes
    `gpu_memory_utilization` of each GPU's memory, its KV cache being what the model leaves of it.

    The single-process engine changes its host process: it seeds the global random generators,
    freezes the garbage collector's heap, makes `torch.set_num_threads` a no-op, and caches vLLM's
    environment variables, so a second engine in the same process keeps the first one's cache paths.
    """

    def __init__(
        self,
        *,
        model: str,
        model_name: str | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        kv_cache_gib: float = 2.0,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        cache_dir: Path,
        seed: int = 0,
        use_tqdm: bool = False,
    ) -> None:
        self.model = model
        self.model_name = model_name or model
        self.requested_max_model_len = max_model_len
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.use_tqdm = use_tqdm
        self._llm = None
        self._lock = threading.RLock()  # one engine call at a time: `vllm.LLM` is not thread-safe

    @property
    def llm(self):
        """The engine, created on first access (about 5 s eager on CPU, plus 9 s for the first import)."""
        with self._lock:
            if self._llm is None:
                self._llm = self._create()
            return self._llm

    def engine_args(self, *, cuda: bool) -> dict[str, Any]:
        """The arguments of `vllm.LLM` on GPUs or on CPU."""
        model = str(Path(self.model).expanduser()) if _looks_like_path(self.model) else self.model
        kwargs = dict(model=model, max_model_len=self.requested_max_model_len, enforce_eager=self.enforce_eager,
                      seed=self.seed, use_tqdm_on_load=self.use_tqdm)
        if cuda:
            return kwargs | dict(dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
                                 gpu_memory_utilization=self.gpu_memory_utilization)
        return kwargs | dict(dtype=engine_dtype(self.dtype), distributed_executor_backend="uni",
                             kv_cache_memory_bytes=int(self.kv_cache_gib * GiB))

    def _create(self):
        cuda = has_cuda()
        kwargs = self.engine_args(cuda=cuda)
        if _looks_like_path(kwargs["model"]) and not Path(kwargs["model"]).exists():
            raise ModelError(f"model {self.model} not found")
        os.environ.update(vllm_environment(self.cache_dir, cuda=cuda, kv_cache_gib=self.kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ModelError(f"vLLM is not installed ({first_line(exc)}): pip install 'ragbatch[llm]'") from None
        end_descendants_with_this_process()  # vLLM's engine process (on GPU) would outlive a killed command
        try:
            with waiting_for(gpu_start_lock(self.cache_dir)) if cuda else nullcontext():
                return LLM(**kwargs)
        except Exception as exc:
            raise ModelError(f"cannot load model {self.model}: {first_line(exc)}") from None

    @property
    def max_model_len(self) -> int:
        """The context length the engine runs with (prompt plus completion tokens)."""
        return int(self.llm.model_config.max_model_len)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        """All prompts in one engine call, so vLLM batches them continuously."""
        if not prompts:
            return []
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
        )
        with self._lock:
            outputs = self.llm.generate(list(prompts), params, use_tqdm=self.use_tqdm)
        return [
            Completion(
                text=output.outputs[0].text,
                prompt_tokens=len(output.prompt_token_ids or ()),
                completion_tokens=len(output.outputs[0].token_ids),
                finish_reason=str(output.outputs[0].finish_reason),
            )
            for output in outputs
        ]


class OpenAIGenerator:
    """An OpenAI-compatible server's `/v1/completions` (for example `vllm serve`), one request per prompt.

    Requests run `concurrency` at a time so the server can batch them; results keep the prompts'
    order. The API key is only sent, never logged, and removed from errors (a server may echo it).
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        max_model_len: int,
        api_key: SecretStr | str | None = None,
        timeout: float = 600,
        concurrency: int = 8,
    ) -> None:
        import httpx
        from openai import OpenAI

        self.base_url = base_url
        self.model_name = model
        self._max_model_len = max_model_len
        self.concurrency = concurrency
        self._api_key = api_key
        # The client insists on a key; servers without authentication ignore this placeholder.
        # `timeout` is for an answer; a host that does not accept connections is known within CONNECT_TIMEOUT_S.
        self._client = OpenAI(base_url=base_url, api_key=reveal(api_key) or "unused", max_retries=2,
                              timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _complete(self, prompt: str, sampling: SamplingConfig) -> Completion:
        import openai

        extra = {"stop": list(sampling.stop)} if sampling.stop else {}
        try:
            response = self._client.completions.create(
                model=self.model_name,
                prompt=prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                **extra,
            )
        except openai.APIConnectionError as exc:
            raise LLMUnavailable(redact(f"cannot reach the LLM server at {self.base_url}: {first_line(exc)}", self._api_key)) from None
        except openai.APIStatusError as exc:
            message = redact(f"the LLM server at {self.base_url} refused a request: HTTP {exc.status_code} {first_line(exc)}",
                             self._api_key)
            if exc.status_code in BUSY_STATUSES:
                raise LLMUnavailable(message) from None
            if exc.status_code in PROMPT_REFUSALS:
                return Completion(text="", prompt_tokens=0, completion_tokens=0, finish_reason="error", error=message)
            raise LLMServerError(message) from None
        except openai.APIResponseValidationError as exc:
            raise LLMServerError(redact(f"the LLM server at {self.base_url} sent an answer that is not a completion: "
                                        f"{first_line(exc)}", self._api_key)) from None
        if not response.choices:
            raise LLMServerError(f"the LLM server at {self.base_url} sent a completion without choices")
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=str(choice.finish_reason),
        )

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Completion]:
        if not prompts:
            return []
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            return list(pool.map(lambda prompt: self._complete(prompt, sampling), prompts))
        finally:
            pool.shutdown(cancel_futures=True)  # after a failure, do not send the rest
