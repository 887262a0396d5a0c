"""The answer flow: questions -> validate -> retrieve -> prompts -> generate (vLLM) -> checkpointed Parquet."""

from __future__ import annotations

import flows  # noqa: F401  the environment defaults, also when a Prefect worker loads this file as a script

import time
from collections.abc import Iterator
from functools import cache

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks import steps
from tasks.child_process import end_descendants_with_this_process
from tasks.answering import AnswerReport, Pending, answer_rows
from tasks.concurrency import exclusive
from tasks.errors import SourceError
from tasks.generation import answer_settings, open_generator, sampling_config
from tasks.locks import OutputLock
from tasks.outputs import AnswerCheckpoint, QuarantineWriter, artifact_key, run_file, sample_markdown
from tasks.progress import RunProgress
from tasks.prompts import PromptBuilder, load_template
from tasks.questions import count_questions, read_questions, to_question
from tasks.retrieval import open_retriever
from tasks.secrets import qdrant_api_key
from tasks.settings import AnswerParams
from tasks.sources import SourceRow, batched
from tasks.store import QdrantStore
from tasks.validation import DocumentValidator


@flow(name="answer", description="Answer a question set with retrieval from Qdrant and a local LLM, into Parquet.")
def answer(params: AnswerParams) -> AnswerReport:
    started = time.perf_counter()
    end_descendants_with_this_process()  # Prefect's temporary API server outlived a killed run
    run_id = str(flow_run.get_id() or "local")
    rows = read_questions(params.questions, params.format, max_chars=params.max_question_chars)
    template = load_template(params.prompt_template)
    # The output's lock after the store's slot: on an embedded store (one slot), a deployment run queued
    # behind another into the same output then resumes the finished output instead of refusing. With a
    # Qdrant server there is no slot to queue on, and the second run refuses at once.
    with exclusive(params.store, params.collection, writes=False), OutputLock(params.out):
        report, head = _answer(params, rows, template, run_id)
    report.seconds = round(time.perf_counter() - started, 3)
    create_table_artifact([report.model_dump()], key=artifact_key("answer-summary", params.collection), description="Answer run summary")
    create_markdown_artifact(sample_markdown(head, limit=5), key=artifact_key("answer-sample", params.collection),
                             description="First answers with their sources")
    get_run_logger().info("answer finished: %s", report.model_dump_json())
    return report


def _answer(params: AnswerParams, rows: Iterator[SourceRow], template: str, run_id: str):
    logger = get_run_logger()
    store = QdrantStore.connect(params.store, api_key=qdrant_api_key(params.qdrant_api_key_block))
    try:
        retriever = open_retriever(store, params.collection, params.retrieval, fusion=params.fusion,
                                   embed_batch_size=params.embed_batch_size, backend=params.embedding_backend,
                                   data_dir=params.data_dir, gpu_share=params.embedding_gpu_share)
        settings = answer_settings(params, template, physical_collection=store.resolve(params.collection))
        checkpoint = AnswerCheckpoint(params.out, settings=settings, replace_output=params.overwrite)
        checkpoint.prepare()  # before the engine starts: an unusable --out fails here
        answered = checkpoint.answered()
        generator, chat_format = open_generator(params)
        sampling = sampling_config(params)
        validator = DocumentValidator(max_chars=params.max_question_chars, text_label="question")

        @cache
        def prompt_builder() -> PromptBuilder:
            return PromptBuilder(chat=chat_format(), template=template,
                                 max_model_len=generator.max_model_len, max_tokens=params.max_tokens)

        report = AnswerReport(collection=params.collection, model=params.llm_model, output=str(params.out), run_id=run_id)
        quarantine_path = run_file(params.data_dir, params.collection, run_id, "questions-quarantine.parquet")
        progress = RunProgress(key=artifact_key("answer-progress", params.collection), label=f"answer {params.collection}",
                               total=count_questions(params.questions, params.format, max_chars=params.max_question_chars),
                               terminal=params.show_progress)
        batches = batched(rows, params.batch_questions)
        question_ids: list[str] = []  # the valid questions in input order: what the output answers
        generated = 0  # questions the model answered in this run, for its rates
        with QuarantineWriter(quarantine_path, run_id=run_id) as quarantine:
            while (batch := steps.load(batches)) is not None:
                valid, rejected = steps.validate(validator, batch)
                quarantine.write(rejected)
                question_ids += (row.doc_id for row in valid)
                questions = [to_question(row) for row in valid]
                part = [Pending(question) for question in questions if answered.get(question.id) != question.digest]
                report.questions += len(batch)
                report.quarantined += len(rejected)
                report.resumed += len(valid) - len(part)
                if part:
                    clock = time.perf_counter()
                    steps.retrieve(part, store, retriever, top_k=params.top_k, score_threshold=params.score_threshold)
                    retrieve_s = time.perf_counter() - clock
                    steps.prompts(part, prompt_builder())
                    clock = time.perf_counter()
                    steps.generate(part, generator, sampling)
                    generate_s = time.perf_counter() - clock
                    steps.write(checkpoint, answer_rows(part, model=params.llm_model, sampling=sampling, run_id=run_id,
                                                        timings={"retrieve_s": retrieve_s, "generate_s": generate_s}))
                    report.generate_seconds += generate_s
                    generated += sum(i.completion is not None for i in part)  # the model's answers, not failed questions
                    report.prompt_tokens += sum(i.completion.prompt_tokens for i in part if i.completion)
                    report.output_tokens += sum(i.completion.completion_tokens for i in part if i.completion)
                    logger.info("answered %d questions (%d so far)", len(part), report.questions - report.quarantined)
                progress.advance(len(batch))
        progress.close()
        if not report.questions:
            raise SourceError(f"{params.questions}: no questions found; nothing was answered")
        report.quarantine_path = str(quarantine_path)
        merged = checkpoint.finalize(question_ids)
    finally:
        store.close()
    report.failed = merged.failed
    report.answered = merged.rows - merged.failed
    if report.generate_seconds:
        report.prompts_per_s = round(generated / report.generate_seconds, 2)
        report.output_tokens_per_s = round(report.output_tokens / report.generate_seconds, 1)
    return report, merged.head
