import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import SourceError
from tasks.settings import SourceFormat
from tasks.sources import batched, count_rows, decode_bytes, detect_format, html_to_text, read_rows

from .conftest import SAMPLE_CORPUS


def test_sample_corpus_reads_every_file_with_titles():
    rows = list(read_rows(SAMPLE_CORPUS))
    files = sorted(p.relative_to(SAMPLE_CORPUS).as_posix() for p in SAMPLE_CORPUS.rglob("*") if p.is_file())
    assert sorted(r.doc_id for r in rows) == files
    assert all(r.error is None and r.text.strip() for r in rows)
    html = next(r for r in rows if r.doc_id.endswith(".html"))
    assert html.title and "<" not in html.text
    markdown = next(r for r in rows if r.doc_id.endswith(".md"))
    assert markdown.title and markdown.kind == "markdown"


def test_html_drops_scripts_styles_and_markup():
    title, text = html_to_text(
        "<html><head><title>Spec</title><style>p{color:red}</style></head>"
        "<body><h1>WS-200</h1><script>var secret = 1;</script><p>Runs on <b>12 V</b>.</p></body></html>"
    )
    assert title == "Spec"
    assert "WS-200" in text and "Runs on" in text and "12 V" in text
    assert "secret" not in text and "color" not in text


def test_decoding_accepts_boms_and_rejects_binary_and_bad_utf8():
    assert decode_bytes("héllo".encode("utf-16")) == ("héllo", None)
    assert decode_bytes(b"\xef\xbb\xbfplain") == ("plain", None)
    assert decode_bytes(b"abc\x00def")[1] == "binary content (NUL bytes)"
    assert decode_bytes(b"ok \xff bad")[1] == "not valid UTF-8 at byte 3"


def test_directory_rows_carry_problems_instead_of_dropping_them(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("skipped")
    rows = {r.doc_id: r for r in read_rows(tmp_path)}
    assert set(rows) == {"good.txt", "latin1.txt", "image.png"}
    assert rows["good.txt"].error is None
    assert rows["latin1.txt"].error.startswith("not valid UTF-8")
    assert rows["image.png"].error == "unsupported file type '.png'"


def test_jsonl_keeps_metadata_and_reports_broken_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"id": 7, "text": "seven", "title": "T", "lang": "en"}) + "\n"
        + "{broken\n"
        + json.dumps({"id": "b", "text": "bee"}) + "\n"
    )
    rows = list(read_rows(path))
    assert [r.doc_id for r in rows] == ["7", None, "b"]
    assert rows[0].metadata == {"lang": "en"} and rows[0].title == "T"
    assert rows[1].locator == "docs.jsonl:2" and rows[1].error.startswith("invalid JSON")


def test_csv_with_quoted_newlines(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text('id,text,team\n1,"line one\nline two, with ""quotes""",ops\n2,plain,dev\n')
    rows = list(read_rows(path))
    assert rows[0].text == 'line one\nline two, with "quotes"'
    assert rows[0].metadata == {"team": "ops"}
    assert rows[1].locator == "docs.csv:4"


def test_parquet_and_beir(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "year": [2020, 2021]}), tmp_path / "t.parquet")
    assert [(r.doc_id, r.metadata) for r in read_rows(tmp_path / "t.parquet")] == [("a", {"year": 2020}), ("b", {"year": 2021})]
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "Title", "text": "Body"}) + "\n")
    assert detect_format(beir) == SourceFormat.beir
    [row] = read_rows(beir)
    assert (row.doc_id, row.title, row.text) == ("d1", "Title", "Body")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no such file or directory"),
        (lambda d: (d / "notes.pdf").write_bytes(b"%PDF") and d / "notes.pdf", "unknown source format '.pdf'"),
        (lambda d: (d / "t.csv").write_text("id,body\n1,x\n") and d / "t.csv", "missing required column 'text' (found: id, body)"),
        (lambda d: (d / "t.jsonl").write_text('{"text": "x"}\n') and d / "t.jsonl", "missing required column 'id'"),
        (lambda d: (d / "bad.parquet").write_bytes(b"nope") and d / "bad.parquet", "not a readable Parquet file"),
    ],
)
def test_unusable_sources_raise_one_line_errors(tmp_path, make, message):
    """Raised by `read_rows` itself, so a run fails before it creates or locks anything (the readers
    are generators: the columns were checked only when the first batch was read)."""
    path = make(tmp_path)
    with pytest.raises(SourceError) as error:
        read_rows(path)
    assert message in str(error.value) and str(path.name) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read_and_counted(tmp_path):
    """Counting the rows for the progress bar parsed the CSV with the default limit of 131,072
    characters, before the reader raised it: every fresh run of such a file ended in a traceback."""
    import csv

    csv.field_size_limit(131_072)  # the default, as in a fresh process
    path = tmp_path / "big.csv"
    path.write_text("id,text\n1," + "x" * 200_000 + "\n2,short\n")
    assert count_rows(path) == 2
    assert [len(row.text) for row in read_rows(path)] == [200_000, 5]


def test_rows_whose_values_cannot_be_stored_carry_the_reason(tmp_path):
    """A CSV row with more fields than the header crashed the run when hashed (DictReader keys them
    None); undecodable bytes in a metadata column failed the store's write of the whole batch."""
    path = tmp_path / "docs.csv"
    path.write_bytes(b"id,text,author\n1,fine,Ann\n2,world,de,EXTRA\n3,text,Jos\xe9\n")
    rows = list(read_rows(path))
    assert [(row.doc_id, row.error) for row in rows] == [
        ("1", None), ("2", "1 more field(s) than the header's 3"), ("3", "not valid UTF-8")]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"id": "a", "text": "t", "tags": ["ok", "\\ud800"]}\n{"id": "b", "text": "t", "meta": {"\\udc00": 1}}\n')
    assert [row.error for row in read_rows(jsonl)] == ["invalid Unicode (a lone surrogate)"] * 2


def test_a_file_name_that_is_not_utf8_and_a_symlinked_directory_are_rows_with_a_reason(tmp_path):
    """The first crashed the ingest (no point id holds it); the second was left out without a count."""
    import os

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.txt").write_text("inner")
    os.symlink("sub", tmp_path / "linked")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"), "w") as handle:
        handle.write("text")
    rows = {row.locator: row for row in read_rows(tmp_path)}
    assert rows["caf\\xe9.txt"].doc_id is None and rows["caf\\xe9.txt"].error == "file name is not valid UTF-8"
    assert rows["linked"].error == "symlink to a directory (not followed)"
    assert rows["sub/inner.txt"].error is None and len(rows) == 3 == count_rows(tmp_path)


def test_batched_bounds_batch_size():
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]


def test_unreadable_files_are_rows_with_a_reason_and_a_directory_is_not_a_table(tmp_path):
    (tmp_path / "ok.md").write_text("# Fine\n\ntext")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    rows = {r.doc_id: r for r in read_rows(tmp_path)}
    assert rows["ok.md"].error is None
    assert rows["dangling.txt"].error == "unreadable: No such file or directory"
    with pytest.raises(SourceError, match="is a directory, expected a jsonl file"):
        read_rows(tmp_path, SourceFormat.jsonl)
