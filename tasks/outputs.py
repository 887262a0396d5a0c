"""Files a run writes: the quarantine Parquet (one row per rejected input row, with the reason)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.disk import no_space_is_one_line, remove_stale_temporaries, write_whole
from tasks.errors import RagbatchError, first_line
from tasks.questions import question_digest
from tasks.validation import QuarantinedRow

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("locator", pa.string(), nullable=False),
        pa.field("doc_id", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("rule", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def run_file(data_dir: Path, collection: str, run_id: str, name: str) -> Path:
    """`<data_dir>/runs/<collection>/<run_id>/<name>`, created on demand."""
    path = Path(data_dir) / "runs" / collection / run_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class QuarantineWriter:
    """Appends quarantined rows to one Parquet file as batches arrive; the file always exists after close."""

    def __init__(self, path: Path, *, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.rows = 0
        self._writer = pq.ParquetWriter(self.path, QUARANTINE_SCHEMA)

    def write(self, rows: Sequence[QuarantinedRow]) -> None:
        if not rows:
            return
        now = datetime.now(timezone.utc)
        table = pa.Table.from_pylist(
            [
                {
                    "locator": r.locator, "doc_id": r.doc_id, "source": r.source, "rule": r.rule,
                    "reason": r.reason, "run_id": self.run_id, "quarantined_at": now,
                }
                for r in rows
            ],
            schema=QUARANTINE_SCHEMA,
        )
        self._writer.write_table(table)
        self.rows += len(rows)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "QuarantineWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


CONTEXT_TYPE = pa.struct(
    [
        pa.field("rank", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("point_id", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("chunk_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string()),
    ]
)
SAMPLING_TYPE = pa.struct(
    [
        pa.field("temperature", pa.float32()),
        pa.field("top_p", pa.float32()),
        pa.field("max_tokens", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("stop", pa.list_(pa.string())),
    ]
)
TIMINGS_TYPE = pa.struct(
    [
        pa.field("batch_questions", pa.int32()),
        pa.field("retrieve_s", pa.float64()),
        pa.field("generate_s", pa.float64()),
    ]
)
ANSWER_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("filter", pa.string()),  # the question's filter as JSON (sorted keys), if any
        pa.field("answer", pa.string()),
        pa.field("error", pa.string()),
        pa.field("contexts", pa.list_(CONTEXT_TYPE), nullable=False),
        pa.field("citations", pa.list_(pa.int32()), nullable=False),
        pa.field("reference_answers", pa.list_(pa.string()), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("sampling", SAMPLING_TYPE, nullable=False),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("dropped_passages", pa.int32()),
        pa.field("timings", TIMINGS_TYPE, nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class ResumeMismatch(RagbatchError):
    """An output or its parts hold answers made with other settings than this run's, or are no answers file."""


SETTINGS_KEY = b"ragbatch.answer_settings"
REPLACING_MARKER = "replacing-the-output.json"  # in the parts directory: an --overwrite run's parts, with its settings
OUTPUT_ROW_GROUP = 1024  # rows per row group of the merged output
REORDER_BUCKET = 16_384  # output places per bucket when the merge reorders: what it holds in memory then
PLACE = "__place"  # a bucket's column of each row's place in the output


@dataclass(frozen=True)
class Finalized:
    """The merged output: its rows, how many of them are errors, and its first rows for a quick look."""

    rows: int
    failed: int
    head: pa.Table


class AnswerCheckpoint:
    """Answer rows checkpointed as Parquet parts beside the output, so a re-run skips finished questions.

    Each part is written to a temporary name and renamed, so a killed process never leaves half a
    part. `finalize` writes the output with each question exactly once (also atomically), streaming.
    Parts and output record `settings`, what shaped the answers (model, prompt, retrieval, sampling); a
    run with other settings refuses to resume them rather than mix answers of both in one file. A row
    counts as done for its question only while the question, its filter and references are unchanged.
    `replace_output` (--overwrite) ignores the earlier output, which the merged one replaces at the end;
    a marker in the parts directory says so until then, so a killed --overwrite run resumes as one.
    """

    def __init__(self, output: Path, settings: dict[str, Any] | None = None, *, replace_output: bool = False) -> None:
        self.output = Path(output)
        self.parts_dir = self.output.with_name(self.output.name + ".parts")
        self.replace_output = replace_output
        self._marker = self.parts_dir / REPLACING_MARKER
        recorded = json.dumps(settings or {}, sort_keys=True)
        self.settings = json.loads(recorded)  # as read back: tuples are lists
        self._recorded = recorded
        self._schema = ANSWER_SCHEMA.with_metadata({SETTINGS_KEY: recorded})

    def prepare(self) -> None:
        """Try a write in the parts directory (beside the output) before any answer is made: an unusable
        --out fails the run at its start, not after the engine start and a part's answers. With
        `replace_output`, earlier parts go first, unless they are a killed --overwrite run's with these
        settings, and the marker is written."""
        resuming_replacement = self._marker.is_file() and self._marker.read_text() == self._recorded
        if self.replace_output and not resuming_replacement:
            self.reset_parts()
        created = not self.parts_dir.exists()
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            if self.replace_output:
                write_whole(self._marker, lambda temporary: temporary.write_text(self._recorded))
            with tempfile.NamedTemporaryFile(dir=self.parts_dir, suffix=".tmp"):
                pass
        except OSError as exc:
            raise ResumeMismatch(f"{self.output}: cannot write answers there ({exc.strerror or exc})") from None
        if created and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()  # made again by the first part; a run failing before one leaves nothing

    @property
    def _replacing(self) -> bool:
        return self.replace_output or self._marker.is_file()

    def answered(self) -> dict[str, bytes]:
        """Per question id answered (or failed) in earlier parts or output: the digest of the question
        that row answered (`Question.digest`); a later row of an id replaces an earlier one."""
        answered: dict[str, bytes] = {}
        for path in self._sources():
            self._require_same_settings(path)
            for batch in self._batches(path, ["question_id", "question", "filter", "reference_answers"]):
                for question_id, text, filter_text, references in zip(*(column.to_pylist() for column in batch.columns)):
                    answered[question_id] = question_digest(text, filter_text, references)
        return answered

    def _require_same_settings(self, path: Path) -> None:
        with self._reading(path):
            schema = pq.read_schema(path)
        if missing := [name for name in ANSWER_SCHEMA.names if name not in schema.names]:
            raise ResumeMismatch(f"{path}: not an answers file of this version of `ragbatch answer` (no column "
                                 f"{missing[0]!r}); {self._remedy(path)}")
        recorded = (schema.metadata or {}).get(SETTINGS_KEY)
        if recorded is None:  # every answers file with these columns records them: this one was written otherwise
            raise ResumeMismatch(f"{path}: records no settings of `ragbatch answer`, so its answers cannot be resumed; "
                                 f"{self._remedy(path)}")
        earlier = json.loads(recorded)
        changed = sorted(key for key in earlier.keys() | self.settings.keys() if earlier.get(key) != self.settings.get(key))
        if changed:
            raise ResumeMismatch(f"{self.output}: holds answers made with other settings ({', '.join(changed)}); "
                                 "--overwrite replaces them, or give another --out")

    def write_part(self, rows: list[dict]) -> Path:
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        number = len(self._parts())
        path = self.parts_dir / f"part-{number:06d}.parquet"
        while path.exists():
            number += 1
            path = self.parts_dir / f"part-{number:06d}.parquet"
        with no_space_is_one_line(self.parts_dir, "writing answers (finished questions are kept)"):
            table = pa.Table.from_pylist(rows, schema=self._schema)
            write_whole(path, lambda temporary: pq.write_table(table, temporary))
        return path

    def finalize(self, question_ids: Sequence[str]) -> Finalized:
        """Merge the earlier output and all parts into the output: one row per id of `question_ids` (the
        run's questions), in that order, each id's latest row. Rows of other ids, questions since removed
        from the set or now quarantined, are dropped, so the output answers exactly the questions the run
        counted. Streams, in memory bounded by a row group (in the sources' order, a fresh run's) or by
        a bucket of REORDER_BUCKET rows (a set reordered since its parts were written)."""
        position = {question_id: index for index, question_id in enumerate(question_ids)}
        sources = self._sources()
        positions: list[np.ndarray] = []  # per source and row: its place in the output, -1 if it has none
        for path in sources:
            ids = [question_id for batch in self._batches(path, ["question_id"]) for question_id in batch.column(0).to_pylist()]
            positions.append(np.array([position.get(question_id, -1) for question_id in ids], dtype=np.int64))
        placed = np.zeros(len(question_ids), dtype=bool)  # an id's last row wins: walk back, drop the earlier ones
        for places in reversed(positions):
            for row in reversed(np.nonzero(places >= 0)[0]):
                if placed[places[row]]:
                    places[row] = -1
                else:
                    placed[places[row]] = True
        kept = np.concatenate([places[places >= 0] for places in positions]) if positions else np.zeros(0, np.int64)
        in_order = bool(np.all(np.diff(kept) > 0))
        remove_stale_temporaries(self.output)  # a merge killed mid-write; this run holds the output's lock
        self.output.parent.mkdir(parents=True, exist_ok=True)
        merged: list[Finalized] = []

        def write(temporary: Path) -> None:
            rows = failed = 0
            head = self._schema.empty_table()
            # In order (a fresh run's parts), the rows as read; else through buckets.
            tables = (table for table, _ in self._kept_rows(sources, positions)) if in_order \
                else self._reordered(sources, positions)
            with pq.ParquetWriter(temporary, self._schema) as writer:
                for table in tables:
                    writer.write_table(table, row_group_size=OUTPUT_ROW_GROUP)
                    if head.num_rows < 5:
                        head = pa.concat_tables([head, table.slice(0, 5 - head.num_rows).replace_schema_metadata(head.schema.metadata)])
                    rows += table.num_rows
                    failed += table.num_rows - table.column("error").null_count
            merged.append(Finalized(rows, failed, head))

        with no_space_is_one_line(self.output.parent, f"writing {self.output.name} (every answer is kept in its parts)"):
            write_whole(self.output, write)
        self.reset_parts()
        return merged[0]

    def _kept_rows(self, sources: list[Path], positions: list[np.ndarray]) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """Each row group's rows that have a place in the output, with their places; one group at a time."""
        for path, places in zip(sources, positions, strict=True):
            with self._reading(path):
                parquet = pq.ParquetFile(path)
                first = 0
                for group in range(parquet.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    wanted = np.nonzero(places[first:first + size] >= 0)[0]
                    if len(wanted):
                        table = parquet.read_row_group(group).select(ANSWER_SCHEMA.names).cast(ANSWER_SCHEMA)
                        yield table.take(pa.array(wanted)), places[first + wanted]
                    first += size

    def _reordered(self, sources: list[Path], positions: list[np.ndarray]) -> Iterator[pa.Table]:
        """The kept rows in the output's order, in two passes: each row goes to the bucket file of its
        place (REORDER_BUCKET places each, in the parts directory), then each bucket is read and sorted."""
        buckets = self.parts_dir / "reorder"
        buckets.mkdir(parents=True, exist_ok=True)
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            for table, places in self._kept_rows(sources, positions):
                table = table.append_column(PLACE, pa.array(places))
                bucket_of = places // REORDER_BUCKET
                for bucket in np.unique(bucket_of):
                    piece = table.filter(pa.array(bucket_of == bucket))
                    if bucket not in writers:
                        writers[bucket] = pq.ParquetWriter(buckets / f"{bucket:09d}.parquet", piece.schema)
                    writers[bucket].write_table(piece)
        finally:
            for writer in writers.values():
                writer.close()
        for bucket in sorted(writers):
            path = buckets / f"{bucket:09d}.parquet"
            table = pq.read_table(path).sort_by(PLACE).drop_columns([PLACE])
            path.unlink()
            for start in range(0, table.num_rows, OUTPUT_ROW_GROUP):
                yield table.slice(start, OUTPUT_ROW_GROUP)

    def reset_parts(self) -> None:
        """Remove the parts directory, with any temporary file a killed write left in it."""
        shutil.rmtree(self.parts_dir, ignore_errors=not self.parts_dir.exists())

    def _sources(self) -> list[Path]:
        """The earlier output (unless replaced) and the parts, oldest first."""
        earlier = [self.output] if self.output.exists() and not self._replacing else []
        return earlier + self._parts()

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.exists() else []

    def _batches(self, path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
        with self._reading(path):
            yield from pq.ParquetFile(path).iter_batches(columns=columns, batch_size=8192)

    @contextmanager
    def _reading(self, path: Path) -> Iterator[None]:
        """A file at --out (or among its parts) that is no answers file is one line, not a traceback. The
        system's own errors (memory, disk, permissions: they carry an errno) pass unchanged."""
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, MemoryError) or getattr(exc, "errno", None) is not None:
                raise
            raise ResumeMismatch(f"{path}: not an answers file of `ragbatch answer` ({first_line(exc)}); "
                                 f"{self._remedy(path)}") from None

    def _remedy(self, path: Path) -> str:
        return "remove it or give another --out" if path.parent == self.parts_dir else "give another --out, or --overwrite to replace it"


# Kinds of artifact per collection; none is another's prefix, or "ingest" of a collection named
# "progress-kb" was "ingest-progress" of "kb".
ARTIFACT_KINDS = frozenset({"ingest-counts", "ingest-validation", "ingest-progress", "answer-summary", "answer-sample",
                            "answer-progress", "evaluation-summary", "evaluation-queries", "evaluation-progress"})
_ARTIFACT_KEY = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def artifact_key(kind: str, collection: str) -> str:
    """The key of one kind of artifact of a collection (Prefect allows lowercase letters, digits and
    dashes), one per collection: a name that is no key itself gets a hash of it, or "kb_v1", "kb.v1"
    and "KB-v1" shared one history in the UI."""
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    if _ARTIFACT_KEY.fullmatch(collection):
        return f"{kind}-{collection}"
    digest = hashlib.sha256(collection.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return "-".join([kind, *re.findall(r"[a-z0-9]+", collection.lower()), digest])


def sample_markdown(table: pa.Table, *, limit: int) -> str:
    """The first answers of an output with their sources, for a quick look in the UI."""
    lines = ["# First answers", ""]
    for row in table.slice(0, limit).to_pylist():
        lines.append(f"**{row['question_id']}**: {row['question']}")
        lines.append("")
        reply = row["answer"] if row["error"] is None else f"error: {row['error']}"
        lines += [f"> {line}" for line in reply.splitlines() or [""]]  # every line, or the quote ends early
        sources = ", ".join(f"[{c['rank']}] {c['source']}" for c in row["contexts"])
        lines += ["", f"Sources: {sources or 'none'}", ""]
    return "\n".join(lines)
