"""The parameter models' refusals, at their edges (the same models back flags, variables and UI forms)."""

import pytest
from pydantic import ValidationError

from tasks.settings import AnswerParams, IngestParams, RetrievalMode


def test_an_overlap_as_long_as_the_chunk_is_refused(tmp_path):
    with pytest.raises(ValidationError, match=r"chunk_overlap \(32\) must be smaller than chunk_tokens \(32\)"):
        IngestParams(source=tmp_path, data_dir=tmp_path, chunk_tokens=32, chunk_overlap=32)
    assert IngestParams(source=tmp_path, data_dir=tmp_path, chunk_tokens=32, chunk_overlap=31).chunk_overlap == 31


def test_each_cluster_placement_setting_needs_a_qdrant_server(tmp_path):
    for setting in ({"shard_number": 2}, {"replication_factor": 2}):
        with pytest.raises(ValidationError, match="apply to a Qdrant server"):
            IngestParams(source=tmp_path, data_dir=tmp_path, **setting)


def test_the_highest_score_a_retrieval_can_give_is_a_usable_threshold(tmp_path):
    """Refused only above it: first in both lists scores exactly 2/60 with RRF, an identical text 1.0 in cosine."""
    questions = tmp_path / "q.jsonl"
    assert AnswerParams(questions=questions, data_dir=tmp_path, score_threshold=2 / 60).score_threshold == 2 / 60
    assert AnswerParams(questions=questions, data_dir=tmp_path, score_threshold=1.0, retrieval=RetrievalMode.dense)
    with pytest.raises(ValidationError, match=r"score_threshold 1.01 is above the highest score of dense retrieval"):
        AnswerParams(questions=questions, data_dir=tmp_path, score_threshold=1.01, retrieval=RetrievalMode.dense)


def test_the_answers_may_not_replace_the_questions_by_another_spelling_of_their_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path, target_is_directory=True)
    for out in (tmp_path / "sub" / ".." / "q.jsonl", tmp_path / "linked" / "q.jsonl"):
        with pytest.raises(ValidationError, match="out is the questions file"):
            AnswerParams(questions=tmp_path / "q.jsonl", out=out, data_dir=tmp_path)


def test_a_url_with_credentials_is_refused_without_repeating_them(tmp_path):
    """Run parameters are kept and shown as plain text; a password in a URL belongs in a Secret block."""
    with pytest.raises(ValidationError, match="qdrant_api_key_block") as refused:
        IngestParams(source=tmp_path, data_dir=tmp_path, store="https://team:s3cret@qdrant.internal:6333")
    assert "s3cret" not in refused.value.errors()[0]["msg"]  # what the CLI prints
    with pytest.raises(ValidationError, match="llm_api_key_block"):
        AnswerParams(questions=tmp_path / "q.jsonl", data_dir=tmp_path, llm_url="http://token@127.0.0.1:8000/v1")
    # An @ in a path or a query is no credential.
    assert IngestParams(source=tmp_path, data_dir=tmp_path, store=f"edge:{tmp_path}/team@site/edge").store.endswith("@site/edge")
    assert AnswerParams(questions=tmp_path / "q.jsonl", data_dir=tmp_path, llm_url="http://127.0.0.1:8000/v1?by=a@b").llm_url


@pytest.mark.parametrize(("entrypoint", "field", "url"), [("flows/ingest.py:ingest", "store", "http://u:p@localhost:6333"),
                                                           ("flows/answer.py:answer", "llm_url", "http://u:p@localhost:8000/v1")])
def test_the_prefect_server_refuses_a_deployment_run_with_credentials_before_storing_it(entrypoint, field, url):
    """The check the Prefect server runs on a deployment run's parameters, against the form's schema."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from .test_prefect_yaml import load_flow

    schema = parameter_schema(load_flow(entrypoint).fn).model_dump()
    required = {"store": {"source": "data/corpus"}, "llm_url": {"questions": "data/questions.jsonl"}}[field]
    assert validate({"params": {**required, field: url.replace("u:p@", "")}}, schema) == []
    (error,) = validate({"params": {**required, field: url}}, schema)
    assert list(error.absolute_path) == ["params", field]
