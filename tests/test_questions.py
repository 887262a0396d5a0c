
import pytest

from tasks.prompts import find_citations, load_template
from tasks.errors import RagbatchError, SourceError
from tasks.questions import QUESTION_COLUMN, count_questions, read_questions, to_question
from tasks.retrieval import InvalidFilter, build_filter
from tasks.settings import AnswerParams, QuestionFormat
from tasks.sources import SourceRow, read_rows

from .conftest import ROOT


def test_sample_questions_load_with_references():
    questions = [to_question(r) for r in read_rows(ROOT / "data" / "questions.jsonl", text_column=QUESTION_COLUMN)]
    assert len(questions) == 24 and len({q.id for q in questions}) == 24
    assert all(q.text.endswith("?") for q in questions)
    assert sum(bool(q.reference_answers) for q in questions) == 22


def test_a_question_set_is_a_file_not_a_directory_of_documents(tmp_path):
    """`ragbatch answer data/corpus` answered each document as a question, and a BEIR directory's corpus
    (not its queries) was taken as the question set."""
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a passage"}\n')
    for directory in (ROOT / "data" / "corpus", beir):
        with pytest.raises(SourceError, match=rf"^{directory}: a directory; a question set is a JSONL, CSV or Parquet file"):
            read_questions(directory, max_chars=1000)
    with pytest.raises(ValueError, match="format"):
        AnswerParams(questions=ROOT / "data" / "questions.jsonl", collection="kb", format="dir")
    rows = list(read_questions(ROOT / "data" / "questions.jsonl", QuestionFormat.jsonl, max_chars=1000))
    assert len(rows) == count_questions(ROOT / "data" / "questions.jsonl", max_chars=1000) == 24


def test_the_first_reference_column_wins_and_an_empty_filter_is_none():
    def question(**columns):
        return to_question(SourceRow("q.jsonl:1", "q1", "Why?", metadata=columns))

    assert question(reference_answers=["a", "b"], answer="c").reference_answers == ["a", "b"]
    assert question(reference_answers=["a", None]).reference_answers == ["a"]  # not "None"
    assert question(answer="c").reference_answers == ["c"]
    assert question(filter={}).filter is None and question(filter="").filter is None  # unfiltered, not an invalid filter


def test_csv_questions_decode_json_cells(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('id,question,reference_answers,filter\n1,Why?,"[""because""]","{""source"": ""a.md""}"\n2,How?,plain,\n')
    first, second = (to_question(r) for r in read_rows(path, text_column=QUESTION_COLUMN))
    assert (first.reference_answers, first.filter) == (["because"], {"source": "a.md"})
    assert (second.reference_answers, second.filter) == (["plain"], None)


def test_filters():
    built = build_filter({"source": "a.md", "doc_id": ["x", "y"]})
    assert [c.key for c in built.must] == ["source", "doc_id"]
    assert build_filter(None) is None
    assert [c.key for c in build_filter({"metadata.lang": "de", "metadata.tags[]": ["a"], '"odd key"': 1}).must] == [
        "metadata.lang", "metadata.tags[]", '"odd key"']
    # A mixed list failed pydantic's validation, and a key that is no field path failed the store's
    # batched query: both ended the run, on every resume, instead of failing the one question.
    for bad in ({}, {"source": {"nested": 1}}, ["source"], {"source": []}, {"source": ["a.md", 1]}, {"flag": [True]},
                {"": "x"}, {"a[": "x"}, {"a..b": "x"}, {"a b": "x"}):
        with pytest.raises(InvalidFilter):
            build_filter(bad)


def test_a_parquet_filter_holds_only_the_rows_own_keys(tmp_path):
    """Parquet gives every row the struct's keys, null where the row has none: each filter had a null value
    and every filtered question failed as an invalid filter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "1", "question": "Why?", "filter": {"source": "a.md"}},
                                         {"id": "2", "question": "How?", "filter": {"lang": "de"}},
                                         {"id": "3", "question": "Who?", "filter": None}]), tmp_path / "q.parquet")
    questions = [to_question(r) for r in read_rows(tmp_path / "q.parquet", text_column=QUESTION_COLUMN)]
    assert [q.filter for q in questions] == [{"source": "a.md"}, {"lang": "de"}, None]
    assert build_filter(questions[0].filter).must[0].key == "source"
    # A null a JSON filter gives itself is the question's own mistake: refused, not dropped (the question was
    # answered from the whole collection without a word).
    (tmp_path / "q.jsonl").write_text('{"id": "1", "question": "Only German?", "filter": {"metadata.lang": null}}\n')
    [question] = [to_question(r) for r in read_rows(tmp_path / "q.jsonl", text_column=QUESTION_COLUMN)]
    assert question.filter == {"metadata.lang": None}
    with pytest.raises(InvalidFilter):
        build_filter(question.filter)


def test_citations_and_templates(tmp_path):
    assert find_citations("See [2] and [1], again [2].") == [2, 1]
    assert find_citations("no citation") == []
    assert find_citations("[12345678901] is an id, [999999999] a (wrong) passage") == [999999999]  # int32, as stored
    # Lists and ranges, as small models write them, were no citation at all.
    assert find_citations("See [1, 2], [3-4] and [5–6]; [2][7].") == [1, 2, 3, 4, 5, 6, 7]
    assert find_citations("[1-999999] is no list, nor are the interval [0, 1] and the years [2019-2021]") == []
    assert find_citations("[1, 5-3] holds a reversed range: no list") == []
    good = tmp_path / "good.txt"
    good.write_text("Q: {question}\nC: {context}")
    assert load_template(good) == "Q: {question}\nC: {context}"
    bad = tmp_path / "bad.txt"
    bad.write_text("only {question}")
    with pytest.raises(RagbatchError, match="lacks \\{context\\}"):
        load_template(bad)
    with pytest.raises(RagbatchError, match="cannot read prompt template"):
        load_template(tmp_path / "missing.txt")
