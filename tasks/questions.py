"""Question sets: JSONL/CSV/Parquet rows with an id, the question, optional references and a filter."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.errors import SourceError
from tasks.settings import QuestionFormat, SourceFormat
from tasks.sources import SourceRow, count_rows, read_rows

QUESTION_COLUMN = "question"
REFERENCE_COLUMNS = ("reference_answers", "reference_answer", "answers", "answer")


@dataclass(frozen=True)
class Question:
    """A validated question; `filter` restricts retrieval to points whose payload matches it."""

    id: str
    text: str
    locator: str
    reference_answers: list[str] = field(default_factory=list)
    filter: dict[str, Any] | None = None

    @property
    def digest(self) -> bytes:
        """What an answer row answered; a question edited since is answered again on resume."""
        return question_digest(self.text, filter_json(self.filter), self.reference_answers)


def filter_json(query_filter: dict[str, Any] | None) -> str | None:
    """A question's filter as its output row records it: JSON with sorted keys, or None."""
    return None if query_filter is None else json.dumps(query_filter, sort_keys=True, ensure_ascii=False)


def question_digest(text: str, filter_text: str | None, references: Sequence[str]) -> bytes:
    """The question, filter and references of an answer row, in 16 bytes (one per question in memory)."""
    encoded = json.dumps([text, filter_text, list(references)], ensure_ascii=False).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(encoded, digest_size=16).digest()


def read_questions(path: Path, fmt: QuestionFormat = QuestionFormat.auto, *, max_chars: int) -> Iterator[SourceRow]:
    """The rows of a question set file (`read_rows` with the question column). A directory is refused:
    read as documents, or as a BEIR dataset's corpus, its documents were answered as questions."""
    if Path(path).is_dir():
        raise SourceError(f"{path}: a directory; a question set is a JSONL, CSV or Parquet file "
                          "(`ragbatch evaluate --dataset` reads a BEIR dataset's queries)")
    return read_rows(path, SourceFormat(fmt.value), text_column=QUESTION_COLUMN, max_chars=max_chars)


def count_questions(path: Path, fmt: QuestionFormat = QuestionFormat.auto, *, max_chars: int) -> int | None:
    """How many rows `read_questions` yields, for progress; None if unknown."""
    return count_rows(path, SourceFormat(fmt.value), max_chars=max_chars)


def to_question(row: SourceRow) -> Question:
    """Read references and the filter from a validated row's extra columns."""
    assert row.doc_id is not None and row.text is not None
    references: list[str] = []
    for name in REFERENCE_COLUMNS:
        value = json_cell(row.metadata.get(name))
        if value is not None:
            references = [str(v) for v in value if v is not None] if isinstance(value, list) else [str(value)]
            break
    query_filter = json_cell(row.metadata.get("filter"))
    return Question(row.doc_id, row.text, row.locator, references, query_filter if query_filter not in ("", None, {}) else None)


def json_cell(value: Any) -> Any:
    """CSV cells hold lists and objects as JSON text; decode those, keep everything else."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
