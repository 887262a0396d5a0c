"""The answer flow: questions -> validate -> retrieve -> prompts -> generate (vLLM) -> checkpointed Parquet."""

from __future__ import annotations

import time
from functools import cache

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks import steps
from tasks.answering import AnswerReport, Pending, answer_rows
from tasks.generation import open_generator, sampling_config
from tasks.outputs import AnswerCheckpoint, QuarantineWriter, artifact_key, progress, run_file, sample_markdown
from tasks.prompts import PromptBuilder, load_template
from tasks.questions import QUESTION_COLUMN, to_question
from tasks.retrieval import open_retriever
from tasks.settings import AnswerParams
from tasks.sources import batched, read_rows
from tasks.store import QdrantStore
from tasks.validation import DocumentValidator


@flow(name="answer", description="Answer a question set with retrieval from Qdrant and a local LLM, into Parquet.")
def answer(params: AnswerParams) -> AnswerReport:
    started = time.perf_counter()
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    rows = read_rows(params.questions, params.format, text_column=QUESTION_COLUMN)
    template = load_template(params.prompt_template)
    store = QdrantStore.connect(params.store)
    try:
        retriever = open_retriever(store, params.collection, params.retrieval, fusion=params.fusion,
                                   embed_batch_size=params.embed_batch_size)
        generator, tokenizer = open_generator(params)
        sampling = sampling_config(params)
        checkpoint = AnswerCheckpoint(params.out)
        if params.overwrite:
            checkpoint.reset()
        done = checkpoint.done_ids()
        validator = DocumentValidator(max_chars=params.max_question_chars, text_label="question")

        @cache
        def prompt_builder() -> PromptBuilder:
            return PromptBuilder(tokenizer=tokenizer(), template=template,
                                 max_model_len=generator.max_model_len, max_tokens=params.max_tokens)

        report = AnswerReport(collection=params.collection, model=params.llm_model, output=str(params.out), run_id=run_id)
        quarantine_path = run_file(params.data_dir, params.collection, run_id, "questions-quarantine.parquet")
        with QuarantineWriter(quarantine_path, run_id=run_id) as quarantine:
            for batch in batched(progress(rows, params.show_progress, "answer"), params.batch_questions):
                valid, rejected = steps.validate(validator, batch)
                quarantine.write(rejected)
                part = [Pending(to_question(row)) for row in valid if row.doc_id not in done]
                report.questions += len(batch)
                report.quarantined += len(rejected)
                report.resumed += len(valid) - len(part)
                if not part:
                    continue
                clock = time.perf_counter()
                steps.retrieve(part, store, retriever, top_k=params.top_k,
                               score_threshold=params.score_threshold)
                retrieve_s = time.perf_counter() - clock
                steps.prompts(part, prompt_builder())
                clock = time.perf_counter()
                steps.generate(part, generator, sampling)
                generate_s = time.perf_counter() - clock
                checkpoint.write_part(answer_rows(part, model=params.llm_model, sampling=sampling, run_id=run_id,
                                                  timings={"retrieve_s": retrieve_s, "generate_s": generate_s}))
                report.generate_seconds += generate_s
                report.prompt_tokens += sum(i.completion.prompt_tokens for i in part if i.completion)
                report.output_tokens += sum(i.completion.completion_tokens for i in part if i.completion)
                logger.info("answered %d questions (%d so far)", len(part), report.questions - report.quarantined)
        report.quarantine_path = str(quarantine_path)
        table = checkpoint.finalize()
    finally:
        store.close()
    errors = table.column("error").to_pylist()
    report.failed = sum(e is not None for e in errors)
    report.answered = len(errors) - report.failed
    generated = report.questions - report.quarantined - report.resumed
    if report.generate_seconds:
        report.prompts_per_s = round(generated / report.generate_seconds, 2)
        report.output_tokens_per_s = round(report.output_tokens / report.generate_seconds, 1)
    report.seconds = round(time.perf_counter() - started, 3)
    create_table_artifact([report.model_dump()], key=artifact_key("answer", params.collection), description="Answer run summary")
    create_markdown_artifact(sample_markdown(table, limit=5), key=artifact_key("answer-sample", params.collection),
                             description="First answers with their sources")
    logger.info("answer finished: %s", report.model_dump_json())
    return report

