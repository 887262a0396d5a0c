"""Evaluation datasets and per-query rows, without Prefect."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import steps
from tasks.chunking import Chunk
from tasks.errors import SourceError, StoreError
from tasks.evaluation import (MAX_DEPTH, RANKING_KEPT, EvalQuery, add_answer_metrics, check_measurable, document_rankings,
                              load_dataset, query_filters, query_rows, relevant_not_indexed, summarize, write_outputs)
from tasks.indexing import build_points, write_documents
from tasks.ingest import LAYOUTS
from tasks.retrieval import Retriever
from tasks.settings import RetrievalMode
from tasks.sparse import Bm25
from tasks.store import QdrantStore
from tasks.outputs import ANSWER_SCHEMA

from .conftest import ROOT

CORPUS = [
    {"_id": "d1", "title": "Soil probes", "text": "Calibrating the SM-40 soil moisture probe takes ten minutes in a bucket of wet sand."},
    {"_id": "d2", "title": "Rain gauges", "text": "The tipping bucket of a rain gauge must be cleaned of leaves every spring."},
    {"_id": "d3", "title": "Error codes", "text": "Error Q-7731 means the anemometer cable is unplugged."},
    {"_id": "d4", "title": "Solar power", "text": "A twenty watt solar panel keeps the station charged through winter."},
    {"_id": "d5", "title": "Holidays", "text": "Staff receive twenty-five days of paid annual leave."},
    {"_id": "d6", "title": "Travel", "text": "Train travel is preferred over flights for trips under five hours."},
]
QUERIES = [
    {"_id": "1", "text": "What does Q-7731 mean?"},
    {"_id": "2", "text": "How many vacation days do employees get per year?"},
    {"_id": "3", "text": "How do I clean a rain gauge?"},
    {"_id": "4", "text": "An unjudged query about solar panels"},
]
QRELS = "query-id\tcorpus-id\tscore\n1\td3\t1\n2\td5\t1\n3\td2\t2\n3\td1\t0\n"


def write_beir(root):
    """A BEIR-format dataset: corpus.jsonl, queries.jsonl, qrels/test.tsv (query 4 is not judged)."""
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    (root / "qrels" / "test.tsv").write_text(QRELS)
    return root


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "tiny-beir")


def test_beir_queries_are_those_judged_in_the_split(beir):
    queries, quarantined = load_dataset(beir, "test", max_chars=4000)
    assert [q.id for q in queries] == ["1", "2", "3"] and quarantined == []
    assert queries[2].relevant == {"d2": 2, "d1": 0}  # judged; grade 0 is not relevant
    [row] = query_rows(queries[2:], {"3": ["d1", "d4"]})
    assert row["relevant_doc_ids"] == ["d2"] and row["ndcg@10"] == 0.0
    with pytest.raises(SourceError, match=r"not a BEIR dataset with split 'dev' \(missing qrels/dev.tsv\)"):
        load_dataset(beir, "dev", max_chars=4000)
    # A benchmark is scored whole or refused: a repeated query would count twice in every mean.
    with open(beir / "queries.jsonl", "a") as queries_file:
        queries_file.write(json.dumps({"_id": "2", "text": "Again?"}) + "\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(beir, "test", max_chars=4000)
    assert str(refused.value) == f"{beir}/queries.jsonl:5: query id '2' again (first on line 2)"


@pytest.mark.parametrize("record", [{"_id": "1", "text": None}, {"_id": "1", "text": 7}, {"_id": "1", "text": " "},
                                    {"_id": None, "text": "Q?"}, {"_id": [1], "text": "Q?"}, ["1", "Q?"]])
def test_a_beir_query_without_an_id_or_a_text_is_refused_in_one_line(beir, record):
    """A null text was taken in and crashed retrieval with a bare traceback; a null id became the query 'None'."""
    lines = (beir / "queries.jsonl").read_text().splitlines()
    lines[0] = json.dumps(record)
    (beir / "queries.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(beir, "test", max_chars=4000)
    assert str(refused.value) == (f"{beir}/queries.jsonl:1: expected a JSON object with _id (a string or an integer) "
                                  "and text (a string, not blank)")


def test_a_beir_split_is_scored_whole_judged_queries_missing_or_judged_only_not_relevant(beir):
    """BEIR's scorer counts a query judged only 0 as 0; dropping it raised the mean. A judged query missing
    from queries.jsonl was dropped without a word."""
    (beir / "qrels" / "test.tsv").write_text(QRELS + "\n4\td4\t0\n\n")  # blank lines are skipped, as in queries.jsonl
    queries, _ = load_dataset(beir, "test", max_chars=4000)
    assert [q.id for q in queries] == ["1", "2", "3", "4"]
    [row] = query_rows(queries[3:], {"4": ["d4"]})
    assert row["relevant_doc_ids"] == [] and row["ndcg@10"] == 0.0 and row["recall@100"] == 0.0
    (beir / "qrels" / "test.tsv").write_text(QRELS + "7\td4\t1\n9\td1\t1\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(beir, "test", max_chars=4000)
    assert str(refused.value) == (f"{beir}/qrels/test.tsv: 2 judged queries are not in queries.jsonl (the first: 7, 9); "
                                  "the split would not be scored whole")
    # A judgement given twice alike is one; given twice differently, the metric would depend on line order.
    (beir / "qrels" / "test.tsv").write_text(QRELS + "3\td2\t2\n")
    assert load_dataset(beir, "test", max_chars=4000)[0][2].relevant == {"d2": 2, "d1": 0}
    (beir / "qrels" / "test.tsv").write_text(QRELS + "3\td2\t0\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(beir, "test", max_chars=4000)
    assert str(refused.value) == (f"{beir}/qrels/test.tsv:6: query '3' judges corpus-id 'd2' again with another score "
                                  "(2, now 0); which one counts is not clear")


def test_qrels_of_another_shape_and_undecodable_bytes_are_one_line(beir):
    """TREC qrels (query, iteration, document, grade) were read as document "0" with the document id as
    its grade, and every metric was 0; a byte that is not UTF-8 was a bare traceback."""
    qrels = beir / "qrels" / "test.tsv"
    qrels.write_text("1\t0\td3\t1\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(beir, "test", max_chars=4000)
    assert str(refused.value) == (f"{qrels}:1: expected three tab-separated columns, query-id, corpus-id and an integer "
                                  "score; found 4 columns (TREC qrels? drop the second, iteration column)")
    qrels.write_text(QRELS.replace("2\td5\t1", "2\td5"))
    with pytest.raises(SourceError, match=rf"^{qrels}:3: expected three tab-separated columns, .* found 2 columns$"):
        load_dataset(beir, "test", max_chars=4000)
    qrels.write_bytes(b"\xef\xbb\xbf" + QRELS.replace("\n", "\r\n").encode())  # a byte-order mark and CRLF (a Windows editor)
    assert [q.relevant for q in load_dataset(beir, "test", max_chars=4000)[0]] == [{"d3": 1}, {"d5": 1}, {"d2": 2, "d1": 0}]
    qrels.write_bytes(QRELS.encode() + b"3\td2\r\t2\n")  # a carriage return inside a line was a traceback
    with pytest.raises(SourceError, match=rf"^{qrels}:6: not a line of tab-separated columns \(new-line character seen"):
        load_dataset(beir, "test", max_chars=4000)
    qrels.write_bytes(QRELS.encode() + b"3\td\xe9\t1\n")
    with pytest.raises(SourceError, match=rf"^{qrels}:6: not valid UTF-8 at byte 3$"):
        load_dataset(beir, "test", max_chars=4000)
    qrels.write_text(QRELS)
    (beir / "queries.jsonl").write_bytes(b'{"_id": "1", "text": "caf\xe9?"}\n')
    with pytest.raises(SourceError, match=rf"^{beir}/queries.jsonl:1: not valid UTF-8 at byte 25$"):
        load_dataset(beir, "test", max_chars=4000)


def test_relevant_documents_as_a_list_a_json_list_in_a_csv_cell_or_a_number(tmp_path):
    """A CSV cell holding a JSON list was taken as one document id (every metric 0), a numeric id crashed
    the run; a value that is no document id is quarantined with its reason."""
    path = tmp_path / "q.csv"
    path.write_text('id,question,relevant_doc_ids\n'
                    'a,What does Q-7731 mean?,"[""d3"", ""d1""]"\n'
                    'b,How do I clean a rain gauge?,d2\n'
                    'c,Which probe?,"[{""doc"": ""d1""}]"\n')
    queries, quarantined = load_dataset(path, max_chars=4000)
    assert [(q.id, q.relevant) for q in queries] == [("a", {"d3": 1, "d1": 1}), ("b", {"d2": 1})]
    assert [(row.locator, row.rule, row.reason) for row in quarantined] == [
        ("q.csv:4", "relevant_doc_ids", "relevant_doc_ids holds {'doc': 'd1'}, not a document id (a string or an integer)")]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"id": "s", "question": "Which claim?", "source": 4983}) + "\n"
                     + json.dumps({"id": "t", "question": "Which one?", "relevant_doc_ids": [12.0, "d7"]}) + "\n")
    queries, quarantined = load_dataset(jsonl, max_chars=4000)
    assert [(q.id, q.relevant) for q in queries] == [("s", {"4983": 1}), ("t", {"12": 1, "d7": 1})] and quarantined == []
    # An empty list says no document is relevant, in every format (JSONL took `source` instead, CSV did not).
    jsonl.write_text(json.dumps({"id": "u", "question": "None?", "relevant_doc_ids": [], "source": "d9"}) + "\n")
    path.write_text('id,question,relevant_doc_ids,source\nu,None?,[],d9\n')
    assert [q.relevant for q in load_dataset(jsonl, max_chars=4000)[0]] == [q.relevant for q in load_dataset(path, max_chars=4000)[0]] == [{}]


def test_question_sets_name_relevant_documents_and_references(tmp_path):
    queries, quarantined = load_dataset(ROOT / "data" / "questions.jsonl", max_chars=4000)
    first = queries[0]
    assert (first.id, first.relevant, first.references) == ("q01", {"troubleshooting-guide.txt": 1}, ["wind sensor bus timeout"])
    assert len(queries) == 24 and quarantined == []
    # A null among the references became the reference "None", which an answer "None" matched exactly.
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "a", "question": "Which?", "reference_answers": [None, "x", 0]}) + "\n")
    [query], _ = load_dataset(tmp_path / "q.jsonl", max_chars=4000)
    assert query.references == ["x", "0"]


def test_a_question_sets_unusable_rows_are_quarantined_as_the_answer_flow_does(tmp_path):
    """Each row is measured or quarantined with its reason, never both, never neither; a repeated id is
    not measured twice. The answer flow's validator rejects the same rows of the same file."""
    from tasks.questions import QUESTION_COLUMN
    from tasks.sources import read_rows
    from tasks.validation import DocumentValidator

    lines = [
        json.dumps({"id": "a", "question": "What does Q-7731 mean?", "source": "d3"}),
        json.dumps({"id": "b", "question": "   ", "source": "d5"}),
        "{not json",
        json.dumps({"question": "No id here?", "source": "d1"}),
        json.dumps({"id": "a", "question": "The same id again?", "source": "d1"}),
        json.dumps({"id": "c", "question": "x" * 81, "source": "d2"}),
        json.dumps({"id": "d", "question": "How do I clean a rain gauge?", "relevant_doc_ids": ["d2"]}),
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    queries, quarantined = load_dataset(path, max_chars=80)
    assert [(q.id, q.relevant) for q in queries] == [("a", {"d3": 1}), ("d", {"d2": 1})]
    assert [(row.locator, row.rule) for row in quarantined] == [
        ("q.jsonl:2", "blank_text"), ("q.jsonl:3", "load_error"), ("q.jsonl:4", "missing_id"),
        ("q.jsonl:5", "duplicate_id"), ("q.jsonl:6", "too_long")]
    assert len(queries) + len(quarantined) == len(lines)
    answer_flow = DocumentValidator(max_chars=80, text_label="question")
    _, rejected = answer_flow.validate(list(read_rows(path, text_column=QUESTION_COLUMN, max_chars=80)))
    assert rejected == quarantined

    # The filter the answer flow retrieves with; one that is no filter fails the question there, is quarantined here.
    path.write_text(json.dumps({"id": "f", "question": "Which gauge?", "source": "d2", "filter": {"source": "d2"}}) + "\n"
                    + json.dumps({"id": "g", "question": "Which probe?", "source": "d1", "filter": {"source": 1.5}}) + "\n")
    queries, quarantined = load_dataset(path, max_chars=80)
    assert [(q.id, q.filter) for q in queries] == [("f", {"source": "d2"})]
    assert [(row.locator, row.rule, row.reason) for row in quarantined] == [
        ("q.jsonl:2", "filter", "invalid filter: filter value for 'source' must be a string, number, boolean, "
                                "or a list of strings or of integers")]

    path.write_text("\n".join(lines[1:3]) + "\n")
    with pytest.raises(SourceError) as refused:
        load_dataset(path, max_chars=80)
    assert str(refused.value) == f"{path}: no usable question (2 quarantined; the first, q.jsonl:1: question is empty or whitespace only)"
    path.write_text("")
    with pytest.raises(SourceError, match=rf"^{path}: no questions$"):
        load_dataset(path, max_chars=80)


def test_rows_summary_and_outputs(tmp_path):
    queries = [EvalQuery("a", "qa", {"x": 1}), EvalQuery("b", "qb", {"y": 1}), EvalQuery("c", "unjudged")]
    rows = query_rows(queries, {"a": ["x", "z"], "b": ["z", "y"], "c": ["x"]})
    assert [r["mrr@10"] for r in rows] == [1.0, 0.5, None]
    report = summarize(rows, collection="kb", dataset="d", retrieval="dense")
    assert report.queries == 2 and report.model_dump()["mrr@10"] == 0.75
    write_outputs(rows, report, tmp_path / "out" / "eval.parquet")
    assert pq.read_table(tmp_path / "out" / "eval.parquet").num_rows == 3
    assert json.loads((tmp_path / "out" / "eval.summary.json").read_text()) == report.model_dump()


def test_a_question_set_without_judgements_is_measured_by_its_answers_or_refused(tmp_path, capsys):
    """Retrieval measures of no judged query are not zeros; with no answers either, there is nothing to run."""
    from flows.cli import _print_evaluate

    queries = [EvalQuery("a", "qa", {}, ["wind sensor"]), EvalQuery("b", "qb")]
    with pytest.raises(SourceError, match=rf"^{tmp_path}/q.jsonl: no question has relevance judgements \(a relevant_doc_ids or source "
                                          r"field\) and no --answers to score: nothing to measure$"):
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=None)
    check_measurable([*queries, EvalQuery("c", "qc", {"x": 1})], dataset=tmp_path / "q.jsonl", answers=None)
    answers = answers_parquet(tmp_path / "answers.parquet", [("a", "Wind sensor.", ["x"], [])])
    check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=answers)
    other_set = answers_parquet(tmp_path / "other.parquet", [("z1", "?", [], []), ("z2", "?", [], [])])
    with pytest.raises(SourceError, match=rf"^{other_set}: none of its 2 answers is for a question of {tmp_path}/q.jsonl; give the"):
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=other_set)
    with pytest.raises(SourceError, match="not an answers Parquet"):
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=ROOT / "data" / "questions.jsonl")
    # Two outputs joined: question a answered twice, and the later answer would have been the one scored.
    joined = answers_parquet(tmp_path / "joined.parquet", [("a", "Wind sensor.", [], []), ("b", "?", [], []), ("a", "No.", [], [])])
    with pytest.raises(SourceError) as refused:
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=joined)
    assert str(refused.value) == (f"{joined}: question 'a' is answered 2 times; an output of `ragbatch answer` "
                                  "answers each question once (were outputs joined?)")
    # Some other Parquet: the columns it lacks, in one line (pyarrow's own message lists the schema over lines).
    pq.write_table(pa.table({"id": ["a"], "text": ["?"]}), tmp_path / "docs.parquet")
    with pytest.raises(SourceError) as refused:
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=tmp_path / "docs.parquet")
    assert str(refused.value) == (f"{tmp_path}/docs.parquet: not an answers Parquet of `ragbatch answer` (no column "
                                  "'question_id', 'answer', 'error', 'contexts', 'citations', 'reference_answers'; found: id, text)")
    # Checked whole before retrieval runs: a column the answer metrics read, or passages without their document.
    table = pq.read_table(answers)
    pq.write_table(table.drop_columns(["citations"]), tmp_path / "thin.parquet")
    with pytest.raises(SourceError, match=r"thin.parquet: not an answers Parquet of `ragbatch answer` \(no column 'citations';"):
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=tmp_path / "thin.parquet")
    contexts = pa.array([[{"rank": 1, "text": "t"}]] * table.num_rows)
    pq.write_table(table.set_column(table.schema.get_field_index("contexts"), "contexts", contexts), tmp_path / "odd.parquet")
    with pytest.raises(SourceError) as refused:
        check_measurable(queries, dataset=tmp_path / "q.jsonl", answers=tmp_path / "odd.parquet")
    assert str(refused.value) == (f"{tmp_path}/odd.parquet: not an answers Parquet of `ragbatch answer` (its contexts are "
                                  "list<element: struct<rank: int64, text: string>>, not a list of passages with a doc_id)")

    rows = query_rows(queries, {"a": ["x"], "b": ["y"]})
    add_answer_metrics(rows, queries, answers)
    report = summarize(rows, collection="kb", dataset="q.jsonl", retrieval="dense")
    assert report.queries == 0 and report.ndcg_at_10 is report.recall_at_10 is report.mrr_at_10 is None
    assert report.answers == 1 and report.exact_match == 1.0
    _print_evaluate(report.model_dump())
    assert capsys.readouterr().out.splitlines()[:2] == [
        "kb, dense retrieval, no query has relevance judgements (0.0 s)",
        "1 answers: exact_match 1.0000, token_f1 1.0000, answers_citing 0.0000"]


def answers_parquet(path, answers):
    rows = [
        {"question_id": qid, "question": "?", "answer": text, "error": None if text is not None else "failed",
         "contexts": [{"rank": i + 1, "score": 1.0, "point_id": "p", "doc_id": doc, "chunk_index": 0, "text": "t", "source": doc}
                      for i, doc in enumerate(docs)],
         "citations": cites, "reference_answers": references[0] if references else [], "model": "m",
         "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": 0, "stop": []},
         "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop", "dropped_passages": 0,
         "timings": {"batch_questions": 1, "retrieve_s": 0.0, "generate_s": 0.0}, "run_id": "r",
         "created_at": __import__("datetime").datetime.now(__import__("datetime").timezone.utc)}
        for qid, text, docs, cites, *references in answers
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), path)
    return path


def test_answer_metrics(tmp_path):
    queries = [EvalQuery("a", "qa", {"x": 1}, ["wind sensor bus timeout"]), EvalQuery("b", "qb", {"y": 1}, ["clock drift"]),
               EvalQuery("c", "qc", {"y": 1}, ["tipping bucket"])]
    path = answers_parquet(tmp_path / "answers.parquet", [
        ("a", "Wind sensor bus timeout [1].", ["x", "z"], [1]),      # exact, cites the relevant passage
        ("b", "It is clock drift [2] [5].", ["y", "z"], [2, 5]),     # F1 below; [5] was never given
        ("c", None, [], []),                                          # failed: no answer
    ])
    rows = query_rows(queries, {})
    assert add_answer_metrics(rows, queries, path) == 3
    report = summarize(rows, collection="kb", dataset="d", retrieval="dense")
    # "it is clock drift" vs "clock drift": 2 common tokens, P = 2/4, R = 1, F1 = 2/3.
    assert report.exact_match == pytest.approx(1 / 3, abs=1e-4)
    assert report.token_f1 == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-4)
    assert report.answers == 3 and report.answers_citing == pytest.approx(2 / 3, abs=1e-4)
    assert report.citations_valid == pytest.approx(2 / 3, abs=1e-4)  # [1], [2] valid; [5] not
    assert report.cited_relevant == 0.5  # a cites x (relevant); b cites z (not)
    with pytest.raises(SourceError, match="not an answers Parquet"):
        add_answer_metrics(rows, queries, ROOT / "data" / "questions.jsonl")


def test_each_rows_answer_metrics(tmp_path):
    """References come from the answers file where the question set has none; an unjudged query's
    citations are not judged (None, not False); a failed question is not answered."""
    queries = [EvalQuery("u", "qu", {}, []), EvalQuery("f", "qf", {"x": 1}, ["x"])]
    path = answers_parquet(tmp_path / "answers.parquet", [("u", "Anemometer [1].", ["x"], [1], ["anemometer"]), ("f", None, [], [])])
    rows = query_rows(queries, {})
    assert add_answer_metrics(rows, queries, path) == 2
    assert [(row["answered"], row["exact_match"], row["cited_relevant"]) for row in rows] == [(True, 1.0, None), (False, 0.0, None)]


def test_the_per_query_output_keeps_the_answer_metrics_when_the_first_query_has_no_answer(tmp_path):
    """The Parquet took its columns from the first row: an unanswered first query dropped every answer
    metric from the file, while the summary reported their means."""
    queries = [EvalQuery("a", "qa", {"x": 1}), EvalQuery("b", "qb", {"y": 1}, ["clock drift"])]
    rows = query_rows(queries, {"a": ["x"], "b": ["y"]})
    assert add_answer_metrics(rows, queries, answers_parquet(tmp_path / "answers.parquet", [("b", "Clock drift [1].", ["y"], [1])])) == 1
    report = summarize(rows, collection="kb", dataset="d", retrieval="dense")
    write_outputs(rows, report, tmp_path / "eval.parquet")
    written = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert [(row["query_id"], row["exact_match"], row["cites"], row["citations"]) for row in written] == [
        ("a", None, None, None), ("b", 1.0, True, 1)]


def test_a_query_is_searched_deeper_until_its_chunks_name_100_documents():
    """Documents of many chunks: 300 chunks held 75 documents, and recall@100 was measured on 75."""
    store = QdrantStore.connect(":memory:")
    layout = LAYOUTS[RetrievalMode.sparse]
    store.create_collection("c", dimension=4, metadata={}, layout=layout)
    # A document's chunks score alike and above the next document's (more "probe" in as many terms).
    chunks = [Chunk(f"d{doc}", part, text, 0, len(text), None, "s.md", {}, "h")
              for doc in range(150) for part in range(4)
              for text in [f"gauge{doc} part{part} " + "probe " * (doc + 1) + "filler " * (150 - doc)]]
    bm25 = Bm25(avgdl=153.0)
    write_documents(store, "c", build_points(chunks, None, embedding_model="", layout=layout, bm25=bm25), {})
    retriever = Retriever("c", RetrievalMode.sparse, layout, bm25=bm25)
    queries = [EvalQuery("q", "probe", {"d0": 1}), EvalQuery("r", "gauge7", {"d7": 1})]
    searched = []

    def search(pending, depth):
        query_texts = [query.text for query in pending]
        searched.append((query_texts, depth))
        return [[hit.doc_id for hit in hits] for hits in retriever.search(store, query_texts, [None] * len(query_texts), top_k=depth)]

    rankings = document_rankings(queries, search, depth=300)
    assert rankings["q"] == [f"d{doc}" for doc in reversed(range(150))] and rankings["r"] == ["d7"]
    assert searched == [(["probe", "gauge7"], 300), (["probe"], 600)]  # 75 documents in 300 chunks; "r" had all of its
    assert steps.rank_documents.fn(queries, store, retriever, depth=300, filters=query_filters(queries, store)) == rankings
    # A question's filter restricts its retrieval as in the answer flow (evaluate searched unfiltered).
    filtered = [EvalQuery("q", "probe", {"d0": 1}, filter={"doc_id": ["d3", "d140"]})]
    assert steps.rank_documents.fn(filtered, store, retriever, depth=300, filters=query_filters(filtered, store)) == {"q": ["d140", "d3"]}
    store.close()


def test_a_deeper_search_only_appends_documents_until_the_collection_runs_out():
    """Hybrid fusion over deeper branches reordered the top ten that nDCG@10 reads. A pass that adds no
    document goes on: the next documents may lie past many chunks of those already ranked."""
    passes = {300: ["d1", "d2", "d1"] * 100, 600: ["d3", "d2", "d1", "d4"] * 150, 1200: ["d2", "d1"] * 600,
              2400: ["d5"] + ["d2", "d1"] * 1000}  # 2,001 chunks: the collection has no more
    searched = []

    def search(pending, depth):
        searched.append(depth)
        return [passes[depth]]

    assert document_rankings([EvalQuery("q", "text", {"d1": 1})], search, depth=300) == {"q": ["d1", "d2", "d3", "d4", "d5"]}
    assert searched == [300, 600, 1200, 2400]


def test_a_deeper_search_stops_at_the_deepest_depth():
    """A query whose chunks keep naming fewer than 100 documents while every pass comes back full."""
    searched = []

    def search(pending, depth):
        searched.append(depth)
        assert len(searched) <= 7, searched  # it would search at the deepest depth forever
        return [["d1"] * depth]

    assert document_rankings([EvalQuery("q", "text", {"d1": 1})], search, depth=300) == {"q": ["d1"]}
    assert searched == [300, 600, 1200, 2400, 4800, 9600, MAX_DEPTH]


def test_the_output_keeps_100_documents_and_unjudged_documents_are_not_missing_ones():
    ranked = [f"d{i}" for i in range(150)]
    assert query_rows([EvalQuery("q", "t", {})], {"q": ranked})[0]["ranked_doc_ids"] == ranked[:RANKING_KEPT]
    store = QdrantStore.connect(":memory:")
    store.create_collection("c", dimension=4, metadata={})
    # Grade 0 is a judgement of not relevant: a document so judged and not indexed is no miss.
    assert relevant_not_indexed(store, "c", [EvalQuery("q", "t", {"relevant": 1, "judged-irrelevant": 0})]) == ["relevant"]
    store.close()


def test_the_metrics_never_replace_the_answers_or_the_question_set_they_read(tmp_path):
    """`out` compared with the answers as written: `sub/../a.parquet` or a linked directory replaced
    them, and the question set itself was not compared at all. A link as `out` is replaced, not
    written through, so it may point at an input."""
    from pydantic import ValidationError

    from tasks.settings import EvaluateParams

    (tmp_path / "sub").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "link.parquet").symlink_to(tmp_path / "q.parquet")
    q = tmp_path / "q.parquet"
    for given in ({"dataset": q, "answers": tmp_path / "a.parquet", "out": tmp_path / "sub" / ".." / "a.parquet"},
                  {"dataset": q, "out": tmp_path / "linked" / "q.parquet"},
                  {"dataset": tmp_path / "x.summary.json", "out": tmp_path / "x.parquet"},  # the summary beside the metrics
                  {"dataset": tmp_path / "link.parquet", "out": q}):  # the question set read through a link
        with pytest.raises(ValidationError, match="would replace the (answers|dataset) file"):
            EvaluateParams(collection="kb", data_dir=tmp_path, **given)
    for out in (tmp_path / "sub" / "a.parquet", tmp_path / "link.parquet"):
        assert EvaluateParams(dataset=tmp_path / "q.parquet", collection="kb", data_dir=tmp_path, answers=tmp_path / "a.parquet",
                              out=out).out == out



def test_a_filter_the_store_cannot_apply_is_one_line_before_any_retrieval(tmp_path):
    """qdrant-edge cannot match a boolean: the run failed at that question's batch, after retrieving the
    batches before it."""
    queries = [EvalQuery("ok", "q", {"d1": 1}, filter={"source": "a.md"}), EvalQuery("b", "q", {"d1": 1}, filter={"published": True})]
    store = QdrantStore.connect(f"edge:{tmp_path / 'edge'}")
    try:
        with pytest.raises(StoreError) as refused:
            query_filters(queries, store)
    finally:
        store.close()
    assert str(refused.value).startswith("question 'b': its filter cannot be applied to this store (qdrant-edge 0.9.0 cannot match a boolean")
    assert set(query_filters(queries, QdrantStore.connect(":memory:"))) == {"ok", "b"}
