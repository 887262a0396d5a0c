"""Hostile input: every odd file or row is indexed correctly, quarantined with its reason, or (when the
whole source is unusable) ends the run with one clear error; and always rows in = indexed + quarantined.

The corpora are generated here (the 50 MB document too, in tmp_path) and run through the real ingest
flow: real Prefect, MiniLM and embedded Qdrant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.ingest import ingest
from tasks.chunking import TokenChunker
from tasks.errors import QuarantineThresholdExceeded, SourceError
from tasks.settings import IngestParams
from tasks.sources import SourceRow, read_rows
from tasks.store import QdrantStore

OUTSIDE_SECRET = "OUTSIDE-SENTINEL-7f3a"  # text that lives outside the source directory only
INDEXED = None  # expected outcome of a row that must be indexed
MB = 1 << 20
LONG_TITLE = " ".join(f"anemometer{i} calibration" for i in range(25))  # 175 MiniLM tokens
LONG_TITLE_TEXT = " ".join(f"Step {i} checks the mast." for i in range(25))  # 150 tokens: one chunk, not room for both


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def iter_points(params: IngestParams, *, with_vectors: bool = False) -> list:
    store = QdrantStore.connect(params.store)
    try:
        return list(store.iter_points(params.collection, with_vectors=with_vectors))
    finally:
        store.close()


def index_contents(params: IngestParams) -> dict[str, dict]:
    """doc_id -> {"text": the document's chunk texts joined, "chunks": count} as stored in the index."""
    records = iter_points(params)
    docs: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: (r.payload["doc_id"], r.payload["chunk_index"])):
        doc = docs.setdefault(record.payload["doc_id"], {"texts": [], "chunks": 0})
        doc["texts"].append(record.payload["text"])
        doc["chunks"] += 1
    return docs


def assert_accounted(report, expected: dict[str, str | None]) -> dict[str, tuple[str, str]]:
    """Every row counted once, and exactly the rows expected to fail quarantined, each with its reason
    (a prefix); returns locator -> (rule, reason) from the run's quarantine file."""
    assert report.loaded == len(expected) == report.valid + report.quarantined
    reasons = {row["locator"]: (row["rule"], row["reason"]) for row in pq.read_table(report.quarantine_path).to_pylist()}
    assert set(reasons) == {locator for locator, outcome in expected.items() if outcome is not INDEXED}
    for locator, (_, reason) in reasons.items():
        assert reason.startswith(expected[locator]), (locator, reason)
    return reasons


def hostile_directory(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A directory of hostile files and, per file, INDEXED or the expected quarantine reason (a prefix)."""
    root = tmp_path / "hostile"
    outside = write(tmp_path / "outside" / "secret.txt", f"{OUTSIDE_SECRET} must never be read")
    write(tmp_path / "outside" / "more.txt", f"{OUTSIDE_SECRET} in a directory reached by a symlink")
    expected: dict[str, str | None] = {}

    def add(name: str, data: str | bytes, outcome: str | None) -> None:
        write(root / name, data)
        expected[name] = outcome

    add("plain.txt", "The WS-200 weather station measures wind speed and rainfall.", INDEXED)
    add("nested/deeper/note.md", "# Maintenance\n\nClean the rain gauge funnel every month.", INDEXED)
    add("invalid-utf8.txt", b"caf\xe9 au lait", "not valid UTF-8 at byte 3")
    add("nul-bytes.txt", b"text with a \x00 NUL byte", "binary content (NUL bytes)")
    add("utf16-bom.txt", "UTF-16 text: Grüße aus Köln".encode("utf-16"), INDEXED)
    add("utf8-bom.md", b"\xef\xbb\xbf# BOM\n\nA UTF-8 file with a byte order mark.", INDEXED)
    add("empty.txt", b"", "text is empty or whitespace only")
    add("whitespace.txt", " \n\t \r\n  ", "text is empty or whitespace only")
    add("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary content (NUL bytes)")
    add("image.png", b"\x89PNG\r\n\x1a\n", "unsupported file type '.png'")
    add("page.html", "<html><head><title>Spec</title><style>body{color:red}</style><script>var token='js-code';</script>"
        "</head><body><h1>WS-200</h1><p>Runs on 12 V.</p><script>alert('js-code')</script></body></html>", INDEXED)
    add("rtl.txt", "שלום עולם — مرحبا بالعالم: right-to-left text with ‏marks‎.", INDEXED)
    add("emoji.md", "# Emoji 🌧️\n\nRain 🌧 and wind 💨; 👩\u200d🔬 scientist; cafe\u0301 and n\u0303 combine.", INDEXED)
    add("one-long-line.txt", " ".join(f"word{i}" for i in range(1500)), INDEXED)  # no newline to split at
    with open(root / "fifty-mb.txt", "wb") as handle:  # 50 MB of real text: too big for max_chars
        handle.write((b"All work and no play makes a big document. " * (50 * MB // 40))[: 50 * MB])
    expected["fifty-mb.txt"] = "file has 52,428,800 bytes, too big for the limit of 1,000,000 characters"
    write(root / "five-mb-line.txt", b"x" * (5 * MB))
    expected["five-mb-line.txt"] = "file has 5,242,880 bytes, too big for the limit of 1,000,000 characters"
    add("over-limit.txt", "y " * 600_000, "text has 1,200,000 characters, more than the limit of 1,000,000")
    os.symlink("loop-b.txt", root / "loop-a.txt")
    os.symlink("loop-a.txt", root / "loop-b.txt")
    expected |= {"loop-a.txt": "symlink loop", "loop-b.txt": "symlink loop"}
    os.symlink(outside, root / "outside-link.txt")
    expected["outside-link.txt"] = "symlink to a file outside the source directory"
    os.symlink(tmp_path / "outside", root / "outside-dir")  # a symlinked directory is not walked, but counted
    expected["outside-dir"] = "symlink to a directory (not followed)"
    os.symlink("plain.txt", root / "inside-link.txt")
    expected["inside-link.txt"] = INDEXED
    os.symlink("gone.txt", root / "dangling.txt")
    expected["dangling.txt"] = "unreadable: No such file or directory"
    os.mkfifo(root / "pipe.txt")  # reading it would block the run forever
    expected["pipe.txt"] = "not a regular file"
    write(root / ".hidden.txt", "hidden files are not part of the source")
    return root, expected


def test_hostile_directory_is_indexed_or_quarantined_with_reasons(prefect_api_url, tmp_path, data_dir):
    root, expected = hostile_directory(tmp_path)
    # Half the files are bad on purpose; the default 20 % threshold would (rightly) stop the run.
    params = IngestParams(source=root, collection="hostile", data_dir=data_dir, max_quarantined_share=0.9)
    reasons = assert_accounted(ingest(params), expected)
    assert reasons["over-limit.txt"][0] == "too_long" and reasons["empty.txt"][0] == "blank_text"

    docs = index_contents(params)
    assert set(docs) == {name for name, outcome in expected.items() if outcome is INDEXED}
    text = {doc_id: "".join(doc["texts"]) for doc_id, doc in docs.items()}
    assert text["utf16-bom.txt"] == "UTF-16 text: Grüße aus Köln"
    assert text["utf8-bom.md"].startswith("# BOM")
    assert text["rtl.txt"] == (root / "rtl.txt").read_text()
    assert text["emoji.md"] == (root / "emoji.md").read_text()  # no normalisation: combining marks kept as given
    assert "WS-200" in text["page.html"] and "js-code" not in text["page.html"] and "color" not in text["page.html"]
    assert docs["one-long-line.txt"]["chunks"] > 5
    assert all(OUTSIDE_SECRET not in t for t in text.values())


def hostile_jsonl(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """A JSONL table of hostile rows; per row locator (file:line) INDEXED or the expected reason (a prefix)."""
    lines: list[tuple[bytes, str | None]] = [
        (json.dumps({"id": "a", "text": "Anemometer calibration steps."}).encode(), INDEXED),
        (b'{"id": "b", "text": "a broken line', "invalid JSON at column 35: Invalid control character"),
        (json.dumps({"id": "a", "text": "Different text, same id."}).encode(), "duplicate id 'a' (first occurrence kept)"),
        (json.dumps({"text": "No id at all."}).encode(), "missing id"),
        (json.dumps({"id": "no-text"}).encode(), "missing text"),
        (json.dumps({"id": ["x"], "text": "A list is no id."}).encode(), "id is not a string or an integer (list)"),
        (json.dumps({"id": True, "text": "Neither is a boolean."}).encode(), "id is not a string or an integer (bool)"),
        (json.dumps({"id": 42, "text": "Integer ids are fine."}).encode(), INDEXED),
        (json.dumps({"id": 7.0, "text": "A whole float is the integer id 7."}).encode(), INDEXED),
        (json.dumps({"id": "num", "text": 5}).encode(), "text is not a string (int)"),
        (json.dumps({"id": "nul", "text": "NUL \u0000 inside"}).encode(), "binary content (NUL characters)"),
        (b'{"id": "surrogate", "text": "lone \\ud800 surrogate"}', "invalid Unicode (a lone surrogate)"),
        (b'{"id": "latin1", "text": "caf\xe9"}', "not valid UTF-8"),
        (json.dumps({"id": "rtl", "text": "שלום עולם مرحبا بالعالم"}, ensure_ascii=False).encode(), INDEXED),
        (json.dumps({"id": "emoji", "text": "💨 wind, cafe\u0301"}, ensure_ascii=False).encode(), INDEXED),
        (json.dumps({"id": "blank", "text": " \n "}).encode(), "text is empty or whitespace only"),
        (b"[1, 2, 3]", "line is not a JSON object"),
        (json.dumps({"id": "five-mb", "text": "z" * (5 * MB)}).encode(), "text has 5,242,880 characters, more than the limit"),
        (json.dumps({"id": "long-title", "title": LONG_TITLE, "text": LONG_TITLE_TEXT}).encode(), INDEXED),
        (json.dumps({"id": "last", "text": "The last row is read after all of that."}).encode(), INDEXED),
    ]
    path = write(tmp_path / "hostile.jsonl", b"\n".join(line for line, _ in lines) + b"\n")
    return path, {f"{path.name}:{number}": outcome for number, (_, outcome) in enumerate(lines, start=1)}


def test_hostile_jsonl_rows_are_indexed_or_quarantined_with_reasons(prefect_api_url, tmp_path, data_dir, embedder, tokenizer):
    path, expected = hostile_jsonl(tmp_path)
    params = IngestParams(source=path, collection="hostile-jsonl", data_dir=data_dir, max_quarantined_share=0.9)
    report = ingest(params)
    assert_accounted(report, expected)
    assert report.unidentified == 5  # broken JSON, no id, list and boolean ids, not an object
    docs = index_contents(params)
    assert set(docs) == {"a", "42", "7", "rtl", "emoji", "long-title", "last"}
    # The title is cut to what MiniLM reads beside the chunk, so the chunk is embedded whole.
    row = SourceRow("l", "long-title", LONG_TITLE_TEXT, title=LONG_TITLE)
    [chunk] = TokenChunker(tokenizer=tokenizer, chunk_tokens=params.chunk_tokens, overlap_tokens=0, model_tokens=254).chunk([(row, "h")])
    assert chunk.embedded_title and len(tokenizer.encode(chunk.embedding_text).ids) <= 256
    [stored] = [p.vector["dense"] for p in iter_points(params, with_vectors=True) if p.payload["doc_id"] == "long-title"]
    cut, whole = embedder.embed([chunk.embedding_text, f"{LONG_TITLE}\n{LONG_TITLE_TEXT}"])
    assert float(np.dot(stored, cut)) > 0.9999 and float(np.dot(stored, whole)) < 0.99
    assert docs["a"]["texts"] == ["Anemometer calibration steps."]  # the first of the duplicates
    assert docs["emoji"]["texts"] == ["💨 wind, cafe\u0301"]


def test_rows_without_a_readable_id_hold_back_deletions(prefect_api_url, tmp_path, data_dir):
    """A broken line may be a document indexed earlier: while one is quarantined, nothing is deleted as
    missing; once the rows are fixed, the documents really gone are deleted."""
    rows = {doc: json.dumps({"id": doc, "text": f"Document {doc} on gearbox maintenance."}) for doc in "abc"}
    path = tmp_path / "docs.jsonl"
    params = IngestParams(source=path, collection="ids", data_dir=data_dir, max_quarantined_share=0.9)
    path.write_text(f"{rows['a']}\n{rows['b']}\n{rows['c']}\n")
    ingest(params)
    path.write_text(f'{rows["a"]}\n{{"id": "b", "text": "broken\n')  # b's line broken, c gone
    held = ingest(params)
    assert (held.quarantined, held.unidentified, held.deleted) == (1, 1, 0)
    assert set(index_contents(params)) == {"a", "b", "c"}
    # A rebuild would leave b out of the new collection: refused, the alias stays on the old one.
    with pytest.raises(QuarantineThresholdExceeded, match=r"docs.jsonl: 1 quarantined rows have no readable id .* the alias "
                                                          r"still points at the old collection") as refused:
        ingest(params.model_copy(update={"rebuild": True}))
    listed = Path(re.search(r"\(listed in (\S+)\)", str(refused.value)).group(1))  # a failed run prints no summary
    assert [row["locator"] for row in pq.read_table(listed).to_pylist()] == ["docs.jsonl:2"]
    assert set(index_contents(params)) == {"a", "b", "c"}
    path.write_text(f"{rows['a']}\n{rows['b']}\n")
    fixed = ingest(params)
    assert (fixed.unidentified, fixed.unchanged, fixed.deleted) == (0, 2, 1)
    assert set(index_contents(params)) == {"a", "b"}


def test_csv_with_quotes_newlines_big_fields_and_a_utf16_bom(tmp_path):
    big = "long field " * 20_000  # 220,000 characters: more than the csv module's default field limit
    rows = [["id", "text", "team"], ["1", 'two\nlines, "quoted", and ; ,', "ops"], ["2", big, "dev"], ["3", "", "x"]]
    content = "".join(",".join('"' + cell.replace('"', '""') + '"' for cell in row) + "\r\n" for row in rows)
    for name, encoding in (("utf8.csv", "utf-8"), ("utf16.csv", "utf-16")):
        read = list(read_rows(write(tmp_path / name, content.encode(encoding))))
        assert [(r.doc_id, r.text, r.error) for r in read] == [
            ("1", 'two\nlines, "quoted", and ; ,', None), ("2", big, None), ("3", "", None)
        ]
        assert read[0].locator == f"{name}:3" and read[0].metadata == {"team": "ops"}


def test_a_table_that_cannot_be_read_on_is_one_clear_error(tmp_path):
    path = write(tmp_path / "huge-field.csv", b'id,text\n1,fine\n2,"' + b"w" * (13 * MB + 1) + b'"\n3,after\n')
    with pytest.raises(SourceError) as error:
        list(read_rows(path))
    message = str(error.value)
    assert message.startswith(f"{path}: line 3 is longer than ") and "nothing after it can be read reliably" in message
    assert "\n" not in message


def test_a_table_line_too_long_for_any_document_is_skipped_unparsed(tmp_path):
    path = write(tmp_path / "t.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "' + b"v" * (3 * MB) + b'"}\n{"id": "c", "text": "ok"}\n')
    rows = list(read_rows(path, max_chars=100_000))
    assert [(r.locator, r.doc_id, r.error) for r in rows] == [
        ("t.jsonl:1", "a", None),
        ("t.jsonl:2", None, "line longer than 2,248,576 characters (too big for max_chars; not parsed)"),
        ("t.jsonl:3", "c", None),
    ]


def test_a_file_the_process_may_not_read_is_quarantined(tmp_path):
    """chmod 000 stops every user but root; as root the reader runs in a subprocess as `nobody`."""
    if os.geteuid() != 0:
        root = tmp_path
    else:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop privileges to test an unreadable file")
        root = Path(tempfile.mkdtemp(prefix="ragbatch-unreadable-"))  # tmp_path's parents are private to root
        root.chmod(0o755)
    try:
        write(root / "ok.txt", "readable").chmod(0o644)
        write(root / "locked.txt", "nobody may read this").chmod(0o000)
        script = "import json, sys; from tasks.sources import read_rows; " \
                 "print(json.dumps([(r.doc_id, r.error) for r in read_rows(sys.argv[1])]))"
        command = [sys.executable, "-c", script, str(root)]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [["locked.txt", "unreadable: Permission denied"], ["ok.txt", None]]
    finally:
        if root != tmp_path:
            shutil.rmtree(root)


@pytest.mark.slow
def test_hostile_question_set_each_question_answered_failed_or_quarantined_once(prefect_api_url, tmp_path, data_dir, tiny_llm_dir):
    """Questions go through the same reader and validation as documents; a question whose prompt cannot
    fit gets an error row and the others complete (real in-process vLLM, tiny random model)."""
    from flows.answer import answer
    from tasks.settings import AnswerParams

    from .test_concurrency import small_corpus

    ingest(IngestParams(source=small_corpus(tmp_path / "corpus", 4), collection="kb", data_dir=data_dir))
    lines = [
        json.dumps({"id": "ok", "question": "How often is the rain gauge checked?"}).encode(),
        b'{"id": "broken", "question": "unterminated',
        json.dumps({"id": "ok", "question": "Same id again?"}).encode(),
        json.dumps({"question": "Who am I?"}).encode(),
        json.dumps({"id": {"nested": 1}, "question": "A dict id?"}).encode(),
        json.dumps({"id": "nul", "question": "NUL\u0000?"}).encode(),
        b'{"id": "latin1", "question": "caf\xe9?"}',
        json.dumps({"id": "blank", "question": "\t"}).encode(),
        json.dumps({"id": "rtl", "question": "מה מצב הסוללה? ما حالة البطارية؟"}, ensure_ascii=False).encode(),
        json.dumps({"id": "emoji", "question": "🌧️ how much rain? cafe\u0301"}, ensure_ascii=False).encode(),
        json.dumps({"id": "huge", "question": "why " * 5000}).encode(),  # longer than max_question_chars
        json.dumps({"id": "too-long-prompt", "question": "battery " * 450}).encode(),  # fits the limit, not the context
    ]
    questions = write(tmp_path / "questions.jsonl", b"\n".join(lines) + b"\n")
    report = answer(AnswerParams(questions=questions, out=tmp_path / "answers.parquet", collection="kb", data_dir=data_dir,
                                 llm_model=str(tiny_llm_dir), max_model_len=512, max_tokens=16, kv_cache_gib=1.0))
    rows = {r["question_id"]: r for r in pq.read_table(report.output).to_pylist()}
    assert report.questions == len(lines) == len(rows) + report.quarantined
    assert set(rows) == {"ok", "rtl", "emoji", "too-long-prompt"}
    assert "prompt does not fit" in rows["too-long-prompt"]["error"]
    assert all(rows[q]["error"] is None and rows[q]["answer"] is not None for q in ("ok", "rtl", "emoji"))
    assert rows["ok"]["question"] == "How often is the rain gauge checked?"  # the first of the duplicates
    reasons = sorted(r["reason"].split(" (")[0].split(":")[0] for r in pq.read_table(report.quarantine_path).to_pylist())
    assert reasons == sorted([
        "invalid JSON at column 43", "duplicate id 'ok'", "missing id", "id is not a string or an integer",
        "binary content", "not valid UTF-8", "question is empty or whitespace only", "question has 20,000 characters, more than the limit of 4,000",
    ])


@pytest.mark.slow
def test_a_question_set_without_a_valid_question_gives_an_empty_output_and_an_empty_one_an_error(
        prefect_api_url, tmp_path, data_dir, tiny_llm_dir):
    """Every question quarantined: the run completes with an output of no rows. No question at all (an
    empty file): one line, as for an empty source to ingest; a directory is no question set."""
    from flows.answer import answer
    from tasks.errors import QuarantineThresholdExceeded, SourceError
    from tasks.settings import AnswerParams

    from .test_concurrency import small_corpus

    ingest(IngestParams(source=small_corpus(tmp_path / "corpus", 2), collection="kb", data_dir=data_dir))

    def run(questions: Path):
        return answer(AnswerParams(questions=questions, out=tmp_path / f"{questions.name}.parquet", collection="kb",
                                   data_dir=data_dir, llm_model=str(tiny_llm_dir), max_model_len=512, kv_cache_gib=1.0))

    report = run(write(tmp_path / "invalid.jsonl", b'{"id": "a", "question": " "}\n{"id": "b", "question": "unterminated\n'))
    assert report.questions == report.quarantined == 2 and report.answered == report.failed == 0
    assert pq.read_table(report.output).num_rows == 0 and pq.read_table(report.quarantine_path).num_rows == 2

    with pytest.raises(SourceError, match=rf"^{tmp_path / 'empty.jsonl'}: no questions found; nothing was answered$"):
        run(write(tmp_path / "empty.jsonl", b""))
    (tmp_path / "none").mkdir()
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'none'}: a directory; a question set is a JSONL, CSV or Parquet file"):
        run(tmp_path / "none")
