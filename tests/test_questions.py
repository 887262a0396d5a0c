
import pytest

from tasks.prompts import find_citations, load_template
from tasks.errors import RagbatchError
from tasks.questions import QUESTION_COLUMN, to_question
from tasks.retrieval import InvalidFilter, build_filter
from tasks.sources import read_rows

from .conftest import ROOT


def test_sample_questions_load_with_references():
    questions = [to_question(r) for r in read_rows(ROOT / "data" / "questions.jsonl", text_column=QUESTION_COLUMN)]
    assert len(questions) == 24 and len({q.id for q in questions}) == 24
    assert all(q.text.endswith("?") for q in questions)
    assert sum(bool(q.reference_answers) for q in questions) == 22


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
    for bad in ({}, {"source": {"nested": 1}}, ["source"], {"source": []}):
        with pytest.raises(InvalidFilter):
            build_filter(bad)


def test_citations_and_templates(tmp_path):
    assert find_citations("See [2] and [1], again [2].") == [2, 1]
    assert find_citations("no citation") == []
    good = tmp_path / "good.txt"
    good.write_text("Q: {question}\nC: {context}")
    assert load_template(good) == "Q: {question}\nC: {context}"
    bad = tmp_path / "bad.txt"
    bad.write_text("only {question}")
    with pytest.raises(RagbatchError, match="lacks \\{context\\}"):
        load_template(bad)
    with pytest.raises(RagbatchError, match="cannot read prompt template"):
        load_template(tmp_path / "missing.txt")
