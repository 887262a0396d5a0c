import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import SourceError
from tasks.settings import SourceFormat
from tasks.sources import batched, count_rows, decode_bytes, detect_format, html_to_text, read_rows, row_id

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
        "<html><head><title>Spec</title><style>p{color:red}</style><meta name='x' content='y'>Head text</head>"
        "<body><h1>WS-200</h1><script>var secret = 1;</script><noscript>Enable JavaScript</noscript>"
        "<template><p>Row template</p></template><p>Runs on <b>12 V</b>.</p></body></html>"
    )
    assert title == "Spec"
    assert text == "WS-200\nRuns on\n12 V\n."  # the title is the title, not text too; no script, style, noscript, template


def test_an_id_is_a_string_or_a_whole_number():
    """JSON's true is no id: it became the document "True"."""
    assert row_id("a") == ("a", None) and row_id(7) == ("7", None) and row_id(7.0) == ("7", None)
    assert row_id(True) == (None, "id is not a string or an integer (bool)")
    assert row_id(1.5) == (None, "id is not a string or an integer (float)")
    assert row_id(None) == row_id("  ") == (None, None)  # missing: the validator's missing_id


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
        # A column named twice: the readers kept its last silently (document 'a' became 'b').
        (lambda d: (d / "twice.csv").write_text("id,id,text,,\na,b,x,,\n") and d / "twice.csv", "column 'id' appears more than once"),
        (lambda d: pq.write_table(pa.table([["a"], ["x"], ["y"]], names=["id", "text", "text"]), d / "twice.parquet")
         or d / "twice.parquet", "column 'text' appears more than once"),
        (lambda d: (d / "titles.csv").write_text("id,text,title,title\na,x,t,u\n") and d / "titles.csv",
         "column 'title' appears more than once"),
        # UTF-16 (by its BOM) with a broken code unit was a UnicodeDecodeError traceback.
        (lambda d: (d / "u16.jsonl").write_bytes(b"\xff\xfe" + '{"id": "a", "text": "x"}\n'.encode("utf-16-le") + b"\x00\xd8A\x00")
         and d / "u16.jsonl", "u16.jsonl: 'utf-16-le' codec can't decode bytes"),
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


def test_odd_values_become_quarantined_rows_or_storable_ones(tmp_path):
    """NaN metadata failed every write to the edge store; an id of bytes that are not UTF-8 crashed
    validation; an integer of 5,000 digits was a traceback; a raw CR split a JSON line in two; a NaN
    title was embedded as "nan"."""
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b'{"id": "a", "text": "alpha", "x": NaN, "y": [Infinity, 1.5]}\n'
                     b'{"id": "\\ud800x", "text": "lone surrogate id"}\n'
                     b'{"id": "big", "text": "t", "n": ' + b"9" * 5000 + b'}\n'
                     b'{"id": "cr",\r"text": "a raw CR inside the line"}\n')
    rows = list(read_rows(path))
    assert [(r.doc_id, r.error) for r in rows] == [
        ("a", None), (None, "id is not valid Unicode (bytes that are not UTF-8, or a lone surrogate)"),
        (None, "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
               "use sys.set_int_max_str_digits() to increase the limit"), ("cr", None)]
    assert rows[0].metadata == {"x": None, "y": [None, 1.5]}
    assert count_rows(path) == 4
    from tasks.validation import DocumentValidator

    valid, rejected = DocumentValidator(max_chars=100).validate(rows)
    assert [r.doc_id for r in valid] == ["a", "cr"] and len(rejected) == 2
    titled = tmp_path / "titles.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "title": [float("nan"), 3.0]}), titled)
    assert [r.title for r in read_rows(titled)] == [None, "3.0"]


def test_a_corrupt_parquet_page_is_one_line_naming_the_file_and_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(2048)], "text": ["some text"] * 2048}), path, row_group_size=1024)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset:column.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    rows = read_rows(path)
    with pytest.raises(SourceError, match=r"c.parquet: row 1025: .*; nothing after it can be read reliably$"):
        list(rows)


def test_a_table_whose_file_name_is_not_utf8_names_its_rows_readably(tmp_path):
    path = tmp_path / "t\udcff.jsonl"  # the byte 0xff, as the file system hands it over
    path.write_text('{"id": "a", "text": "x"}\n')
    [row] = read_rows(path)
    assert (row.locator, row.source) == ("t\\xff.jsonl:1", "t\\xff.jsonl")


@pytest.mark.parametrize("text, title", [
    ("---\ntitle: 'Real title'\n# a YAML comment\n---\n\n# Heading\n", "Real title"),
    ("---\nauthor: x\n# a YAML comment\n---\n\n# Heading\n", "Heading"),
    ("```sh\n# install it\npip install x\n```\n\n# Usage ##\n", "Usage"),
    ("#\n\nJust a paragraph, no heading.\n", None),
    ("---\n# Real Title\n\ntext\n---\n", "Real Title"),  # a rule, no front matter
    ("---\ntitle: >-\n  A long\n  title\n---\n# Heading\n", "A long title"),
    ("---\ntitle: ''\n---\n# Heading\n", "Heading"),
    ("---\ntitle: Foo # draft\n---\n", "Foo"),
    ("    ```\n    indented code\n# Title\n", "Title"),
    ("```x``` is inline code\n\n# Title\n", "Title"),
    ("````md\n```\n# inner\n```\n````\n# Outer\n", "Outer"),
    ("# Learning C#\n", "Learning C#"),
])
def test_markdown_titles_skip_front_matter_comments_and_fenced_code(tmp_path, text, title):
    (tmp_path / "doc.md").write_text(text)
    [row] = read_rows(tmp_path)
    assert row.title == title


def test_markdown_front_matter_is_metadata_not_text(tmp_path):
    """The front matter stayed in the text and became a chunk of its own: owners' addresses in prompts,
    a chunk of title and fields only taking a place in the top k."""
    (tmp_path / "manual.md").write_text("---\ntitle: WS-350 Service Manual\nowner: j.doe@example.com\nreviewed: 2024-05-01\n"
                                        "tags: [station, wind]\n---\n# WS-350\r\nGrease the bearings yearly.\n")
    (tmp_path / "rule.md").write_text("---\n# Not front matter\n\ntext\n---\n")
    manual, rule = read_rows(tmp_path)
    assert manual.text == "# WS-350\r\nGrease the bearings yearly.\n" and manual.title == "WS-350 Service Manual"
    assert manual.metadata == {"format": "markdown", "front_matter": {
        "title": "WS-350 Service Manual", "owner": "j.doe@example.com", "reviewed": "2024-05-01", "tags": ["station", "wind"]}}
    assert rule.text == "---\n# Not front matter\n\ntext\n---\n" and rule.metadata == {"format": "markdown"}
    # A static site's section index is front matter only: its title is its text (blank, it was quarantined).
    (tmp_path / "_index.md").write_text("---\ntitle: Pumps\nweight: 10\n---\n")
    # An alias that refers to itself never ends (a RecursionError ended the whole run); nested ones grow
    # exponentially: such front matter is the file's problem, quarantined.
    (tmp_path / "loop.md").write_text("---\ntitle: L\nx: &a [*a]\n---\nbody\n")
    rows = {row.doc_id: row for row in read_rows(tmp_path)}
    assert (rows["_index.md"].text, rows["_index.md"].title) == ("Pumps", "Pumps")
    assert (rows["loop.md"].text, rows["loop.md"].error) == (None, "front matter with YAML aliases (*name) is not read")


def test_a_directory_that_cannot_be_listed_is_a_row_without_an_id(tmp_path):
    """Its files were left out without a word, so the run deleted them from the index as gone."""
    import os
    import shutil
    import subprocess
    import sys

    (tmp_path / "docs" / "locked").mkdir(parents=True)
    (tmp_path / "docs" / "open.txt").write_text("readable")
    (tmp_path / "docs" / "locked" / "secret.txt").write_text("unseen")
    (tmp_path / "docs" / "locked").chmod(0o000)
    script = ("import sys; from tasks.sources import read_rows, count_rows; "
              "rows = list(read_rows(sys.argv[1])); print(count_rows(sys.argv[1]), [(r.locator, r.doc_id, r.error) for r in rows])")
    command = [sys.executable, "-c", script, str(tmp_path / "docs")]
    if os.geteuid() == 0:  # root reads any directory: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("runs as root without setpriv to drop its file capabilities")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"] + command
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    finally:
        (tmp_path / "docs" / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("2 [('open.txt', 'open.txt', None), "
                                     "('locked', None, 'unreadable directory (Permission denied)')]")


def test_a_csv_line_too_long_for_any_row_is_refused_before_it_is_read_whole(tmp_path):
    """150 fields of 1 MB each passed the field limit one by one: the line was read whole and indexed,
    150 MB of metadata in the payload."""
    path = tmp_path / "wide.csv"
    path.write_text("id,text," + ",".join(f"c{i}" for i in range(20)) + "\na,short," + ",".join(["x" * 60_000] * 20) + "\nb,next,\n")
    with pytest.raises(SourceError, match=r"wide.csv: line 2 is longer than 1,049,776 characters, more than a row of at most "):
        list(read_rows(path, max_chars=100))
    assert [row.doc_id for row in read_rows(path, max_chars=100_000)] == ["a", "b"]


def test_trailing_empty_csv_columns_may_repeat_and_cr_only_jsonl_is_one_line(tmp_path):
    """Spreadsheet exports end rows in commas (columns named ''): refused once duplicates were checked.
    Old Mac line ends made a JSON Lines file one broken row."""
    (tmp_path / "t.csv").write_text("id,text,,\n1,hello,,\n2,world,,\n")
    assert [row.text for row in read_rows(tmp_path / "t.csv")] == ["hello", "world"]
    (tmp_path / "cr.jsonl").write_bytes(b'{"id": "a", "text": "x"}\r{"id": "b", "text": "y"}\r')
    with pytest.raises(SourceError, match=r"cr.jsonl: its lines end in CR alone; JSON Lines end in LF \(or CR LF\)$"):
        read_rows(tmp_path / "cr.jsonl")
    (tmp_path / "deep.jsonl").write_text('{"id": "a", "text": "x"}\n' + "[" * 200_000 + "\n")
    assert [row.error for row in read_rows(tmp_path / "deep.jsonl")][1].startswith("invalid JSON: maximum recursion depth")


def test_counting_rows_reads_no_line_whole(tmp_path):
    """The progress total read an over-long line whole (150 MB of memory) before `read_rows` refused it."""
    (tmp_path / "t.jsonl").write_bytes(b'{"id": "a", "text": "x"}\r\n \n{"id": "b", "text": "' + b"y" * (3 << 20) + b'"}')
    assert count_rows(tmp_path / "t.jsonl") == 2
    (tmp_path / "t.csv").write_text("id,text\na,x\nb," + "y" * (3 << 20) + "\n")
    assert count_rows(tmp_path / "t.csv", max_chars=100) is None and count_rows(tmp_path / "t.csv") == 2


def test_a_file_of_exactly_max_chars_characters_is_read_in_any_encoding(tmp_path):
    """Files are refused unread by their size: the bound must leave room for 4 bytes a character and a BOM."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "utf8.txt").write_bytes(b"\xef\xbb\xbf" + ("\U0001F600" * 10).encode())
    (docs / "utf32.txt").write_bytes(("x" * 10).encode("utf-32"))  # with its 4-byte BOM: 44 bytes
    rows = {row.doc_id: row for row in read_rows(docs, max_chars=10)}
    assert rows["utf8.txt"].text == "\U0001F600" * 10 and rows["utf32.txt"].text == "x" * 10
