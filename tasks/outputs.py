"""Files a run writes: the quarantine Parquet (one row per rejected input row, with the reason)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
