"""Keys for the Qdrant server and the LLM endpoint: from a Prefect Secret block or an environment variable.

Flow parameters carry at most the *name* of a Secret block, never a key, so a key cannot reach the
flow run's parameters, the UI form, logs or artifacts through them. Keys are resolved when a run
connects, held as pydantic `SecretStr` (which prints as `**********`), and only unwrapped at the
client that sends them.
"""

from __future__ import annotations

import os

from pydantic import SecretStr

from tasks.errors import RagbatchError

QDRANT_API_KEY_ENV = ("RAGBATCH_QDRANT_API_KEY", "QDRANT_API_KEY")
LLM_API_KEY_ENV = ("RAGBATCH_LLM_API_KEY",)


class SecretNotFound(RagbatchError):
    """A named Secret block cannot be loaded."""


def resolve_secret(block: str | None, env_names: tuple[str, ...], what: str) -> SecretStr | None:
    """The key from Secret block `block` when one is named, else from the first set variable of `env_names`."""
    if block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(block).get()
        except Exception as exc:  # Prefect raises ValueError for a missing block, httpx errors without a server
            raise SecretNotFound(f"cannot load the Prefect Secret block {block!r} with the {what}: "
                                 f"{type(exc).__name__}") from None
        return SecretStr(value if isinstance(value, str) else str(value))
    for name in env_names:
        if os.environ.get(name):
            return SecretStr(os.environ[name])
    return None


def qdrant_api_key(block: str | None) -> SecretStr | None:
    return resolve_secret(block, QDRANT_API_KEY_ENV, "Qdrant API key")


def reveal(secret: SecretStr | str | None) -> str | None:
    """The plain value, for the one call that sends it."""
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


def redact(text: str, *secrets: SecretStr | str | None) -> str:
    """`text` with every given secret replaced by `***` (servers may echo a key in their error messages)."""
    for secret in secrets:
        value = reveal(secret)
        if value:
            text = text.replace(value, "***")
    return text
