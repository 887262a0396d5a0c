"""Choosing the generation backend for a run: the in-process vLLM engine or an OpenAI-compatible server."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from functools import cache
from typing import Any

from tasks.errors import ModelError
from tasks.llm import Generator, OpenAIGenerator, SamplingConfig, ServerChat, VLLMGenerator, load_chat_tokenizer
from tasks.llm_models import is_local_llm_model, resolve_llm_model
from tasks.prompts import ChatFormat, TokenizerChat
from tasks.secrets import LLM_API_KEY_ENV, resolve_secret
from tasks.settings import AnswerParams, EmbeddingBackend, RetrievalMode


def sampling_config(params: AnswerParams) -> SamplingConfig:
    return SamplingConfig(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                          seed=params.seed, stop=tuple(params.stop))


def answer_settings(params: AnswerParams, template: str, *, physical_collection: str | None) -> dict[str, Any]:
    """What shapes a run's answers, recorded with them: a resumed run must have the same (AnswerCheckpoint).
    The physical collection changes with every rebuild (and so with the embedding model)."""
    return {
        "collection": params.collection, "physical_collection": physical_collection, "llm_model": params.llm_model,
        "prompt_template": hashlib.sha256(template.encode()).hexdigest()[:16],
        "top_k": params.top_k, "score_threshold": params.score_threshold, "retrieval": params.retrieval.value,
        "fusion": params.fusion.value, "sampling": dataclasses.asdict(sampling_config(params)),
        "max_model_len": params.max_model_len,  # the prompt budget: which passages fit beside the question
    }


def generator_gpu_share(params: AnswerParams) -> float:
    """The in-process generator's share of each GPU: `gpu_memory_utilization`, less the query embedding
    engine's share when vLLM embeds the questions too. Both engines live through the run, and vLLM
    checks at start that its whole share is still free, so the shares must add up to at most one."""
    embeds_with_vllm = params.embedding_backend == EmbeddingBackend.vllm and params.retrieval != RetrievalMode.sparse
    return round(params.gpu_memory_utilization - (params.embedding_gpu_share if embeds_with_vllm else 0.0), 6)


def model_max_len(model_path: str) -> int:
    """The context length a model was trained for, from its config."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).max_position_embeddings)


def open_generator(params: AnswerParams) -> tuple[Generator, Callable[[], ChatFormat]]:
    """The run's generator and a cached loader of the model's chat format (template and token counts).

    The bundled SmolLM2 is prepared under `<data dir>/models` on first use. The engine itself starts
    only when the first prompt is generated. With `llm_url`, a model that is not on this machine (a
    name the server knows it by) is templated, counted and sized by the server itself.
    """
    if params.llm_url:
        return _server_generator(params)
    model_path = resolve_llm_model(params.llm_model, params.data_dir / "models")
    return VLLMGenerator(
        model=model_path, model_name=params.llm_model, max_model_len=params.max_model_len, dtype=params.dtype,
        tensor_parallel_size=params.tensor_parallel_size, kv_cache_gib=params.kv_cache_gib,
        gpu_memory_utilization=generator_gpu_share(params),
        enforce_eager=params.enforce_eager, cache_dir=params.data_dir / "cache", seed=params.seed,
        use_tqdm=params.show_progress,
    ), _local_chat(model_path)


def served_context(server_chat: ServerChat, *, default: int) -> int:
    """The context the server gives the model (a vLLM server started with a smaller `--max-model-len`
    refuses longer prompts), or `default`, the model's own, from a server that does not say (not vLLM)."""
    try:
        return server_chat.max_model_len()
    except ModelError:
        return default


def _server_generator(params: AnswerParams) -> tuple[Generator, Callable[[], ChatFormat]]:
    """`OpenAIGenerator` on `llm_url`; a model on this machine is templated and counted here, else by the server."""
    api_key = resolve_secret(params.llm_api_key_block, LLM_API_KEY_ENV, "LLM endpoint key")
    server_chat = ServerChat(base_url=params.llm_url, model=params.llm_model, api_key=api_key,
                             concurrency=params.llm_concurrency)
    if is_local_llm_model(params.llm_model):
        model_path = resolve_llm_model(params.llm_model, params.data_dir / "models")
        chat = _local_chat(model_path)
        max_model_len = params.max_model_len or served_context(server_chat, default=model_max_len(model_path))
    else:
        chat, max_model_len = (lambda: server_chat), params.max_model_len or server_chat.max_model_len()
    return OpenAIGenerator(base_url=params.llm_url, model=params.llm_model, max_model_len=max_model_len,
                           api_key=api_key, concurrency=params.llm_concurrency), chat


def _local_chat(model_path: str) -> Callable[[], ChatFormat]:
    """A loader of the local model's tokenizer, loaded once on first use (only a run with prompts to build needs it)."""
    return cache(lambda: TokenizerChat(load_chat_tokenizer(model_path)))
