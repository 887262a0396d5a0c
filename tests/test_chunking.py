import os
import time

from tasks.chunking import TokenChunker
from tasks.models import embedding_text_limit
from tasks.sources import SourceRow

PARAGRAPHS = (
    "The WS-200 station hibernates when the battery drops below 11.2 volts. It wakes at 12.4 volts.\n\n"
    "Calibration of the soil probe takes ten minutes. Use the SM40-CAL-9 kit and distilled water. "
    "Record the offset in the field portal before leaving the site.\n\n"
    + " ".join(f"Sentence number {i} describes another maintenance step in some detail." for i in range(40))
)


def test_chunks_fit_the_budget_and_offsets_point_into_the_text(tokenizer):
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=48, overlap_tokens=8)
    [pieces] = chunker.split([PARAGRAPHS])
    assert len(pieces) > 5
    for start, end, text in pieces:
        assert PARAGRAPHS[start:end] == text
        assert len(tokenizer.encode(text, add_special_tokens=False).ids) <= 48
    assert [pieces] == chunker.split([PARAGRAPHS])  # deterministic


def test_splits_prefer_paragraph_and_sentence_boundaries(tokenizer):
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=48, overlap_tokens=0)
    pieces = [text for _, _, text in chunker.split([PARAGRAPHS])[0]]
    assert pieces[0] == "The WS-200 station hibernates when the battery drops below 11.2 volts. It wakes at 12.4 volts."
    assert all(text.endswith(".") for text in pieces)


def test_overlap_repeats_text_between_neighbours(tokenizer):
    text = " ".join(f"word{i}" for i in range(400))  # no sentence boundaries at all
    [pieces] = TokenChunker(tokenizer=tokenizer, chunk_tokens=40, overlap_tokens=10).split([text])
    assert len(pieces) > 5 and all(b_start < a_end for (_, a_end, _), (b_start, _, _) in zip(pieces, pieces[1:]))


def test_chunk_keeps_document_fields(tokenizer):
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=48, overlap_tokens=8)
    doc = SourceRow("a.md", "a.md", "# Title\n\n" + PARAGRAPHS, title="Title", source="a.md", kind="markdown", metadata={"k": 1})
    chunks = chunker.chunk([(doc, "hash")])
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert {(c.doc_id, c.title, c.source, c.doc_hash) for c in chunks} == {("a.md", "Title", "a.md", "hash")}
    assert chunks[0].metadata == {"k": 1}
    assert chunks[1].embedding_text.startswith("Title\n")


def test_a_long_title_is_cut_so_the_model_reads_every_chunk_whole(tokenizer):
    """MiniLM reads 254 tokens of text: a title that does not fit beside a chunk is cut in what the model
    embeds (else the model cut the chunk's end off), chunk by chunk; the payload and BM25 keep it whole."""
    limit = embedding_text_limit("all-MiniLM-L6-v2")
    assert limit == 254
    title = " ".join(f"anemometer{i} calibration" for i in range(25))  # 175 tokens
    rows = [(SourceRow("a.txt", "a.txt", PARAGRAPHS * 3, title=title, source="a.txt"), "h"),
            (SourceRow("b.txt", "b.txt", "Short text.", title=title, source="b.txt"), "h"),
            (SourceRow("c.txt", "c.txt", "Short text.", title="A short title", source="c.txt"), "h")]
    uncut = TokenChunker(tokenizer=tokenizer, chunk_tokens=200, overlap_tokens=0).chunk(rows)
    assert max(len(tokenizer.encode(c.embedding_text).ids) for c in uncut) > 256  # what the model cut before

    chunks = TokenChunker(tokenizer=tokenizer, chunk_tokens=200, overlap_tokens=0, model_tokens=limit).chunk(rows)
    assert len(chunks) > 4 and [c.doc_id for c in chunks[-2:]] == ["b.txt", "c.txt"]
    assert sum(c.embedded_title is not None for c in chunks) >= 3
    for chunk in chunks[:-2]:
        assert len(tokenizer.encode(chunk.embedding_text).ids) <= 256
        if chunk.embedded_title is not None:  # cut: to what fits, not shorter
            assert title.startswith(chunk.embedded_title) and len(tokenizer.encode(chunk.embedding_text).ids) >= 254
        assert chunk.embedding_text.endswith(f"\n{chunk.text}")
        assert chunk.title == title and chunk.sparse_text == f"{title}\n{chunk.text}"
    assert chunks[-2].embedding_text == f"{title}\nShort text."  # a short chunk leaves room for the whole title
    assert chunks[-1].embedding_text == "A short title\nShort text."
    [untitled] = TokenChunker(tokenizer=tokenizer, chunk_tokens=200, overlap_tokens=0, model_tokens=3).chunk(rows[1:2])
    assert untitled.embedding_text == "Short text."  # no room left at all: the chunk alone


def test_a_title_is_cut_between_characters_on_a_byte_level_tokenizer():
    """RoBERTa-style byte-level BPE splits an emoji or a CJK character into several tokens; cutting after
    the room's last token kept the whole character, up to 3 tokens past the model's input."""
    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(["the wind measure of anemometer calibration station " * 50, "東京 研究 Müller"],
                                vocab_size=400, min_frequency=1, show_progress=False)
    tokenizer = trained._tokenizer
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=50, overlap_tokens=0, model_tokens=60)
    # Titles past the room, and short ones about the room a full chunk leaves, where the line break tips it over.
    for title in ["😀🧬東京大学研究" * 10, *(" ".join(["wind"] * n) for n in range(7, 13))]:
        for words in range(1, 60):
            for chunk in chunker.chunk([(SourceRow("a", "a", " ".join(["anemometer"] * words), title=title), "h")]):
                assert len(tokenizer.encode(chunk.embedding_text, add_special_tokens=False).ids) <= 60, (words, chunk.embedded_title)
                assert chunk.embedded_title is None or title.startswith(chunk.embedded_title)  # None: the whole title fits


def test_chunking_many_documents_at_once_keeps_order_and_each_documents_splitter(tokenizer):
    """Texts are split in one parallel call per splitter; chunks must still follow document order,
    with Markdown and plain documents interleaved and each split by its own splitter."""
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=48, overlap_tokens=8)
    markdown = "# Station\n\nShort intro.\n\n## Power\n\n" + PARAGRAPHS
    rows = [SourceRow(f"d{i}", f"d{i}", markdown if i % 2 == 0 else f"Document {i}. " + PARAGRAPHS[i * 40:],
                      kind="markdown" if i % 2 == 0 else "text") for i in range(5)]
    chunks = chunker.chunk([(row, f"h{i}") for i, row in enumerate(rows)])
    expected = [(row.doc_id, f"h{i}", index, piece)
                for i, row in enumerate(rows)
                for index, piece in enumerate(chunker.split([row.text], markdown=row.kind == "markdown")[0])]
    assert [(c.doc_id, c.doc_hash, c.chunk_index, (c.start, c.end, c.text)) for c in chunks] == expected
    assert chunker.split([markdown], markdown=True) != chunker.split([markdown])  # the splitters differ on this text
    assert chunker.chunk([]) == []


def test_a_process_forked_after_chunking_still_chunks(tokenizer):
    """The splitter's thread pool does not survive fork(); a child forked from a process that has used it
    (a Dask or Celery worker forked from a loaded parent) would hang on its first batch."""
    chunker = TokenChunker(tokenizer=tokenizer, chunk_tokens=48, overlap_tokens=8)
    expected = chunker.split([PARAGRAPHS, PARAGRAPHS[100:]])  # the pool has run in this process
    child = os.fork()
    if child == 0:  # never return into pytest from here
        code = 1
        try:
            code = 0 if chunker.split([PARAGRAPHS, PARAGRAPHS[100:]]) == expected else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (finished := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if finished[0] == 0:
        os.kill(child, 9)
        os.waitpid(child, 0)
    assert finished[0] == child and os.waitstatus_to_exitcode(finished[1]) == 0, "the forked child hung or split differently"
