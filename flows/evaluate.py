"""The evaluate flow: dataset (unusable questions quarantined) -> retrieve (dense, sparse or hybrid) -> metrics per
query [+ answers] -> Parquet + summary."""

from __future__ import annotations

import flows  # noqa: F401  the environment defaults, also when a Prefect worker loads this file as a script

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from tasks import steps
from tasks.child_process import end_descendants_with_this_process
from tasks.evaluation import (EvaluateReport, add_answer_metrics, check_measurable, query_filters, query_rows, relevant_not_indexed,
                              summarize, write_outputs)
from tasks.concurrency import exclusive
from tasks.outputs import QuarantineWriter, artifact_key, run_file
from tasks.progress import RunProgress
from tasks.retrieval import open_retriever
from tasks.secrets import qdrant_api_key
from tasks.settings import EvaluateParams, RetrievalMode
from tasks.sources import batched
from tasks.store import QdrantStore

QUERY_BATCH = 64


@flow(name="evaluate", description="Measure retrieval (nDCG@10, recall, MRR) and answer quality on a BEIR dataset or question set.")
def evaluate(params: EvaluateParams) -> EvaluateReport:
    started = time.perf_counter()
    end_descendants_with_this_process()  # Prefect's temporary API server outlived a killed run
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or "local")
    queries, quarantined = steps.load_dataset(params.dataset, params.split, max_chars=params.max_question_chars)
    quarantine_path = run_file(params.data_dir, params.collection, run_id, "questions-quarantine.parquet")
    with QuarantineWriter(quarantine_path, run_id=run_id) as quarantine:
        quarantine.write(quarantined)
    check_measurable(queries, dataset=params.dataset, answers=params.answers)
    with exclusive(params.store, params.collection, writes=False):
        store = QdrantStore.connect(params.store, api_key=qdrant_api_key(params.qdrant_api_key_block))
        try:
            missing = relevant_not_indexed(store, params.collection, queries)
            if missing:
                logger.warning("%d relevant documents of %s are not in %s (each scored as a miss), such as %s",
                               len(missing), params.dataset, params.collection, ", ".join(map(repr, missing[:3])))
            filters = query_filters(queries, store)  # a filter this store cannot apply: one line, before any retrieval
            retriever = open_retriever(store, params.collection, params.retrieval, fusion=params.fusion,
                                       embed_batch_size=params.embed_batch_size, data_dir=params.data_dir)
            progress = RunProgress(key=artifact_key("evaluation-progress", params.collection),
                                   label=f"evaluate {params.collection}", total=len(queries), terminal=params.show_progress)
            rankings: dict[str, list[str]] = {}
            for batch in batched(queries, QUERY_BATCH):
                rankings.update(steps.rank_documents(batch, store, retriever, depth=params.depth, filters=filters))
                progress.advance(len(batch))
            progress.close()
        finally:
            store.close()
    rows = query_rows(queries, rankings)
    if params.answers is not None:
        matched = add_answer_metrics(rows, queries, params.answers)
        logger.info("%d of %d queries have an answer in %s", matched, len(rows), params.answers)
    report = summarize(
        rows, collection=params.collection, dataset=str(params.dataset), retrieval=params.retrieval.value,
        fusion=params.fusion.value if params.retrieval == RetrievalMode.hybrid else None, run_id=run_id,
        questions=len(queries) + len(quarantined), quarantined=len(quarantined), quarantine_path=str(quarantine_path),
        relevant_not_indexed=len(missing),
    )
    report.seconds = round(time.perf_counter() - started, 3)
    write_outputs(rows, report, params.out or run_file(params.data_dir, params.collection, run_id, "evaluation.parquet"))
    create_table_artifact([report.model_dump()], key=artifact_key("evaluation-summary", params.collection),
                          description=f"Evaluation summary ({params.retrieval.value} retrieval)")
    create_table_artifact(
        [{k: v for k, v in row.items() if k not in ("ranked_doc_ids", "relevant_doc_ids")} for row in rows],
        key=artifact_key("evaluation-queries", params.collection), description="Metrics per query",
    )
    logger.info("evaluate finished: %s", report.model_dump_json())
    return report
