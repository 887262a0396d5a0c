"""Read documents from a directory of files or a table, streaming, one `SourceRow` per input row.

Row-level problems (undecodable file, broken JSON line) become rows with `error` set, so validation
quarantines them with the reason and the input accounting stays exact. Problems with the source as a
whole raise `SourceError`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from tasks.errors import SourceError
from tasks.settings import SourceFormat

TEXT_SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}
ID_COLUMNS = ("id", "_id", "doc_id")
TEXT_COLUMN = "text"
TITLE_COLUMN = "title"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


@dataclass(frozen=True)
class SourceRow:
    """One input row: a file, a line or a table row. `locator` says where it came from."""

    locator: str
    doc_id: str | None
    text: str | None
    title: str | None = None
    source: str = ""
    kind: str = "text"
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def detect_format(path: Path) -> SourceFormat:
    """Pick the reader from the path: a BEIR directory has corpus.jsonl; otherwise by suffix."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir():
        return SourceFormat.beir if (path / "corpus.jsonl").is_file() else SourceFormat.dir
    suffix = path.suffix.lower()
    for fmt, suffixes in ((SourceFormat.jsonl, {".jsonl", ".ndjson"}), (SourceFormat.csv, {".csv"}), (SourceFormat.parquet, {".parquet", ".pq"})):
        if suffix in suffixes:
            return fmt
    raise SourceError(f"{path}: unknown source format {suffix or '(no suffix)'!r}; use a directory, .jsonl, .csv or .parquet")


def read_rows(path: Path, fmt: SourceFormat = SourceFormat.auto, *, text_column: str = TEXT_COLUMN) -> Iterator[SourceRow]:
    """Stream every row of the source; raises SourceError before the first row if it is unusable.

    Tables name their text column `text_column` (question sets use "question").
    """
    path = Path(path)
    if fmt == SourceFormat.auto:
        fmt = detect_format(path)
    elif not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if fmt == SourceFormat.dir:
        if not path.is_dir():
            raise SourceError(f"{path}: not a directory")
        return _read_directory(path)
    if fmt == SourceFormat.beir:
        corpus = path / "corpus.jsonl" if path.is_dir() else path
        if not corpus.is_file():
            raise SourceError(f"{path}: no corpus.jsonl in this BEIR directory")
        return _read_jsonl(corpus, TEXT_COLUMN)
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, expected a {fmt.value} file")
    readers = {SourceFormat.jsonl: _read_jsonl, SourceFormat.csv: _read_csv, SourceFormat.parquet: _read_parquet}
    return readers[fmt](path, text_column)


def batched(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    """Group rows into lists of at most `size`, keeping memory bounded."""
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def count_rows(path: Path, fmt: SourceFormat = SourceFormat.auto) -> int | None:
    """How many rows `read_rows` will yield (for progress reporting), in one cheap pass; None if unknown."""
    path = Path(path)
    try:
        fmt = detect_format(path) if fmt == SourceFormat.auto else fmt
        if fmt == SourceFormat.dir:
            return sum(1 for _ in _walk_files(path.resolve()))
        if fmt == SourceFormat.parquet:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == SourceFormat.csv:
            with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
                return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
        table = path / "corpus.jsonl" if fmt == SourceFormat.beir and path.is_dir() else path
        with open(table, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except (OSError, SourceError, ValueError):
        return None


# -- directories of files ---------------------------------------------------------------------------

def _read_directory(root: Path) -> Iterator[SourceRow]:
    root = root.resolve()
    for path in _walk_files(root):
        relative = path.relative_to(root).as_posix()
        kind = TEXT_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            yield SourceRow(relative, relative, None, source=relative, error=f"unsupported file type {path.suffix or '(none)'!r}")
            continue
        try:
            raw = path.read_bytes()
        except OSError as exc:
            yield SourceRow(relative, relative, None, source=relative, kind=kind, error=f"unreadable: {exc.strerror or exc}")
            continue
        text, error = decode_bytes(raw)
        if error:
            yield SourceRow(relative, relative, None, source=relative, kind=kind, error=error)
            continue
        title = None
        if kind == "html":
            title, text = html_to_text(text)
        elif kind == "markdown":
            title = _markdown_title(text)
        yield SourceRow(relative, relative, text, title=title, source=relative, kind=kind, metadata={"format": kind})


def _walk_files(root: Path) -> Iterator[Path]:
    """Files below root in a stable order, skipping hidden entries and never leaving root."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                continue
            yield path


def decode_bytes(raw: bytes) -> tuple[str, str | None]:
    """Decode UTF-8 (or a BOM-marked UTF-16/32); return (text, error) with a reason when it is not text."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding), None
            except UnicodeDecodeError as exc:
                return "", f"not valid {encoding.upper()} at byte {exc.start}"
    if b"\x00" in raw:
        return "", "binary content (NUL bytes)"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", f"not valid UTF-8 at byte {exc.start}"


def html_to_text(html: str) -> tuple[str | None, str]:
    """Reduce an HTML page to (title, visible text), dropping scripts, styles and markup."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in soup.get_text("\n").splitlines())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return title or None, text


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
    return match.group(1) if match else None


# -- tables -----------------------------------------------------------------------------------------

def _id_column(columns: Iterable[str], path: Path) -> str:
    columns = list(columns)
    for name in ID_COLUMNS:
        if name in columns:
            return name
    raise SourceError(f"{path}: missing required column 'id' (found: {', '.join(columns) or 'none'})")


def _require_text(columns: Iterable[str], path: Path, text_column: str) -> None:
    columns = list(columns)
    if text_column not in columns:
        raise SourceError(f"{path}: missing required column {text_column!r} (found: {', '.join(columns) or 'none'})")


def _table_row(locator: str, source: str, record: dict[str, Any], id_column: str, text_column: str) -> SourceRow:
    raw_id = record.get(id_column)
    text = record.get(text_column)
    title = record.get(TITLE_COLUMN)
    metadata = {k: _jsonable(v) for k, v in record.items() if k not in (id_column, text_column, TITLE_COLUMN)}
    error = None
    if text is not None and not isinstance(text, str):
        error = f"text is not a string ({type(text).__name__})"
    elif any(isinstance(v, str) and _UNDECODABLE.search(v) for v in (text, raw_id, title)):
        error = "not valid UTF-8"
    doc_id = None if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()) else str(raw_id)
    return SourceRow(
        locator, doc_id, text if error is None else None,
        title=str(title) if title not in (None, "") else None,
        source=source, kind="text", metadata=metadata, error=error,
    )


def _jsonable(value: Any) -> Any:
    """Payload values must survive JSON: keep plain types, stringify the rest."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _read_jsonl(path: Path, text_column: str) -> Iterator[SourceRow]:
    name = path.name
    id_column: str | None = None
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            locator = f"{name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceRow(locator, None, None, source=name, error=f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(record, dict):
                yield SourceRow(locator, None, None, source=name, error="line is not a JSON object")
                continue
            if id_column is None:
                id_column = _id_column(record, path)
                _require_text(record, path, text_column)
            yield _table_row(locator, name, record, id_column, text_column)


def _read_csv(path: Path, text_column: str) -> Iterator[SourceRow]:
    name = path.name
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise SourceError(f"{path}: empty CSV file (no header row)")
        id_column = _id_column(reader.fieldnames, path)
        _require_text(reader.fieldnames, path, text_column)
        for record in reader:
            # reader.line_num is the physical line where this record ended (quoted newlines span lines).
            yield _table_row(f"{name}:{reader.line_num}", name, record, id_column, text_column)


def _read_parquet(path: Path, text_column: str) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    name = path.name
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    id_column = _id_column(parquet.schema_arrow.names, path)
    _require_text(parquet.schema_arrow.names, path, text_column)
    number = 0
    for record_batch in parquet.iter_batches(batch_size=1024):
        for record in record_batch.to_pylist():
            number += 1
            yield _table_row(f"{name}:row {number}", name, record, id_column, text_column)


@contextmanager
def _open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open a table file as text; undecodable bytes survive as surrogates for a per-row check."""
    try:
        handle = open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with handle:
        yield handle
