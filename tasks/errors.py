"""Errors that end a run with one clear line instead of a traceback."""


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


class QuarantineThresholdExceeded(RagbatchError):
    """Too large a share of the input failed validation; the index is left untouched."""


class SetupError(RagbatchError):
    """An optional component the configuration asks for is not installed."""
