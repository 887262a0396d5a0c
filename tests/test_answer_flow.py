"""The answer flow end to end on the sample index: real Prefect, real Qdrant, real vLLM (tiny random model)."""

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.answer import answer
from flows.ingest import ingest
from tasks.child_process import REAP_GRACE_SECONDS
from tasks.errors import RagbatchError, SourceError, StoreError
from tasks.locks import OutputBusy, OutputLock
from tasks.outputs import ANSWER_SCHEMA
from tasks.settings import AnswerParams, IngestParams

from .conftest import ROOT, SAMPLE_CORPUS, SERVED_KEY, SERVED_MODEL
from .test_child_process import assert_all_end, kill_when

MAX_MODEL_LEN = 1024
MAX_TOKENS = 16


@pytest.fixture(scope="session")
def sample_index(prefect_api_url, tmp_path_factory) -> Path:
    """The sample corpus ingested once; tests answer against it (one process at a time)."""
    data_dir = tmp_path_factory.mktemp("answer-state")
    ingest(IngestParams(source=SAMPLE_CORPUS, collection="kb", data_dir=data_dir))
    return data_dir


@pytest.fixture
def params(sample_index, tiny_llm_dir, tmp_path):
    def make(questions: Path, **overrides) -> AnswerParams:
        values = dict(
            questions=questions, out=tmp_path / "answers.parquet", collection="kb", data_dir=sample_index,
            llm_model=str(tiny_llm_dir), max_model_len=MAX_MODEL_LEN, max_tokens=MAX_TOKENS, kv_cache_gib=1.0,
        )
        return AnswerParams(**{**values, **overrides})

    return make


def question_file(tmp_path: Path, extra: list[dict]) -> Path:
    path = tmp_path / "questions.jsonl"
    lines = (ROOT / "data" / "questions.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps(q) for q in extra]) + "\n")
    return path


def test_every_question_gets_one_row_with_its_contexts(params, tmp_path, sample_index):
    questions = question_file(tmp_path, [
        {"id": "long", "question": "Why " + "very " * 600 + "long?"},
        {"id": "filtered", "question": "What does error code E-219 mean?", "filter": {"source": "troubleshooting-guide.txt"}},
        {"id": "bad-filter", "question": "Anything?", "filter": {"source": {"nested": True}}},
        {"id": "blank", "question": "   "},
        {"id": "q01", "question": "A duplicate id"},
    ])
    report = answer(params(questions, top_k=4))
    assert report.questions == 29 and report.quarantined == 2
    assert report.answered + report.failed + report.quarantined == report.questions
    table = pq.read_table(report.output)
    assert table.schema.equals(ANSWER_SCHEMA)
    rows = {r["question_id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 27

    failed = {qid: r["error"] for qid, r in rows.items() if r["error"]}
    assert set(failed) == {"long", "bad-filter"}
    assert "prompt does not fit" in failed["long"] and failed["bad-filter"].startswith("invalid filter")
    assert report.failed == 2 and report.answered == 25

    for qid, r in rows.items():
        if r["error"]:
            continue
        assert r["answer"] is not None and r["finish_reason"] in ("stop", "length")
        assert 1 <= len(r["contexts"]) <= 4 and [c["rank"] for c in r["contexts"]] == list(range(1, len(r["contexts"]) + 1))
        assert r["prompt_tokens"] + MAX_TOKENS <= MAX_MODEL_LEN
        assert len(r["contexts"]) + r["dropped_passages"] == 4
        assert r["model"] == params(questions).llm_model and r["sampling"]["max_tokens"] == MAX_TOKENS
    assert sum(r["dropped_passages"] or 0 for r in rows.values()) > 0  # the context cannot hold 4 passages
    assert {c["source"] for c in rows["filtered"]["contexts"]} == {"troubleshooting-guide.txt"}
    assert rows["q02"]["reference_answers"] == ["tipping bucket assembly"]
    assert report.prompts_per_s == round(25 / report.generate_seconds, 2) > 0  # not the two that never reached the model
    assert report.output_tokens_per_s > 0
    OutputLock(Path(report.output)).acquire().release()  # the run let go of its output


def test_a_second_run_of_an_output_refuses_while_the_first_writes_it(params, tmp_path, sample_index):
    """Two runs answering into one output would each delete the other's parts on finishing (a server
    store lets both run): the second refuses before loading anything."""
    questions = question_file(tmp_path, [])
    out = tmp_path / "shared.parquet"
    with OutputLock(out):
        with pytest.raises(OutputBusy) as busy:
            answer(params(questions, out=out))
    message = str(busy.value)
    assert message.startswith(f"{out}: another answer run is writing it (pid ") and "\n" not in message
    assert "give another --out" in message
    assert list(tmp_path.glob("shared.parquet*")) == []  # nothing written
    # A run of another data directory (another working directory's ./.ragbatch) meets the same lock.
    with OutputLock(out), pytest.raises(OutputBusy):
        answer(params(questions, out=out, data_dir=tmp_path / "elsewhere"))


def test_a_completed_output_is_not_generated_again(params, tmp_path):
    questions = question_file(tmp_path, [])
    first = answer(params(questions))
    again = answer(params(questions))
    assert (again.resumed, again.output_tokens, again.answered) == (24, 0, first.answered)
    fresh = answer(params(questions, overwrite=True))
    assert fresh.resumed == 0 and fresh.answered == 24
    assert_artifacts(fresh)
    # Resumed on an edited set (q02 removed, q05 now too long, a new first question): the output answers
    # exactly the set's usable questions, in its order, and every row in is counted once.
    lines = [json.loads(line) for line in questions.read_text().splitlines()]
    lines = [{"id": "new", "question": "How do I clean a rain gauge?"}] + [q for q in lines if q["id"] != "q02"]
    lines[[q["id"] for q in lines].index("q05")]["question"] = "Why " + "really " * 5000 + "?"
    # q03 reworded and q04 given a filter since: answered again (resume matched by id alone kept both old answers)
    lines[[q["id"] for q in lines].index("q03")]["question"] += " Please be brief."
    lines[[q["id"] for q in lines].index("q04")]["filter"] = {"source": "troubleshooting-guide.txt"}
    questions.write_text("".join(json.dumps(q) + "\n" for q in lines))
    edited = answer(params(questions))
    assert (edited.questions, edited.quarantined, edited.resumed) == (24, 1, 20)
    assert edited.answered + edited.failed + edited.quarantined == edited.questions
    table = pq.read_table(edited.output)
    assert table.column("question_id").to_pylist() == [q["id"] for q in lines if q["id"] != "q05"]
    rows = {row["question_id"]: row for row in table.to_pylist()}
    assert rows["q03"]["question"].endswith("Please be brief.") and rows["q04"]["filter"] == '{"source": "troubleshooting-guide.txt"}'
    assert {c["source"] for c in rows["q04"]["contexts"]} <= {"troubleshooting-guide.txt"}
    with pytest.raises(RagbatchError, match=r"answers.parquet: holds answers made with other settings \(sampling, top_k\); "):
        answer(params(questions, top_k=2, max_tokens=MAX_TOKENS + 1))
    # The context length decides which passages fit beside a question: answers of two would be mixed.
    with pytest.raises(RagbatchError, match=r"answers.parquet: holds answers made with other settings \(max_model_len\); "):
        answer(params(questions, max_model_len=MAX_MODEL_LEN // 2))


def assert_artifacts(report):
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report.run_id)]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=this_run)}
    assert {"answer-summary-kb", "answer-sample-kb", "answer-progress-kb"} <= set(artifacts)
    assert artifacts["answer-progress-kb"].data == 100.0
    assert f'"answered": {report.answered}' in str(artifacts["answer-summary-kb"].data)
    assert "**q01**" in artifacts["answer-sample-kb"].data and "Sources: [1]" in artifacts["answer-sample-kb"].data


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p, d: p(d / "none.jsonl"), SourceError, "none.jsonl: no such file or directory"),
        (lambda p, d: p(write(d / "q.csv", "id,text\n1,hi\n")), SourceError, "missing required column 'question'"),
        (lambda p, d: p(ROOT / "data" / "questions.jsonl", collection="nope"), StoreError, "collection 'nope' does not exist"),
        (lambda p, d: p(ROOT / "data" / "questions.jsonl", llm_model=str(d / "no-model")), RagbatchError, "no-model"),
        (lambda p, d: p(ROOT / "data" / "questions.jsonl", prompt_template=write(d / "t.txt", "{question}")), RagbatchError, "lacks {context}"),
    ],
)
def test_unusable_inputs_fail_with_one_line(params, tmp_path, make, error, message):
    with pytest.raises(error) as raised:
        answer(make(params, tmp_path))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_a_killed_run_resumes_without_generating_finished_questions(params, tmp_path, subprocess_env, sample_index):
    """SIGKILLed after its first part, with vLLM's engine in a process of its own as on a GPU (switched
    on by hand; it outlived a killed command before, holding the model's memory): the engine ends too,
    and the next run answers only the rest."""
    import subprocess
    import sys

    settings = params(ROOT / "data" / "questions.jsonl")
    command = [
        sys.executable, "-m", "flows.cli", "answer", str(settings.questions), "--collection", "kb",
        "--out", str(settings.out), "--llm-model", settings.llm_model, "--max-model-len", str(MAX_MODEL_LEN),
        "--max-tokens", str(MAX_TOKENS), "--kv-cache-gib", "1", "--batch-questions", "4", "--json",
    ]
    env = {**subprocess_env, "RAGBATCH_DATA_DIR": str(sample_index)}
    parts = settings.out.with_name(settings.out.name + ".parts")
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, stdout=log, stderr=log)
        try:
            descendants = kill_when(process, lambda: time.sleep(0.2) or bool(list(parts.glob("part-*.parquet"))), timeout=300)
        except AssertionError as failed:
            raise AssertionError(f"{failed}: {(tmp_path / 'killed.log').read_text()[-2000:]}") from None
    assert any("EngineCore" in child.name() for child in descendants), [child.name() for child in descendants]
    assert_all_end(descendants, timeout=REAP_GRACE_SECONDS + 10, after="the answer command holding the engine was killed")
    written = {qid for part in parts.glob("part-*.parquet") for qid in pq.read_table(part).column("question_id").to_pylist()}
    assert 4 <= len(written) < 24
    assert not settings.out.exists()

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    # Without --verbose the terminal shows the command's result, not the engine's set-up logs.
    terminal = finished.stdout + finished.stderr
    assert not re.search(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING) \d\d-\d\d ", terminal, re.M), terminal[-3000:]
    assert "Loading safetensors" not in terminal and "FutureWarning" not in terminal, terminal[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert {"questions", "answered", "failed", "quarantined", "output", "seconds", "prompts_per_s", "output_tokens_per_s"} <= report.keys()
    assert report["resumed"] == len(written)
    ids = pq.read_table(settings.out).column("question_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24


@pytest.mark.slow
def test_default_smollm2_answers_sample_questions_end_to_end(params, tmp_path, sample_index, smollm2_models_dir):
    models = sample_index / "models"
    if not models.exists():
        models.symlink_to(smollm2_models_dir)
    lines = (ROOT / "data" / "questions.jsonl").read_text().splitlines()
    questions = write(tmp_path / "five.jsonl", "\n".join(lines[:5]) + "\n")
    report = answer(AnswerParams(questions=questions, out=tmp_path / "smol.parquet", collection="kb",
                                 data_dir=sample_index, max_model_len=2048, max_tokens=48, kv_cache_gib=1.0))
    assert (report.questions, report.answered, report.failed) == (5, 5, 0)
    table = pq.read_table(report.output)
    assert table.schema.equals(ANSWER_SCHEMA)
    for row in table.to_pylist():
        assert row["model"] == "SmolLM2-135M-Instruct" and row["answer"]
        assert row["contexts"] and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    first = table.to_pylist()[0]  # q01 asks about error code E-219; its passage must be among the contexts
    assert any("E-219" in c["text"] for c in first["contexts"])


@pytest.mark.slow
def test_a_model_here_answered_by_a_server_is_sized_by_the_servers_context(params, served_tiny_llm, tiny_llm_dir,
                                                                          monkeypatch):
    """The server runs the model with --max-model-len 1024, its config says 2048: prompts were fitted to
    2048 here and refused there."""
    from tasks.generation import open_generator

    monkeypatch.chdir(tiny_llm_dir.parent)  # where SERVED_MODEL is the model's directory, as beside the server
    monkeypatch.setenv("RAGBATCH_LLM_API_KEY", SERVED_KEY)
    generator, chat = open_generator(params(ROOT / "data" / "questions.jsonl", llm_url=served_tiny_llm,
                                            llm_model=SERVED_MODEL, max_model_len=None))
    assert generator.max_model_len == 1024 and chat().count("hello") > 0


@pytest.mark.slow
def test_served_model_gives_the_same_answers_as_the_in_process_engine(params, tmp_path, served_tiny_llm, monkeypatch,
                                                                       prefect_api_url):
    lines = (ROOT / "data" / "questions.jsonl").read_text().splitlines()
    questions = write(tmp_path / "six.jsonl", "\n".join(lines[:6]) + "\n")
    local = answer(params(questions, out=tmp_path / "local.parquet", top_k=4))
    monkeypatch.setenv("RAGBATCH_LLM_API_KEY", SERVED_KEY)
    # Served under a name that is no model here: the server templates and counts the prompts, several at a time.
    remote = answer(params(questions, out=tmp_path / "remote.parquet", top_k=4, llm_url=served_tiny_llm,
                           llm_model=SERVED_MODEL, llm_concurrency=3))
    assert remote.answered == local.answered == 6

    def answers(path):
        return [(r["question_id"], r["answer"], r["completion_tokens"], r["prompt_tokens"], r["dropped_passages"])
                for r in pq.read_table(path).to_pylist()]

    assert answers(remote.output) == answers(local.output)
    assert any(dropped for *_, dropped in answers(remote.output))  # fitted to the context by the server's counts
