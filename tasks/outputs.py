"""Files a run writes: the quarantine Parquet (one row per rejected input row, with the reason)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.disk import no_space_is_one_line, write_whole
from tasks.errors import RagbatchError
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
    """An output or its parts hold answers made with other settings than this run's."""


SETTINGS_KEY = b"ragbatch.answer_settings"


class AnswerCheckpoint:
    """Answer rows checkpointed as Parquet parts beside the output, so a re-run skips finished questions.

    Each part is written to a temporary name and renamed, so a killed process never leaves half a
    part. `finalize` writes the output with each question exactly once (also atomically). Parts and
    output record `settings`, what shaped the answers (model, prompt, retrieval, sampling); a run with
    other settings refuses to resume them rather than mix answers of both in one file.
    """

    def __init__(self, output: Path, settings: dict[str, Any] | None = None) -> None:
        self.output = Path(output)
        self.parts_dir = self.output.with_name(self.output.name + ".parts")
        recorded = json.dumps(settings or {}, sort_keys=True)
        self.settings = json.loads(recorded)  # as read back: tuples are lists
        self._schema = ANSWER_SCHEMA.with_metadata({SETTINGS_KEY: recorded})

    def reset(self) -> None:
        """Forget earlier results (the --overwrite case)."""
        self.reset_parts()
        self.output.unlink(missing_ok=True)

    def done_ids(self) -> set[str]:
        """Question ids already answered (or failed) in earlier parts or an earlier final output."""
        done: set[str] = set()
        for path in [*self._parts(), *([self.output] if self.output.exists() else [])]:
            self._require_same_settings(path)
            done.update(pq.read_table(path, columns=["question_id"]).column("question_id").to_pylist())
        return done

    def _require_same_settings(self, path: Path) -> None:
        recorded = (pq.read_schema(path).metadata or {}).get(SETTINGS_KEY)
        if recorded is None:
            return  # written before settings were recorded
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

    def finalize(self, question_ids: Sequence[str]) -> pa.Table:
        """Merge the earlier output and all parts into the output: one row per id of `question_ids` (the
        run's questions), in that order. Rows of other ids, questions since removed from the set or now
        quarantined, are dropped, so the output answers exactly the questions the run counted."""
        position = {question_id: index for index, question_id in enumerate(question_ids)}
        sources = ([self.output] if self.output.exists() else []) + self._parts()
        tables = [pq.read_table(path, schema=ANSWER_SCHEMA) for path in sources]
        table = pa.concat_tables(tables) if tables else ANSWER_SCHEMA.empty_table()
        first_row: dict[str, int] = {}
        for index, question_id in enumerate(table.column("question_id").to_pylist()):
            if question_id in position:
                first_row.setdefault(question_id, index)
        keep = [first_row[question_id] for question_id in sorted(first_row, key=position.__getitem__)]
        table = table.take(pa.array(keep, type=pa.int64()))  # typed: an empty list would be a null array
        table = table.replace_schema_metadata(self._schema.metadata)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with no_space_is_one_line(self.output.parent, f"writing {self.output.name} (every answer is kept in its parts)"):
            write_whole(self.output, lambda temporary: pq.write_table(table, temporary))
        self.reset_parts()
        return table

    def reset_parts(self) -> None:
        """Remove the parts directory, with any temporary file a killed write left in it."""
        shutil.rmtree(self.parts_dir, ignore_errors=not self.parts_dir.exists())

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.exists() else []


def artifact_key(kind: str, collection: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-" + "".join(c if c.isalnum() else "-" for c in collection.lower())


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
