"""Embedding models behind one small protocol; sentence-transformers is the default backend."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Protocol

import numpy as np

from tasks.models import resolve_embedding_model


class Embedder(Protocol):
    """Turns texts into normalized float32 vectors of a fixed dimension."""

    model_name: str

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def default_device() -> str:
    """CUDA when a GPU is visible, else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
        model = SentenceTransformer(resolve_embedding_model(self.model_name), device=device)
        if device.startswith("cuda"):
            model.half()
        return model

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        return int(self.model.get_max_seq_length())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return vectors.astype(np.float32, copy=False)
