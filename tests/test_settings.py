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
