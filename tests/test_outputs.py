from datetime import datetime, timezone

import pyarrow.parquet as pq

from tasks.outputs import ANSWER_SCHEMA, AnswerCheckpoint, artifact_key, sample_markdown


def row(question_id: str, answer: str | None = "an answer", error: str | None = None) -> dict:
    return {
        "question_id": question_id, "question": f"question {question_id}?", "answer": answer, "error": error,
        "contexts": [{"rank": 1, "score": 0.5, "point_id": "p", "doc_id": "d", "chunk_index": 0, "text": "t", "source": "s.md"}],
        "citations": [1], "reference_answers": [], "model": "m",
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "seed": 0, "stop": []},
        "prompt_tokens": 10, "completion_tokens": 3, "finish_reason": "stop", "dropped_passages": 0,
        "timings": {"batch_questions": 1, "retrieve_s": 0.1, "generate_s": 0.2},
        "run_id": "r", "created_at": datetime.now(timezone.utc),
    }


def test_parts_are_resumable_and_final_output_has_each_question_once(tmp_path):
    out = tmp_path / "answers.parquet"
    first = AnswerCheckpoint(out)
    first.write_part([row("q1"), row("q2")])
    assert first.done_ids() == {"q1", "q2"}
    assert not list(first.parts_dir.glob("*.tmp"))

    again = AnswerCheckpoint(out)  # a re-run after a crash
    again.write_part([row("q2", answer="duplicate from an overlapping re-run"), row("q3", answer=None, error="boom")])
    table = again.finalize(["q1", "q2", "q3"])
    assert table.schema.equals(ANSWER_SCHEMA)
    assert table.column("question_id").to_pylist() == ["q1", "q2", "q3"]
    assert table.column("answer").to_pylist()[1] == "an answer"
    assert not again.parts_dir.exists()
    assert pq.read_table(out).num_rows == 3
    assert AnswerCheckpoint(out).done_ids() == {"q1", "q2", "q3"}


def test_the_output_answers_the_runs_questions_in_their_order(tmp_path):
    """Resumed on an edited question set: a question removed (or now quarantined) kept its old row, and
    one added came last; rows in = answered + failed + quarantined broke."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1"), row("q2"), row("q3")])
    checkpoint.finalize(["q1", "q2", "q3"])
    checkpoint.write_part([row("q0")])  # the resumed run, on a set that now starts with q0 and lost q2
    table = checkpoint.finalize(["q0", "q1", "q3"])
    assert table.column("question_id").to_pylist() == ["q0", "q1", "q3"] == pq.read_table(checkpoint.output).column("question_id").to_pylist()


def test_a_run_with_other_settings_refuses_to_resume_answers_made_with_these(tmp_path):
    """Resumed with another model or sampling, a run kept the old answers beside new ones in one file."""
    import pytest

    from tasks.outputs import ResumeMismatch

    settings = {"llm_model": "m", "top_k": 4, "sampling": {"max_tokens": 8, "stop": ("\n",)}}
    first = AnswerCheckpoint(tmp_path / "a.parquet", settings=settings)
    first.write_part([row("q1")])
    assert AnswerCheckpoint(tmp_path / "a.parquet", settings=settings).done_ids() == {"q1"}
    changed = {**settings, "llm_model": "other", "sampling": {"max_tokens": 16, "stop": ("\n",)}}
    with pytest.raises(ResumeMismatch) as refused:
        AnswerCheckpoint(tmp_path / "a.parquet", settings=changed).done_ids()
    assert str(refused.value) == (f"{tmp_path / 'a.parquet'}: holds answers made with other settings (llm_model, sampling); "
                                  "--overwrite replaces them, or give another --out")
    first.finalize(["q1"])  # the merged output records them too
    with pytest.raises(ResumeMismatch):
        AnswerCheckpoint(tmp_path / "a.parquet", settings=changed).done_ids()


def test_reset_discards_earlier_results(tmp_path):
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1")])
    checkpoint.finalize(["q1"])
    checkpoint.write_part([row("q2")])
    (checkpoint.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half a part")  # a write that was killed
    checkpoint.reset()
    assert checkpoint.done_ids() == set() and not checkpoint.output.exists() and not checkpoint.parts_dir.exists()


def test_a_part_left_half_written_by_a_killed_run_is_ignored_and_removed(tmp_path):
    """The next run's final merge ended in a traceback ("Directory not empty"), and --overwrite too."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1")])
    (checkpoint.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half a part")
    assert checkpoint.done_ids() == {"q1"}
    assert checkpoint.finalize(["q1"]).column("question_id").to_pylist() == ["q1"]
    assert not checkpoint.parts_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]


def test_sample_markdown_and_artifact_keys():
    import pyarrow as pa

    rows = [row("q1"), row("q2", answer=None, error="prompt too long"), row("q3", answer="first\n\nsecond")]
    text = sample_markdown(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), limit=5)
    assert "**q1**" in text and "> an answer" in text and "> error: prompt too long" in text and "[1] s.md" in text
    assert "> first\n> \n> second" in text  # a multi-line answer stays inside its quote
    assert artifact_key("answer", "My_Docs.v2") == "answer-my-docs-v2"
