"""Read documents from a directory of files or a table, streaming, one `SourceRow` per input row.

Row-level problems (undecodable file, broken JSON line) become rows with `error` set, so validation
quarantines them with the reason and the input accounting stays exact. Problems with the source as a
whole raise `SourceError`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from tasks.errors import SourceError, first_line
from tasks.settings import SourceFormat

TEXT_SUFFIXES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}
ID_COLUMNS = ("id", "_id", "doc_id")
TEXT_COLUMN = "text"
TITLE_COLUMN = "title"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (e.g. from JSON escapes) cannot be encoded
MAX_CHARS = 1_000_000
COUNTING_FIELD_LIMIT = 2**31 - 1  # csv's default (131,072 characters) is far below a normal document
BYTES_PER_CHAR = 4  # the most any supported encoding (UTF-8, UTF-16, UTF-32) spends on one character
LINE_CHARS_PER_CHAR = 12  # a JSON-escaped character takes up to 12 ("\ud83d\ude00")
LINE_SLACK = 1 << 20  # room in a table line for the id, title and metadata
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


def read_rows(
    path: Path, fmt: SourceFormat = SourceFormat.auto, *, text_column: str = TEXT_COLUMN, max_chars: int = MAX_CHARS
) -> Iterator[SourceRow]:
    """Stream every row of the source; raises SourceError before the first row if it is unusable.

    Tables name their text column `text_column` (question sets use "question"). Input that cannot
    hold a text of at most `max_chars` characters (a bigger file, a longer table line) becomes an error
    row without being read whole, so memory stays bounded whatever the input.
    """
    path = Path(path)
    if fmt == SourceFormat.auto:
        fmt = detect_format(path)
    elif not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if fmt == SourceFormat.dir:
        if not path.is_dir():
            raise SourceError(f"{path}: not a directory")
        return _read_directory(path, max_chars)
    line_chars = max_chars * LINE_CHARS_PER_CHAR + LINE_SLACK
    if fmt == SourceFormat.beir:
        corpus = path / "corpus.jsonl" if path.is_dir() else path
        if not corpus.is_file():
            raise SourceError(f"{path}: no corpus.jsonl in this BEIR directory")
        return _checked(_read_jsonl(corpus, TEXT_COLUMN, line_chars))
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, expected a {fmt.value} file")
    if fmt == SourceFormat.parquet:
        return _checked(_read_parquet(path, text_column))
    readers = {SourceFormat.jsonl: _read_jsonl, SourceFormat.csv: _read_csv}
    return _checked(readers[fmt](path, text_column, line_chars))


def _checked(rows: Iterator[SourceRow]) -> Iterator[SourceRow]:
    """`rows` with its first row read already: a table reader checks the file (readable, its columns)
    there, so an unusable file fails before a run starts any work, not inside its first batch."""
    first = next(rows, None)
    return rows if first is None else chain([first], rows)


def batched(rows: Iterable[SourceRow], size: int) -> Iterator[list[SourceRow]]:
    """Group rows into lists of at most `size`, keeping memory bounded."""
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


def count_rows(path: Path, fmt: SourceFormat = SourceFormat.auto, *, max_chars: int = MAX_CHARS) -> int | None:
    """How many rows `read_rows` will yield (for progress reporting), in one cheap pass in bounded
    memory; None if unknown (a CSV line longer than `read_rows` takes: it refuses the file)."""
    path = Path(path)
    try:
        fmt = detect_format(path) if fmt == SourceFormat.auto else fmt
        if fmt == SourceFormat.dir:
            return sum(1 for _ in _walk_files(path.resolve()))
        if fmt == SourceFormat.parquet:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if fmt == SourceFormat.csv:
            csv.field_size_limit(max(csv.field_size_limit(), COUNTING_FIELD_LIMIT))  # _read_csv sets its own again
            with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
                lines = _capped_lines(handle, max_chars * LINE_CHARS_PER_CHAR + LINE_SLACK, path)
                return max(sum(1 for _ in csv.reader(lines)) - 1, 0)
        table = path / "corpus.jsonl" if fmt == SourceFormat.beir and path.is_dir() else path
        with open(table, "rb") as handle:
            return _count_lines(handle)
    except (OSError, SourceError, ValueError, csv.Error):
        return None


def _count_lines(handle: BinaryIO) -> int:
    """Lines that are not blank, a block at a time: a line of any length costs no more memory."""
    count, open_line = 0, False  # open_line: the unfinished line so far holds more than whitespace
    while block := handle.read(1 << 20):
        *finished, rest = block.split(b"\n")
        for line in finished:
            count += open_line or bool(line.strip())
            open_line = False
        open_line = open_line or bool(rest.strip())
    return count + open_line


# -- directories of files ---------------------------------------------------------------------------

def _read_directory(root: Path, max_chars: int) -> Iterator[SourceRow]:
    root = root.resolve()
    max_bytes = max_chars * BYTES_PER_CHAR + len(_BOMS[0][0]) + 1  # beyond this no file fits max_chars
    for path, unreadable in _walk_files(root):
        relative = path.relative_to(root).as_posix() if path != root else "."
        if unreadable:  # its files are unknown, so it names no document: no deletions while it is quarantined
            yield SourceRow(shown_name(relative), None, None, source=shown_name(relative), error=f"unreadable directory ({unreadable})")
            continue
        if _UNDECODABLE.search(relative):  # kept as surrogates by the file system encoding; no id can hold them
            yield SourceRow(shown_name(relative), None, None, source=shown_name(relative), error="file name is not valid UTF-8")
            continue
        if path.is_symlink() and path.is_dir():
            yield SourceRow(relative, relative, None, source=relative, error="symlink to a directory (not followed)")
            continue
        kind = TEXT_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            yield SourceRow(relative, relative, None, source=relative, error=f"unsupported file type {path.suffix or '(none)'!r}")
            continue
        raw, error = _read_inside(path, root, max_bytes, max_chars)
        text, error = (None, error) if error else decode_bytes(raw)
        if error:
            yield SourceRow(relative, relative, None, source=relative, kind=kind, error=error)
            continue
        title, metadata = None, {"format": kind}
        if kind == "html":
            title, text = html_to_text(text)
        elif kind == "markdown":
            try:
                front, text = _split_front_matter(text)
            except ValueError as exc:
                yield SourceRow(relative, relative, None, source=relative, kind=kind, error=str(exc))
                continue
            title = _markdown_title(text, front)
            if front:
                metadata["front_matter"] = _jsonable(front)
            if not text.strip() and title:  # a section's index page of a static site: its title is its content
                text = title
        yield SourceRow(relative, relative, text, title=title, source=relative, kind=kind, metadata=metadata)


def shown_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept as surrogates) shown as \\x escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _UNDECODABLE.search(name) else name


def _walk_files(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Entries below root other than directories, in a stable order, skipping hidden ones, each with
    None or, for a directory that cannot be listed, why (an entry itself, for the reader to quarantine:
    its files were left out of the run and deleted from the index as gone).

    Symlinked directories are not followed, so the walk never leaves root and cannot loop; they are
    entries themselves, for the reader to quarantine (counted, not silently left out).
    """
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable.append):
        yield from ((Path(exc.filename), exc.strerror or str(exc)) for exc in unreadable)
        unreadable.clear()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        linked = [name for name in dirnames if os.path.islink(os.path.join(dirpath, name))]
        for name in sorted([*filenames, *linked]):
            if not name.startswith("."):
                yield Path(dirpath) / name, None
    yield from ((Path(exc.filename), exc.strerror or str(exc)) for exc in unreadable)


def _read_inside(path: Path, root: Path, max_bytes: int, max_chars: int) -> tuple[bytes, str | None]:
    """The bytes of a regular file inside root, or the reason it is not read.

    Symlinks are resolved first and only followed when their target is inside root; FIFOs, sockets
    and devices are refused (reading a FIFO would block the run); a file too big to hold `max_chars`
    characters is refused by its size, without reading it.
    """
    try:
        target = path.resolve(strict=True)
    except RuntimeError:
        return b"", "symlink loop"
    except OSError as exc:
        return b"", f"unreadable: {exc.strerror or exc}"
    if not target.is_relative_to(root):
        return b"", "symlink to a file outside the source directory (not read)"
    try:
        with open(target, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return b"", "not a regular file"
            if info.st_size > max_bytes:
                return b"", f"file has {info.st_size:,} bytes, too big for the limit of {max_chars:,} characters (max_chars)"
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        return b"", f"unreadable: {exc.strerror or exc}"
    if len(raw) > max_bytes:  # the file grew while being read
        return b"", f"file has more than {max_bytes:,} bytes, too big for the limit of {max_chars:,} characters (max_chars)"
    return raw, None


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


_HEADING_1 = re.compile(r"^ {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE_OPENING = re.compile(r"^ {0,3}(`{3,}(?=[^`]*$)|~{3,})")  # a backtick fence's info string has no backtick


def _markdown_title(text: str, front_matter: dict[str, Any]) -> str | None:
    """The front matter's `title:`, else the first `# ` heading of the text outside fenced code (a shell
    comment there is no heading)."""
    title = front_matter.get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    fence: str | None = None
    for line in text.splitlines():
        if fence is not None:
            if re.fullmatch(f" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", line):
                fence = None
        elif opening := _FENCE_OPENING.match(line):
            fence = opening.group(1)
        elif heading := _HEADING_1.match(line):
            return heading.group(1)
    return None


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(its fields, the text after it) when a Markdown text opens with a YAML mapping between `---`
    lines, as static site generators read it, else ({}, the text): front matter is metadata, which
    became a chunk of its own (owners' addresses in prompts, title-only chunks in the top k). A `---`
    rule that opens a text, with no mapping before the next, is none. ValueError for front matter
    that is not read safely."""
    import yaml

    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip() != "---":
        return {}, text
    end = next((i for i, line in enumerate(lines[1:], start=1) if line.rstrip() in ("---", "...")), None)
    if end is None:
        return {}, text
    block = "".join(lines[1:end])
    try:
        if any(isinstance(token, yaml.AliasToken) for token in yaml.scan(block)):
            # A self-reference never ends, and nested ones grow exponentially ("billion laughs").
            raise ValueError("front matter with YAML aliases (*name) is not read")
        fields = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}, text
    except RecursionError:
        raise ValueError("front matter nested too deeply") from None
    return (fields, "".join(lines[end + 1:])) if isinstance(fields, dict) else ({}, text)


# -- tables -----------------------------------------------------------------------------------------

def _id_column(columns: Iterable[str], path: Path) -> str:
    columns = list(columns)
    for name in ID_COLUMNS:
        if name in columns:
            return name
    raise SourceError(f"{path}: missing required column 'id' (found: {', '.join(columns) or 'none'})")


def _require_unique(columns: Sequence[str], path: Path, text_column: str) -> None:
    """An id, text or title column named twice: the readers keep only its last, so an id or a text was
    taken silently. (Other columns, e.g. the empty names of a spreadsheet's trailing commas, may repeat.)"""
    read = {*ID_COLUMNS, text_column, TITLE_COLUMN}
    if twice := sorted({column for column in columns if column in read and list(columns).count(column) > 1}):
        raise SourceError(f"{path}: column {twice[0]!r} appears more than once in the header")


def _require_text(columns: Iterable[str], path: Path, text_column: str) -> None:
    columns = list(columns)
    if text_column not in columns:
        raise SourceError(f"{path}: missing required column {text_column!r} (found: {', '.join(columns) or 'none'})")


def _table_row(locator: str, source: str, record: dict[str, Any], id_column: str, text_column: str) -> SourceRow:
    raw_id = record.get(id_column)
    text = record.get(text_column)
    title = record.get(TITLE_COLUMN)
    metadata = {k: _jsonable(v) for k, v in record.items() if k not in (id_column, text_column, TITLE_COLUMN)}
    doc_id, error = row_id(raw_id)
    if error is None:
        error = _text_problem(text, raw_id, title, metadata)
    return SourceRow(
        locator, doc_id, text if error is None else None,
        title=None if title in (None, "") or (isinstance(title, float) and not math.isfinite(title)) else str(title),
        source=source, kind="text", metadata=metadata, error=error,
    )


def row_id(raw_id: Any) -> tuple[str | None, str | None]:
    """The id as text; strings and whole numbers are ids, anything else is an error (not guessed at)."""
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return None, None
    if isinstance(raw_id, float) and raw_id.is_integer():
        raw_id = int(raw_id)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return None, f"id is not a string or an integer ({type(raw_id).__name__})"
    if isinstance(raw_id, str) and _SURROGATE.search(raw_id):  # no store, file or log can hold it as it is
        return None, "id is not valid Unicode (bytes that are not UTF-8, or a lone surrogate)"
    return str(raw_id), None


def _text_problem(text: Any, raw_id: Any, title: Any, metadata: dict[str, Any]) -> str | None:
    """Why a row's values cannot be stored (every string goes into the payload, metadata too), or None."""
    if text is not None and not isinstance(text, str):
        return f"text is not a string ({type(text).__name__})"
    strings = [v for v in (text, raw_id, title) if isinstance(v, str)] + list(_strings(metadata))
    if any(_UNDECODABLE.search(v) for v in strings):
        return "not valid UTF-8"
    if any(_SURROGATE.search(v) for v in strings):
        return "invalid Unicode (a lone surrogate)"
    if text is not None and "\x00" in text:
        return "binary content (NUL characters)"
    return None


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield key
            yield from _strings(item)


def _jsonable(value: Any) -> Any:
    """Payload values must survive JSON: keep plain types, stringify the rest; NaN and infinities (which
    JSON has not, and Qdrant's engine refuses, failing the whole batch) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _read_jsonl(path: Path, text_column: str, line_chars: int) -> Iterator[SourceRow]:
    name = shown_name(path.name)
    id_column: str | None = None
    _require_line_feeds(path)
    with _open_text(path, newline="\n") as handle:  # JSON Lines end at \n alone: a raw \r inside a line split it
        for number, line in enumerate(_bounded_lines(handle, line_chars, path), start=1):
            if line is None:
                yield SourceRow(f"{name}:{number}", None, None, source=name,
                                error=f"line longer than {line_chars:,} characters (too big for max_chars; not parsed)")
                continue
            if not line.strip():
                continue
            locator = f"{name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield SourceRow(locator, None, None, source=name, error=f"invalid JSON at column {exc.colno}: {exc.msg.removesuffix(' at')}")
                continue
            except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting past the stack
                yield SourceRow(locator, None, None, source=name, error=f"invalid JSON: {first_line(exc)}")
                continue
            if not isinstance(record, dict):
                yield SourceRow(locator, None, None, source=name, error="line is not a JSON object")
                continue
            if id_column is None:
                id_column = _id_column(record, path)
                _require_text(record, path, text_column)
            yield _table_row(locator, name, record, id_column, text_column)


def _require_line_feeds(path: Path) -> None:
    """Lines ended by CR alone (old Mac files) are one long broken line to a JSON Lines reader: say so."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open ({exc.strerror or exc})") from None
    if b"\r" in head and b"\n" not in head:
        raise SourceError(f"{path}: its lines end in CR alone; JSON Lines end in LF (or CR LF)")


def _bounded_lines(handle: TextIO, limit: int, path: Path) -> Iterator[str | None]:
    """Lines of at most `limit` characters; a longer line is skipped to its end and yields None."""
    number = 0
    try:
        while line := handle.readline(limit + 1):
            number += 1
            if len(line) <= limit or line.endswith("\n"):
                yield line
                continue
            while (rest := handle.readline(limit)) and not rest.endswith("\n"):
                pass
            yield None
    except UnicodeDecodeError as exc:  # UTF-16/32 (by its BOM) with a broken code unit: no resynchronising
        raise SourceError(f"{path}: {first_line(exc)}, at or after line {number + 1}; nothing after it can be read "
                          "reliably") from None


def _read_csv(path: Path, text_column: str, line_chars: int) -> Iterator[SourceRow]:
    name = shown_name(path.name)
    csv.field_size_limit(line_chars)  # process-wide; the default (131,072) is far below a normal document
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(_capped_lines(handle, line_chars, path))
        try:
            if reader.fieldnames is None:
                raise SourceError(f"{path}: empty CSV file (no header row)")
            _require_unique(reader.fieldnames, path, text_column)
            id_column = _id_column(reader.fieldnames, path)
            _require_text(reader.fieldnames, path, text_column)
            for record in reader:
                # reader.line_num is the physical line where this record ended (quoted newlines span lines).
                extra = record.pop(None, None)  # DictReader's key for the fields beyond the header's
                row = _table_row(f"{name}:{reader.line_num}", name, record, id_column, text_column)
                if extra:
                    row = replace(row, text=None, error=f"{len(extra)} more field(s) than the header's {len(reader.fieldnames)}")
                yield row
        except (csv.Error, UnicodeDecodeError) as exc:
            # The parser cannot resynchronise after this, so the rest of the file cannot be read reliably.
            raise SourceError(f"{path}: {first_line(exc)}, at or after line {reader.line_num + 1}; nothing after it can "
                              "be read reliably") from None


def _capped_lines(handle: TextIO, limit: int, path: Path) -> Iterator[str]:
    """The lines of a CSV file, refusing one longer than `limit` characters before it is read whole (a
    wide line of many big fields passed the field limit and went into the payload): a CSV line cannot be
    skipped safely, since it may open a quoted field that later lines continue."""
    for number, line in enumerate(iter(lambda: handle.readline(limit + 1), ""), start=1):
        if len(line) > limit:
            raise SourceError(f"{path}: line {number} is longer than {limit:,} characters, more than a row of at most "
                              "--max-chars characters needs; nothing after it can be read reliably")
        yield line


def _read_parquet(path: Path, text_column: str) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = shown_name(path.name)
    try:
        # Without pre-buffering: with it, every row group read stayed in memory until the file's end.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
    _require_unique(parquet.schema_arrow.names, path, text_column)
    id_column = _id_column(parquet.schema_arrow.names, path)
    _require_text(parquet.schema_arrow.names, path, text_column)
    structs = [field.name for field in parquet.schema_arrow if pa.types.is_struct(field.type)]
    number = 0
    try:
        for record_batch in parquet.iter_batches(batch_size=1024):
            for record in record_batch.to_pylist():
                number += 1
                for column in structs:
                    record[column] = _set_fields(record[column])
                yield _table_row(f"{name}:row {number}", name, record, id_column, text_column)
    except (OSError, pa.ArrowException) as exc:  # a corrupt page: pyarrow's message names no file
        raise SourceError(f"{path}: row {number + 1}: {first_line(exc)}; nothing after it can be read reliably") from None


def _set_fields(value: Any) -> Any:
    """A Parquet struct has every row's keys, null where a row has none: only the keys a row sets."""
    if isinstance(value, dict):
        return {key: _set_fields(item) for key, item in value.items() if item is not None}
    return value


@contextmanager
def _open_text(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """Open a table file as text (UTF-8, or UTF-16/32 by its BOM); undecodable bytes survive as
    surrogates for a per-row check."""
    try:
        with open(path, "rb") as probe:
            head = probe.read(4)
        encoding = next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8-sig")
        handle = open(path, encoding=encoding, errors="surrogateescape", newline=newline)
    except OSError as exc:
        raise SourceError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with handle:
        yield handle
