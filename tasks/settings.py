"""Typed parameters shared by flows (Prefect UI forms), CLI flags and RAGBATCH_* environment variables."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class SourceFormat(str, Enum):
    """How to read a source; `auto` decides from the path."""

    auto = "auto"
    dir = "dir"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"
    beir = "beir"


def default_data_dir() -> Path:
    """Where ragbatch keeps its state unless told otherwise: `.ragbatch/` in the working directory."""
    return Path(os.environ.get("RAGBATCH_DATA_DIR", ".ragbatch")).absolute()


class StoreParams(BaseSettings):
    """Where the index lives. The Qdrant API key is read from RAGBATCH_QDRANT_API_KEY, never a parameter."""

    model_config = SettingsConfigDict(env_prefix="RAGBATCH_", extra="forbid", use_enum_values=False)

    collection: str = Field(
        "docs",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Collection name. ragbatch points this alias at a physical collection.",
    )
    store: str = Field(
        "",
        description="http(s)://host:port for a Qdrant server, local:PATH for the embedded local mode, "
        "or :memory:. Empty: local mode under the data directory.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory for ragbatch's state: the embedded store, quarantine and run files.",
    )

    @model_validator(mode="after")
    def _default_store(self) -> "StoreParams":
        if not self.store:
            self.store = f"local:{self.data_dir / 'qdrant'}"
        return self


class IngestParams(StoreParams):
    """Parameters of the ingest flow."""

    source: Path = Field(description="A directory of .txt/.md/.html files, a JSONL/CSV/Parquet table, or a BEIR directory.")
    format: SourceFormat = Field(SourceFormat.auto, description="Source format; auto detects it from the path.")
    rebuild: bool = Field(False, description="Build a new collection and swap the alias to it when complete.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="sentence-transformers model: a bundled name, a local directory or a hub id.",
    )
    device: str | None = Field(None, description="Torch device for embedding; default CUDA when present, else CPU.")
    chunk_tokens: int = Field(200, ge=16, le=8192, description="Chunk size in tokens of the embedding model.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by neighbouring chunks.")
    batch_docs: int = Field(256, ge=1, description="Documents per pipeline batch (bounds memory).")
    embed_batch_size: int = Field(64, ge=1, description="Texts per forward pass of the embedding model.")
    max_chars: int = Field(1_000_000, ge=1, description="Documents longer than this many characters are quarantined.")
    max_quarantined_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail the run (and delete nothing) when more of the input than this fails validation."
    )
    show_progress: bool = Field(False, description="Show a progress bar on the terminal.")

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, overlap: int, info) -> int:
        size = info.data.get("chunk_tokens")
        if size is not None and overlap >= size:
            raise ValueError(f"chunk_overlap ({overlap}) must be smaller than chunk_tokens ({size})")
        return overlap
