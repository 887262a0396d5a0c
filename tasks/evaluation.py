"""Evaluation datasets, per-query rows and the run summary.

Datasets: a BEIR directory (queries.jsonl and qrels/<split>.tsv; the queries judged in that split)
or a question set with reference answers, whose `relevant_doc_ids` or `source` column names the
relevant documents. Retrieval is scored on documents: a document ranks where its best chunk ranks.
A BEIR split is a published benchmark, scored whole or refused, so that its numbers compare with
published ones; a question set's unusable rows are quarantined by the answer flow's rules, so both
flows take the same questions from one file.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.disk import no_space_is_one_line, write_whole
from tasks.errors import SourceError, StoreError, first_line
from tasks.indexing import read_markers
from tasks.metrics import RETRIEVAL_MEASURES, citation_checks, exact_match, rank_documents, retrieval_metrics, token_f1
from tasks.questions import json_cell, read_questions, to_question
from tasks.retrieval import InvalidFilter, build_filter
from tasks.sources import SourceRow, batched, row_id
from tasks.store import QdrantStore
from tasks.validation import DocumentValidator, QuarantinedRow

RELEVANT_COLUMNS = ("relevant_doc_ids", "source")
RANKING_KEPT = 100  # documents per query kept in the per-query output, and what recall@100 needs ranked
MAX_DEPTH = 16_000  # chunks a query is deepened to at most, for documents of many chunks
VALIDATION_BATCH = 1024
ANSWER_COLUMNS = ("question_id", "answer", "error", "contexts", "citations", "reference_answers")  # what is scored


@dataclass(frozen=True)
class EvalQuery:
    """One query with its relevance judgements (doc_id -> grade), reference answers and the filter its
    retrieval takes (a question set's `filter`, as the answer flow applies it)."""

    id: str
    text: str
    relevant: dict[str, int] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)
    filter: dict[str, Any] | None = None


def load_dataset(path: Path, split: str = "test", *, max_chars: int) -> tuple[list[EvalQuery], list[QuarantinedRow]]:
    """The queries of a BEIR split, or the usable questions of a question set and its quarantined rows
    (longer than `max_chars`, no id or text, a repeated id, unreadable); SourceError when none is usable."""
    path = Path(path)
    if path.is_dir():
        return _load_beir(path, split), []
    validator = DocumentValidator(max_chars=max_chars, text_label="question")
    queries: list[EvalQuery] = []
    quarantined: list[QuarantinedRow] = []
    for batch in batched(read_questions(path, max_chars=max_chars), VALIDATION_BATCH):
        valid, rejected = validator.validate(batch)
        quarantined += rejected
        for row in valid:
            relevant, problem = _relevant_doc_ids(row)
            if problem is not None:
                quarantined.append(QuarantinedRow(row.locator, row.doc_id, row.source, "relevant_doc_ids", problem))
                continue
            question = to_question(row)
            try:
                build_filter(question.filter)
            except InvalidFilter as exc:  # the answer flow fails the question for it
                quarantined.append(QuarantinedRow(row.locator, row.doc_id, row.source, "filter", f"invalid filter: {exc}"))
                continue
            queries.append(EvalQuery(question.id, question.text, dict.fromkeys(relevant, 1), question.reference_answers,
                                     question.filter))
    if not queries:
        if not quarantined:
            raise SourceError(f"{path}: no questions")
        first = quarantined[0]
        raise SourceError(f"{path}: no usable question ({len(quarantined)} quarantined; the first, {first.locator}: {first.reason})")
    return queries, quarantined


def _relevant_doc_ids(row: SourceRow) -> tuple[list[str], str | None]:
    """The row's relevant document ids (the first of RELEVANT_COLUMNS it has): one id, a list, or a CSV
    cell holding a JSON list; whole numbers are ids as text. An empty list says none (in every format).
    Else ([], why) for the quarantine."""
    name, value = next(((name, json_cell(row.metadata[name])) for name in RELEVANT_COLUMNS
                        if row.metadata.get(name) not in (None, "")), (None, None))
    ids = []
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        doc_id, _ = row_id(item)  # the rule for a source row's id: strings and whole numbers
        if doc_id is None:
            return [], f"{name} holds {item!r}, not a document id (a string or an integer)"
        ids.append(doc_id)
    return ids, None


def check_measurable(queries: Sequence[EvalQuery], *, dataset: Path, answers: Path | None) -> None:
    """Refuse, before any retrieval, a run with nothing to measure (no query with relevance judgements and
    no answers to score), answers that belong to another question set, and answers given twice to one
    question (which would be scored by whichever came last)."""
    if answers is None and not any(query.relevant for query in queries):
        raise SourceError(f"{dataset}: no question has relevance judgements (a {' or '.join(RELEVANT_COLUMNS)} field) "
                          "and no --answers to score: nothing to measure")
    if answers is not None:
        question_ids = _read_answers(answers, ["question_id"]).column("question_id").to_pylist()
        answered = set(question_ids)
        if len(answered) < len(question_ids):
            repeated, times = Counter(question_ids).most_common(1)[0]
            raise SourceError(f"{answers}: question {repeated!r} is answered {times} times; an output of `ragbatch answer` "
                              "answers each question once (were outputs joined?)")
        if not answered & {query.id for query in queries}:
            raise SourceError(f"{answers}: none of its {len(answered)} answers is for a question of {dataset}; "
                              "give the answers of `ragbatch answer` on this question set")


def _read_answers(path: Path, columns: list[str]) -> pa.Table:
    """`columns` of an answers Parquet, whose schema is checked whole (every column the answer metrics
    read, contexts naming their documents) before any is read: SourceError naming the file and the problem."""
    try:
        schema = pq.read_schema(path)
        missing = [name for name in ANSWER_COLUMNS if name not in schema.names]
        if missing:
            raise SourceError(f"{path}: not an answers Parquet of `ragbatch answer` (no column "
                              f"{', '.join(map(repr, missing))}; found: {', '.join(schema.names) or 'none'})")
        contexts = schema.field("contexts").type
        if not (pa.types.is_list(contexts) and pa.types.is_struct(contexts.value_type)
                and contexts.value_type.get_field_index("doc_id") >= 0):
            raise SourceError(f"{path}: not an answers Parquet of `ragbatch answer` (its contexts are {contexts}, "
                              "not a list of passages with a doc_id)")
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{path}: not an answers Parquet of `ragbatch answer` ({first_line(exc)})") from None


def _load_beir(path: Path, split: str) -> list[EvalQuery]:
    queries_path, qrels_path = path / "queries.jsonl", path / "qrels" / f"{split}.tsv"
    for required in (queries_path, qrels_path):
        if not required.is_file():
            raise SourceError(f"{path}: not a BEIR dataset with split {split!r} (missing {required.relative_to(path)})")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _text_lines(qrels_path):
        try:
            row = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])
        except csv.Error as exc:  # a carriage return inside the line, say
            raise SourceError(f"{qrels_path}:{number}: not a line of tab-separated columns ({exc})") from None
        if not "".join(row).strip() or (number == 1 and not row[-1].lstrip("-").isdigit()):
            continue  # a blank line (as in queries.jsonl), the header
        try:
            if len(row) != 3:
                raise ValueError
            query_id, doc_id, grade = row[0], row[1], int(row[2])
        except ValueError:
            trec = " (TREC qrels? drop the second, iteration column)" if len(row) == 4 else ""
            raise SourceError(f"{qrels_path}:{number}: expected three tab-separated columns, query-id, corpus-id and an "
                              f"integer score; found {len(row)} column{'s' * (len(row) != 1)}{trec}") from None
        judged = qrels.setdefault(query_id, {})  # a query judged only 0 scores 0, as in BEIR's scorer
        if judged.get(doc_id, grade) != grade:
            raise SourceError(f"{qrels_path}:{number}: query {query_id!r} judges corpus-id {doc_id!r} again with "
                              f"another score ({judged[doc_id]}, now {grade}); which one counts is not clear")
        judged[doc_id] = grade
    queries = []
    first_line_of: dict[str, int] = {}
    for number, line in _text_lines(queries_path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            (query_id, _), text = row_id(record["_id"]), record["text"]
        except (ValueError, RecursionError, KeyError, TypeError):
            query_id, text = None, None
        if query_id is None or not isinstance(text, str) or not text.strip():
            raise SourceError(f"{queries_path}:{number}: expected a JSON object with _id (a string or an integer) "
                              "and text (a string, not blank)")
        if query_id in first_line_of:
            raise SourceError(f"{queries_path}:{number}: query id {query_id!r} again (first on line {first_line_of[query_id]})")
        first_line_of[query_id] = number
        if query_id in qrels:
            queries.append(EvalQuery(query_id, text, qrels[query_id]))
    if not queries:
        raise SourceError(f"{path}: no query of {queries_path.name} is judged in qrels/{split}.tsv")
    if missing := sorted(qrels.keys() - first_line_of.keys()):
        raise SourceError(f"{qrels_path}: {len(missing)} judged queries are not in {queries_path.name} "
                          f"(the first: {', '.join(missing[:3])}); the split would not be scored whole")
    return queries


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A BEIR file's lines, numbered from 1, as text: a byte-order mark dropped, undecodable bytes one line
    naming the line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path}:{number}: not valid UTF-8 at byte {exc.start}") from None


def relevant_not_indexed(store: QdrantStore, collection: str, queries: Sequence[EvalQuery]) -> list[str]:
    """The relevant documents (grade > 0) that `collection` does not hold, sorted. They score as misses
    like any other, so a typo in a question set or judgements of another corpus would otherwise pass
    for bad retrieval. A document is held when its marker is (chunk 0, written last, so the whole document is)."""
    relevant = sorted({doc_id for query in queries for doc_id, grade in query.relevant.items() if grade > 0})
    held: set[str] = set()
    for batch in batched(relevant, VALIDATION_BATCH):
        held.update(read_markers(store, collection, batch))
    return [doc_id for doc_id in relevant if doc_id not in held]


def query_filters(queries: Sequence[EvalQuery], store: QdrantStore) -> dict[str, Any]:
    """Each query's Qdrant filter (None: unfiltered), by query id; a filter the store cannot apply as
    written is a StoreError naming the question (a filter that is no filter was quarantined at loading)."""
    filters = {query.id: build_filter(query.filter) for query in queries}
    for query_id, query_filter in filters.items():
        if problem := store.filter_problem(query_filter):
            raise StoreError(f"question {query_id!r}: its filter cannot be applied to this store ({problem})")
    return filters


def document_rankings(queries: Sequence[EvalQuery], search: Callable[[list[EvalQuery], int], list[list[str]]], *,
                      depth: int) -> dict[str, list[str]]:
    """Documents per query, ranked by their best chunk among the top `depth` chunks (`search`: queries and
    a depth in, each query's chunk doc_ids out, best first). A query whose chunks name fewer than
    RANKING_KEPT documents while the collection has more chunks is searched again twice as deep (up to
    MAX_DEPTH), so that recall@100 counts 100 documents also where documents have many chunks. A deeper
    search only appends documents: hybrid fusion over deeper branches would reorder the top ten, which
    the query's other measures read at `depth`. A pass that adds no document does not stop it: the next
    documents may lie past the chunks of those already ranked."""
    rankings: dict[str, list[str]] = {}
    pending = list(queries)
    while pending:
        results = search(pending, depth)
        deeper = []
        for query, doc_ids in zip(pending, results, strict=True):
            ranking = rankings.setdefault(query.id, [])
            seen = set(ranking)
            added = [doc_id for doc_id in rank_documents(doc_ids) if doc_id not in seen]
            ranking += added
            if len(ranking) < RANKING_KEPT and len(doc_ids) == depth < MAX_DEPTH:
                deeper.append(query)
        pending, depth = deeper, min(2 * depth, MAX_DEPTH)
    return rankings


def query_rows(queries: Sequence[EvalQuery], rankings: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One row per query: its ranked documents and, when it has judgements, every retrieval metric."""
    judged = {query.id: query.relevant for query in queries if query.relevant}
    metrics = retrieval_metrics(judged, rankings)
    return [
        {
            "query_id": query.id, "query": query.text,
            "ranked_doc_ids": list(rankings.get(query.id, []))[:RANKING_KEPT],
            "relevant_doc_ids": sorted(doc_id for doc_id, grade in query.relevant.items() if grade > 0),
            **(metrics.get(query.id) or dict.fromkeys(RETRIEVAL_MEASURES)),
        }
        for query in queries
    ]


def add_answer_metrics(rows: list[dict[str, Any]], queries: Sequence[EvalQuery], answers_path: Path) -> int:
    """Join an answers Parquet on query id and add answer metrics to the rows; returns answers matched."""
    table = _read_answers(answers_path, list(ANSWER_COLUMNS))
    answers = {row["question_id"]: row for row in table.to_pylist()}
    by_id = {query.id: query for query in queries}
    matched = 0
    for row in rows:
        answer = answers.get(row["query_id"])
        if answer is None:
            continue
        matched += 1
        query = by_id[row["query_id"]]
        text = answer["answer"] or ""
        references = query.references or answer["reference_answers"] or []
        checks = citation_checks(answer["citations"] or [], [c["doc_id"] for c in answer["contexts"] or []],
                                 query.relevant or None)
        row.update(
            answered=answer["error"] is None,
            exact_match=exact_match(text, references) if references else None,
            token_f1=token_f1(text, references) if references else None,
            cites=checks["citations"] > 0,
            **checks,
        )
    return matched


class EvaluateReport(BaseModel):
    """The summary of an evaluation run; metric names as in the literature (`ndcg@10`)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    collection: str
    dataset: str
    retrieval: str
    fusion: str | None = None
    questions: int = Field(0, description="Rows of the dataset (a BEIR split: its judged queries), measured or quarantined.")
    quarantined: int = Field(0, description="Unusable rows of a question set, each with its reason in quarantine_path.")
    queries: int = Field(0, description="Queries with relevance judgements, over which the retrieval metrics are means.")
    relevant_not_indexed: int = Field(0, description="Relevant documents named by the judgements that the collection does not hold (each scored as a miss).")
    ndcg_at_10: float | None = Field(None, alias="ndcg@10")
    recall_at_10: float | None = Field(None, alias="recall@10")
    recall_at_100: float | None = Field(None, alias="recall@100")
    mrr_at_10: float | None = Field(None, alias="mrr@10")
    answers: int | None = None
    exact_match: float | None = None
    token_f1: float | None = None
    answers_citing: float | None = Field(None, description="Share of answers that cite a passage.")
    citations_valid: float | None = Field(None, description="Share of citations that point at a passage that was given.")
    cited_relevant: float | None = Field(None, description="Share of citing answers whose cited passage comes from a relevant document.")
    per_query_path: str = ""
    summary_path: str = ""
    quarantine_path: str = ""
    seconds: float = 0.0
    run_id: str = ""


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarize(rows: Sequence[dict[str, Any]], **fields: Any) -> EvaluateReport:
    """Means over the judged queries (retrieval) and over the answered queries (answers)."""
    judged = [row for row in rows if row["ndcg@10"] is not None]
    report = EvaluateReport(queries=len(judged), **fields,
                            **{name: _mean([row[name] for row in judged]) for name in RETRIEVAL_MEASURES})
    answered = [row for row in rows if "cites" in row]
    if answered:
        citations = sum(row["citations"] for row in answered)
        report.answers = len(answered)
        report.exact_match = _mean([row["exact_match"] for row in answered])
        report.token_f1 = _mean([row["token_f1"] for row in answered])
        report.answers_citing = _mean([row["cites"] for row in answered])
        report.citations_valid = round(sum(row["valid_citations"] for row in answered) / citations, 4) if citations else None
        report.cited_relevant = _mean([row["cited_relevant"] for row in answered])
    return report


def write_outputs(rows: Sequence[dict[str, Any]], report: EvaluateReport, per_query_path: Path) -> None:
    """The per-query Parquet and, beside it, the summary JSON (`<name>.summary.json`), each whole or not
    at all: a run killed or out of disk space keeps the previous run's files intact."""
    per_query_path = Path(per_query_path)
    per_query_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path = per_query_path.with_name(per_query_path.stem + ".summary.json")
    report.per_query_path, report.summary_path = str(per_query_path), str(summary_path)
    with no_space_is_one_line(per_query_path.parent, f"writing {per_query_path.name}"):
        columns = list(dict.fromkeys(name for row in rows for name in row))  # answer metrics: only answered rows have them
        table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])
        write_whole(per_query_path, lambda temporary: pq.write_table(table, temporary))
        summary = json.dumps(report.model_dump(), indent=2) + "\n"
        write_whole(summary_path, lambda temporary: temporary.write_text(summary, encoding="utf-8"))
