"""Embedding models behind one small protocol; sentence-transformers is the default backend."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.child_process import end_descendants_with_this_process
from tasks.errors import ModelError, first_line
from tasks.locks import gpu_start_lock, waiting_for
from tasks.models import (EmbeddingPrompts, embedding_input_limit, embedding_prompts, pools_its_prompt, prompts_of,
                          resolve_embedding_model)
from tasks.settings import EmbeddingBackend


class Embedder(Protocol):
    """Turns texts into normalized float32 vectors of a fixed dimension; documents by default, queries
    with `query=True` (each after the model's own prompt for its role, if it declares one)."""

    model_name: str

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray: ...


def default_device() -> str:
    """CUDA when a GPU is visible, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def vllm_on_gpu(device: str | None, *, cuda: bool) -> bool:
    """Whether a vLLM engine runs on a GPU: on the platform it finds (`cuda`: a GPU is visible), not on
    a torch device; a `device` it would not honour is refused rather than run with the wrong settings."""
    if device is None or device == ("cuda" if cuda else "cpu"):
        return cuda
    if not cuda:
        raise ModelError(f"device {device}: vLLM sees no GPU here and embeds on the CPU; leave the device unset")
    if device.startswith("cuda:"):
        raise ModelError(f"device {device}: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES, not from a device "
                         f"index; set CUDA_VISIBLE_DEVICES={device.removeprefix('cuda:')} and leave the device unset")
    raise ModelError(f"device {device}: vLLM embeds on the GPU it finds; to embed on {device}, use the "
                     f"{EmbeddingBackend.sentence_transformers.value} embedding backend")


class SentenceTransformerEmbedder:
    """sentence-transformers model, loaded on first use; fp16 on CUDA, fp32 on CPU."""

    def __init__(self, *, model_name: str, device: str | None = None, batch_size: int = 64) -> None:
        self.model_name = model_name
        self.device = device
        self.batch_size = batch_size

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        device = self.device or default_device()
        model_path = resolve_embedding_model(self.model_name)
        try:
            model = SentenceTransformer(model_path, device=device)
        except Exception as exc:  # noqa: BLE001 - sentence-transformers passes on whatever transformers raises
            raise ModelError(f"cannot load embedding model {self.model_name}: {first_line(exc)}") from None
        if device.startswith("cuda"):
            model.half()
        return model

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self.model.get_max_seq_length())

    @cached_property
    def prompts(self) -> EmbeddingPrompts:
        return prompts_of(self.model.prompts, self.model.default_prompt_name)

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), prompt=self.prompts.query if query else self.prompts.document, batch_size=self.batch_size,
            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)


class VLLMEmbedder:
    """vLLM's pooling runner in this process: the same vectors as sentence-transformers (cosine >= 0.9999,
    tested), faster because vLLM packs texts by tokens instead of padding batches and, on CPUs with
    native bfloat16, computes in bfloat16 and stays within that cosine (BENCHMARKS.md: 2.3x on full
    SciFact passages with AVX512-BF16; 1.06x to 1.8x in float32 on an AVX2 CPU), at the cost of an
    engine start of 20-30 s.

    Texts are truncated to the model's sentence-transformers `max_seq_length`, as sentence-transformers
    does. `dtype` "auto" is `tasks.llm.engine_dtype`'s choice (bfloat16 on CPUs that compute it natively,
    else float32; the model's own on GPU). It sets `tasks.llm.vllm_environment` (caches in the data
    directory; on CPU the single-process settings). On a GPU it takes `gpu_memory_utilization` of its
    memory (default: vLLM's), which must leave room for every other vLLM engine there: vLLM checks at start that its
    share is still free. The engine starts on first use (a few seconds).
    """

    def __init__(self, *, model_name: str, cache_dir: Path, device: str | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None) -> None:
        self.model_name = model_name
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self._lock = threading.Lock()  # `vllm.LLM` is not thread-safe

    @cached_property
    def path(self) -> str:
        return resolve_embedding_model(self.model_name)

    @cached_property
    def max_seq_length(self) -> int | None:
        """sentence-transformers' `max_seq_length` (256 for MiniLM, whose positions go to 512), if configured."""
        return embedding_input_limit(self.path)

    @property
    def max_tokens(self) -> int:
        return self.max_seq_length or int(self.llm.model_config.max_model_len)

    @cached_property
    def prompts(self) -> EmbeddingPrompts:
        return embedding_prompts(self.path)

    def engine_args(self, *, cuda: bool) -> dict[str, Any]:
        """The arguments of `vllm.LLM` on a GPU or on CPU."""
        from tasks.llm import engine_dtype

        kwargs = dict(model=self.path, runner="pooling", enforce_eager=True, seed=0, max_model_len=self.max_seq_length,
                      dtype=engine_dtype(self.dtype, cuda=cuda), use_tqdm_on_load=False)
        if not cuda:
            return kwargs | dict(distributed_executor_backend="uni")
        if self.gpu_memory_utilization is not None:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization)
        return kwargs

    @cached_property
    def llm(self):
        from tasks.llm import has_cuda, vllm_environment

        if self.prompts != EmbeddingPrompts() and not pools_its_prompt(self.path):
            raise ModelError(f"{self.model_name} leaves its prompt out of its pooling, which vLLM cannot: its vectors "
                             f"would differ; use the {EmbeddingBackend.sentence_transformers.value} embedding backend")
        cuda = vllm_on_gpu(self.device, cuda=has_cuda())
        os.environ.update(vllm_environment(self.cache_dir, cuda=cuda))
        try:
            from vllm import LLM

            end_descendants_with_this_process()
            with waiting_for(gpu_start_lock(self.cache_dir)) if cuda else nullcontext():
                return LLM(**self.engine_args(cuda=cuda))
        except ImportError as exc:
            raise ModelError(f"vLLM is not installed ({first_line(exc)}): pip install 'ragbatch[llm]'") from None
        except Exception as exc:
            raise ModelError(f"cannot load embedding model {self.model_name} in vLLM: {first_line(exc)}") from None

    @cached_property
    def dimension(self) -> int:
        return int(self.embed(["dimension probe"]).shape[1])

    def embed(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prompt = self.prompts.query if query else self.prompts.document  # prepended, as sentence-transformers does
        truncate = {"truncation": True, "max_length": self.max_tokens}
        with self._lock:
            outputs = self.llm.embed([prompt + text for text in texts], use_tqdm=False, tokenization_kwargs=truncate)
        vectors = np.asarray([output.outputs.embedding for output in outputs], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def open_embedder(backend: EmbeddingBackend, *, model_name: str, data_dir: Path, device: str | None = None,
                  batch_size: int = 64, gpu_share: float | None = None) -> Embedder:
    """The configured embedding backend; both give the same vectors, so an index built with one is
    queried with the other. `gpu_share` is the vLLM engine's `gpu_memory_utilization` on a GPU."""
    if backend == EmbeddingBackend.vllm:
        return VLLMEmbedder(model_name=model_name, cache_dir=Path(data_dir) / "cache", device=device,
                            gpu_memory_utilization=gpu_share)
    return SentenceTransformerEmbedder(model_name=model_name, device=device, batch_size=batch_size)
