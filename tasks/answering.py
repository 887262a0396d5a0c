"""Answering a part of a question set: each question carries its hits, prompt, completion or error."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from tasks.llm import Completion, Generator, SamplingConfig
from tasks.prompts import Prompt, PromptBuilder, PromptTooLong, find_citations
from tasks.questions import Question, filter_json
from tasks.retrieval import Hit, InvalidFilter, Retriever, build_filter
from tasks.store import QdrantStore


class AnswerReport(BaseModel):
    """What an answer run did; the CLI prints it as JSON and the flow publishes it as an artifact."""

    collection: str
    model: str
    output: str
    questions: int = 0
    answered: int = 0
    failed: int = 0
    quarantined: int = 0
    resumed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    generate_seconds: float = 0.0
    seconds: float = 0.0
    prompts_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    quarantine_path: str = ""
    run_id: str = ""


@dataclass
class Pending:
    """One question on its way through retrieve -> prompt -> generate; `error` stops it early."""

    question: Question
    hits: list[Hit] = field(default_factory=list)
    prompt: Prompt | None = None
    completion: Completion | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def retrieve_part(
    part: list[Pending], store: QdrantStore, retriever: Retriever, *, top_k: int, score_threshold: float | None,
) -> None:
    """Fetch the passages of a part's questions in one batched query (questions embedded in one batch)."""
    queries: list[tuple[Pending, Any]] = []
    for item in part:
        try:
            query_filter = build_filter(item.question.filter)
        except InvalidFilter as exc:
            item.error = f"invalid filter: {exc}"
            continue
        if problem := store.filter_problem(query_filter):
            item.error = f"invalid filter: {problem}"
        else:
            queries.append((item, query_filter))
    if not queries:
        return
    results = retriever.search(store, [item.question.text for item, _ in queries], [f for _, f in queries],
                               top_k=top_k, score_threshold=score_threshold)
    for (item, _), hits in zip(queries, results, strict=True):
        item.hits = hits


def build_prompts(part: list[Pending], builder: PromptBuilder) -> None:
    """Each answerable question's prompt, or its error when not even one passage fits; built
    `builder.chat.concurrency` at a time, so a server's templating round trips overlap."""

    def build(item: Pending) -> None:
        try:
            item.prompt = builder.build(item.question.text, item.hits)
        except PromptTooLong as exc:
            item.error = str(exc)

    ready = [item for item in part if item.ok]
    threads = min(builder.chat.concurrency, len(ready))
    if threads <= 1:
        for item in ready:
            build(item)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prompts") as pool:
        list(pool.map(build, ready))  # the first error is raised and the questions not yet started are cancelled


def generate_part(part: list[Pending], generator: Generator, sampling: SamplingConfig) -> None:
    """All prompts of the part in one call, so the engine batches them continuously."""
    ready = [item for item in part if item.ok]
    completions = generator.generate([item.prompt.text for item in ready], sampling) if ready else []
    for item, completion in zip(ready, completions, strict=True):
        if completion.error is None:
            item.completion = completion
        else:
            item.error = completion.error


def answer_rows(
    part: list[Pending], *, model: str, sampling: SamplingConfig, timings: dict[str, float], run_id: str
) -> list[dict[str, Any]]:
    """One output row per question: the answer with its contexts, or the error."""
    now = datetime.now(timezone.utc)
    sampling_row = {
        "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
        "seed": sampling.seed, "stop": list(sampling.stop),
    }
    rows = []
    for item in part:
        passages = item.prompt.passages if item.prompt else item.hits
        completion = item.completion
        rows.append(
            {
                "question_id": item.question.id,
                "question": item.question.text,
                "filter": filter_json(item.question.filter),
                "answer": completion.text.strip() if completion else None,
                "error": item.error,
                "contexts": [
                    {"rank": h.rank, "score": h.score, "point_id": h.point_id, "doc_id": h.doc_id,
                     "chunk_index": h.chunk_index, "text": h.text, "source": h.source}
                    for h in passages
                ],
                "citations": find_citations(completion.text) if completion else [],
                "reference_answers": item.question.reference_answers,
                "model": model,
                "sampling": sampling_row,
                "prompt_tokens": completion.prompt_tokens if completion else (item.prompt.tokens if item.prompt else None),
                "completion_tokens": completion.completion_tokens if completion else None,
                "finish_reason": completion.finish_reason if completion else None,
                "dropped_passages": item.prompt.dropped if item.prompt else None,
                "timings": {"batch_questions": len(part), **timings},
                "run_id": run_id,
                "created_at": now,
            }
        )
    return rows
