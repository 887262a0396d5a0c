import re
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.outputs import (
    ANSWER_SCHEMA, ARTIFACT_KINDS, OUTPUT_ROW_GROUP, AnswerCheckpoint, ResumeMismatch, artifact_key, sample_markdown,
)
from tasks.questions import Question


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
    assert set(first.answered()) == {"q1", "q2"}
    assert not list(first.parts_dir.glob("*.tmp"))

    again = AnswerCheckpoint(out)  # a re-run after a crash, on a set where q2 was edited since
    again.write_part([dict(row("q2", answer="the edited question's answer"), question="question q2, edited?"),
                      row("q3", answer=None, error="boom")])
    merged = again.finalize(["q1", "q2", "q3"])
    assert (merged.rows, merged.failed) == (3, 1) and merged.head.column("question_id").to_pylist() == ["q1", "q2", "q3"]
    table = pq.read_table(out)
    assert table.schema.equals(ANSWER_SCHEMA)
    assert table.column("question_id").to_pylist() == ["q1", "q2", "q3"]
    assert table.column("answer").to_pylist()[1] == "the edited question's answer"  # an id's latest row
    assert not again.parts_dir.exists()
    assert set(AnswerCheckpoint(out).answered()) == {"q1", "q2", "q3"}


def test_a_question_edited_since_its_answer_is_answered_again(tmp_path):
    """Resume matched by id alone: a fixed filter or another question set with the same ids kept the old
    answers, reported as resumed."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1"), dict(row("q2"), filter='{"source": "a.md"}', reference_answers=["yes"])])
    answered = checkpoint.answered()
    assert answered["q1"] == Question("q1", "question q1?", "l").digest
    assert answered["q2"] == Question("q2", "question q2?", "l", ["yes"], {"source": "a.md"}).digest
    for edited in (Question("q1", "question q1, edited?", "l"), Question("q1", "question q1?", "l", ["new"]),
                   Question("q2", "question q2?", "l", ["yes"], {"source": "b.md"}), Question("q2", "question q2?", "l", ["yes"])):
        assert answered[edited.id] != edited.digest, edited


def test_the_output_answers_the_runs_questions_in_their_order(tmp_path):
    """Resumed on an edited question set: a question removed (or now quarantined) kept its old row, and
    one added came last; rows in = answered + failed + quarantined broke."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1"), row("q2"), row("q3")])
    checkpoint.finalize(["q1", "q2", "q3"])
    checkpoint.write_part([row("q0")])  # the resumed run, on a set that now starts with q0 and lost q2
    checkpoint.finalize(["q0", "q1", "q3"])
    assert pq.read_table(checkpoint.output).column("question_id").to_pylist() == ["q0", "q1", "q3"]


def test_a_large_output_is_merged_in_row_groups_in_the_questions_order(tmp_path):
    """The merge held the earlier output and every part in memory at once (about 15 KiB per question)."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    ids = [f"q{i}" for i in range(3000)]
    for start in range(0, 3000, 500):
        checkpoint.write_part([row(question_id) for question_id in ids[start:start + 500]])
    assert checkpoint.finalize(ids).rows == 3000
    edited = ["q2999", "q10", "q1500"]  # a resumed run answers these again, in this order, and a new one
    checkpoint.write_part([dict(row(question_id, answer="new"), question="edited?") for question_id in edited] + [row("new")])
    order = ["new"] + ids[::-1]
    merged = checkpoint.finalize(order)
    table = pq.read_table(checkpoint.output)
    assert merged.rows == table.num_rows == 3001 and table.column("question_id").to_pylist() == order
    answers = dict(zip(table.column("question_id").to_pylist(), table.column("answer").to_pylist()))
    assert [answers[question_id] for question_id in edited] == ["new"] * 3 and answers["q11"] == "an answer"
    metadata = pq.ParquetFile(checkpoint.output).metadata
    assert max(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) <= OUTPUT_ROW_GROUP


def test_a_run_with_other_settings_refuses_to_resume_answers_made_with_these(tmp_path):
    """Resumed with another model or sampling, a run kept the old answers beside new ones in one file."""
    settings = {"llm_model": "m", "top_k": 4, "sampling": {"max_tokens": 8, "stop": ("\n",)}}
    first = AnswerCheckpoint(tmp_path / "a.parquet", settings=settings)
    first.write_part([row("q1")])
    assert set(AnswerCheckpoint(tmp_path / "a.parquet", settings=settings).answered()) == {"q1"}
    changed = {**settings, "llm_model": "other", "sampling": {"max_tokens": 16, "stop": ("\n",)}}
    with pytest.raises(ResumeMismatch) as refused:
        AnswerCheckpoint(tmp_path / "a.parquet", settings=changed).answered()
    assert str(refused.value) == (f"{tmp_path / 'a.parquet'}: holds answers made with other settings (llm_model, sampling); "
                                  "--overwrite replaces them, or give another --out")
    with pytest.raises(ResumeMismatch, match=r"other settings \(dtype\)"):  # one this run has and that one had not
        AnswerCheckpoint(tmp_path / "a.parquet", settings={**settings, "dtype": "bfloat16"}).answered()
    first.finalize(["q1"])  # the merged output records them too
    with pytest.raises(ResumeMismatch):
        AnswerCheckpoint(tmp_path / "a.parquet", settings=changed).answered()
    # An answers table written by something else records none: no way to tell, so no resume.
    pq.write_table(pa.Table.from_pylist([row("q1")], schema=ANSWER_SCHEMA), tmp_path / "b.parquet")
    with pytest.raises(ResumeMismatch, match=r"b.parquet: records no settings of `ragbatch answer`, so its answers cannot be "
                                             r"resumed; give another --out, or --overwrite to replace it$"):
        AnswerCheckpoint(tmp_path / "b.parquet", settings=settings).answered()


def test_overwrite_keeps_the_earlier_output_until_the_new_one_replaces_it(tmp_path):
    """--overwrite deleted the output at the start: a run that then failed (engine start, server) lost it."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet", settings={"llm_model": "m"})
    checkpoint.write_part([row("q1")])
    checkpoint.finalize(["q1"])
    checkpoint.write_part([row("q2")])
    (checkpoint.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half a part")  # a write that was killed
    replacing = AnswerCheckpoint(tmp_path / "a.parquet", settings={"llm_model": "other"}, replace_output=True)
    replacing.prepare()
    assert replacing.answered() == {} and not replacing._parts()
    assert pq.read_table(checkpoint.output).column("question_id").to_pylist() == ["q1"]  # still there
    replacing.write_part([row("q3")])
    replacing.finalize(["q3"])
    assert pq.read_table(checkpoint.output).column("question_id").to_pylist() == ["q3"]


def test_a_killed_overwrite_run_resumes_as_one(tmp_path):
    """The earlier output stays until the end; nothing said the parts replaced it, so a plain re-run mixed
    old and new answers, and another --overwrite threw the finished parts away."""
    settings = {"llm_model": "new"}
    AnswerCheckpoint(tmp_path / "a.parquet").finalize([])  # an earlier output, other settings
    AnswerCheckpoint(tmp_path / "a.parquet").write_part([row("q1", answer="old"), row("q2", answer="old")])
    AnswerCheckpoint(tmp_path / "a.parquet").finalize(["q1", "q2"])
    killed = AnswerCheckpoint(tmp_path / "a.parquet", settings=settings, replace_output=True)
    killed.prepare()
    killed.write_part([row("q1", answer="new")])  # ... and the run is killed here
    for again in (AnswerCheckpoint(tmp_path / "a.parquet", settings=settings),
                  AnswerCheckpoint(tmp_path / "a.parquet", settings=settings, replace_output=True)):
        again.prepare()
        assert set(again.answered()) == {"q1"}  # the killed run's part, not the old output
    again.write_part([row("q2", answer="new")])
    again.finalize(["q1", "q2"])
    assert pq.read_table(tmp_path / "a.parquet").column("answer").to_pylist() == ["new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]


def test_a_set_reordered_since_its_parts_is_merged_through_buckets(tmp_path, monkeypatch):
    """Read in the new order, row by row, 100k reordered rows took 3 minutes; bucketed, seconds
    (bench/bench_answer_merge.py). Small buckets here, so that several are filled and each holds
    rows of several parts, with ids answered twice (the later row wins) and ids no longer asked."""
    monkeypatch.setattr("tasks.outputs.REORDER_BUCKET", 100)
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    ids = [f"q{i}" for i in range(1000)]
    for start in range(0, 1000, 300):
        checkpoint.write_part([row(question_id, answer="old") for question_id in ids[start:start + 300]])
    checkpoint.write_part([row(question_id, answer="new") for question_id in ids[500:520]])
    shuffled = (ids[1::2] + ids[::2])[:-7]
    merged = checkpoint.finalize(shuffled)
    table = pq.read_table(checkpoint.output)
    assert merged.rows == 993 and table.column("question_id").to_pylist() == shuffled
    assert merged.head.column("question_id").to_pylist() == shuffled[:5]
    answers = dict(zip(table.column("question_id").to_pylist(), table.column("answer").to_pylist()))
    assert {question_id for question_id, answer in answers.items() if answer == "new"} == set(ids[500:520])
    assert not checkpoint.parts_dir.exists()


def test_an_unusable_out_fails_before_any_answer_and_a_non_answers_file_in_one_line(tmp_path):
    """A file where --out's directory should be failed after the engine start and a part of answers;
    a question set given as --out was a pyarrow traceback."""
    (tmp_path / "results").write_text("a file")
    with pytest.raises(ResumeMismatch, match=r"results/a.parquet: cannot write answers there \(Not a directory\)$"):
        AnswerCheckpoint(tmp_path / "results" / "a.parquet").prepare()
    (tmp_path / "q.parquet").write_bytes(b'{"id": 1, "question": "Q?"}\n')
    with pytest.raises(ResumeMismatch, match=r"q.parquet: not an answers file of `ragbatch answer` \(.*\); give another --out, or "
                                             r"--overwrite to replace it$"):
        AnswerCheckpoint(tmp_path / "q.parquet").answered()
    # A Parquet file of other columns (a question set, documents) was read as no answers at all: every
    # question generated again, then the merge failed with an IndexError.
    pq.write_table(pa.table({"id": ["q1"], "text": ["Q?"]}), tmp_path / "docs.parquet")
    with pytest.raises(ResumeMismatch, match=r"docs.parquet: not an answers file of this version of `ragbatch answer` \(no "
                                             r"column 'question_id'\); give another --out, or --overwrite to replace it$"):
        AnswerCheckpoint(tmp_path / "docs.parquet").answered()
    AnswerCheckpoint(tmp_path / "fine.parquet").prepare()
    assert not (tmp_path / "fine.parquet.parts").exists()  # a run failing before its first part leaves nothing


def test_a_part_left_half_written_by_a_killed_run_is_ignored_and_removed(tmp_path):
    """The next run's final merge ended in a traceback ("Directory not empty"), and --overwrite too; a
    merge killed mid-write left its full-size temporary beside the output for good."""
    checkpoint = AnswerCheckpoint(tmp_path / "a.parquet")
    checkpoint.write_part([row("q1")])
    (checkpoint.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half a part")
    (tmp_path / "a.parquet.4242-0badcafe.tmp").write_bytes(b"half a merged output")
    others = ["a.parquet.v2.4242-0badcafe.tmp", "a.parquet.notes.tmp"]  # another output's merge, a user's file
    for name in others:
        (tmp_path / name).write_bytes(b"not this output's")
    assert set(checkpoint.answered()) == {"q1"}
    assert checkpoint.finalize(["q1"]).rows == 1
    assert not checkpoint.parts_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", *sorted(others)]


def test_sample_markdown_and_artifact_keys():
    import pyarrow as pa

    rows = [row("q1"), row("q2", answer=None, error="prompt too long"), row("q3", answer="first\n\nsecond")]
    text = sample_markdown(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), limit=5)
    assert "**q1**" in text and "> an answer" in text and "> error: prompt too long" in text and "[1] s.md" in text
    assert "> first\n> \n> second" in text  # a multi-line answer stays inside its quote


def test_each_collection_has_artifact_keys_of_its_own():
    """Keys were the name with other characters as dashes: "kb_v1", "kb.v1" and "KB-v1" shared one
    history, and so did "ingest" of "progress-kb" and "ingest-progress" of "kb"."""
    names = ["kb", "kb-v1", "kb_v1", "kb.v1", "KB-v1", "progress-kb", "sample-kb", "queries-kb", "My_Docs.v2", "文档", "__"]
    keys = {(kind, name): artifact_key(kind, name) for kind in ARTIFACT_KINDS for name in names}
    assert len(set(keys.values())) == len(keys)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key) for key in keys.values())  # what Prefect accepts
    assert artifact_key("ingest-counts", "kb-v1") == "ingest-counts-kb-v1"  # a name that is a key stays as it is
    assert re.fullmatch(r"answer-summary-my-docs-v2-[0-9a-f]{8}", artifact_key("answer-summary", "My_Docs.v2"))
    with pytest.raises(ValueError, match="unknown artifact kind 'ingest'"):
        artifact_key("ingest", "kb")
