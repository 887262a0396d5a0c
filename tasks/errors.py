"""Errors that end a run with one clear line instead of a traceback."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (of the first error, for pydantic), or its type.
    A first line that only introduces what follows ("...failure from server:" and a remote traceback)
    gets the last line too, where the traceback's error is."""
    from pydantic import ValidationError

    text = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) and exc.errors() else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[-1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


class RagbatchError(Exception):
    """A problem the user can act on; its message is printed as the whole error."""


class SourceError(RagbatchError):
    """The source cannot be read at all (missing path, unknown format, missing column)."""


class StoreError(RagbatchError):
    """The vector store refused an operation or is in an unexpected state."""


class StoreUnavailable(StoreError):
    """The store could not be reached or timed out; worth retrying."""


class DiskSpaceError(RagbatchError):
    """The disk of the data directory or store is too full to write safely."""


class DataDirError(RagbatchError):
    """The data directory cannot be created or written."""


class ModelError(RagbatchError):
    """A model (or its tokenizer) cannot be found or loaded."""


class PortInUseError(RagbatchError):
    """A server was asked to listen on a port that something else holds."""


class AddressError(RagbatchError):
    """A server was asked to listen on an address that is not this machine's."""


class QuarantineThresholdExceeded(RagbatchError):
    """Too large a share of the input failed validation; the index is left untouched."""


class SetupError(RagbatchError):
    """An optional component the configuration asks for is not installed."""
