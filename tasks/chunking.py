"""Token-aware chunking with the embedding model's own tokenizer, at paragraph and sentence boundaries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tasks.errors import ModelError, first_line
from tasks.sources import SourceRow

# The splitter runs many texts on a Rust thread pool that does not survive fork(): a forked child that
# uses it waits forever for threads that exist only in its parent. Processes forked after this module
# loaded split one text at a time.
_POOL_PROCESS = os.getpid()
TITLE_SEPARATOR_TOKENS = 1  # the line break between a title and its chunk, where a tokenizer counts it


@dataclass(frozen=True)
class Chunk:
    """A piece of a document; `start`/`end` are character offsets into the document's text."""

    doc_id: str
    chunk_index: int
    text: str
    start: int
    end: int
    title: str | None
    source: str
    metadata: dict[str, Any]
    doc_hash: str
    embedded_title: str | None = None  # the title cut to what the model reads beside the chunk; None: the whole title

    @property
    def embedding_text(self) -> str:
        """What the model embeds: the title (document context for every chunk) and the chunk."""
        title = self.title if self.embedded_title is None else self.embedded_title
        return f"{title}\n{self.text}" if title else self.text

    @property
    def sparse_text(self) -> str:
        """What BM25 indexes: the whole title and the chunk (no input limit there)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def load_tokenizer(model_path: str):
    """The `tokenizers.Tokenizer` of a model directory or hub id, without truncation or padding."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path).backend_tokenizer
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError or others for a missing or broken model
        raise ModelError(f"cannot load the tokenizer of embedding model {model_path}: {first_line(exc)}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class TokenChunker:
    """Splits text into chunks of at most `chunk_tokens` tokens that share up to `overlap_tokens`.

    semantic-text-splitter picks the largest semantic unit that fits (paragraph, sentence, word), and
    Markdown documents are split at headings first. Texts are split many at a time: the splitter then
    runs on every core (Rust threads outside the GIL; `RAYON_NUM_THREADS` caps them).

    Every chunk is embedded after its document's title. Where title and chunk exceed `model_tokens`
    (what the embedding model reads), the title is cut in what the model embeds, so that the model never
    cuts the chunk's end instead; the payload and BM25 keep the whole title. None: nothing is cut.
    """

    def __init__(self, *, tokenizer, chunk_tokens: int, overlap_tokens: int, model_tokens: int | None = None) -> None:
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.model_tokens = model_tokens
        self._tokenizer = tokenizer
        self._text = TextSplitter.from_huggingface_tokenizer(tokenizer, chunk_tokens, overlap=overlap_tokens)
        self._markdown = MarkdownSplitter.from_huggingface_tokenizer(tokenizer, chunk_tokens, overlap=overlap_tokens)

    def split(self, texts: Sequence[str], *, markdown: bool = False) -> list[list[tuple[int, int, str]]]:
        """Per text, its (start, end, chunk) triples with character offsets into that text."""
        splitter = self._markdown if markdown else self._text
        if os.getpid() == _POOL_PROCESS:
            splits = splitter.chunk_all_indices(list(texts))
        else:
            splits = [splitter.chunk_indices(text) for text in texts]
        return [[(start, start + len(chunk), chunk) for start, chunk in pieces] for pieces in splits]

    def chunk(self, documents: Sequence[tuple[SourceRow, str]]) -> list[Chunk]:
        """All chunks of validated documents, given as (row, document hash) pairs, in document order."""
        assert all(row.doc_id is not None and row.text is not None for row, _ in documents), "validated rows only"
        splits: dict[int, list[tuple[int, int, str]]] = {}  # document position -> its pieces
        for markdown in (False, True):
            positions = [i for i, (row, _) in enumerate(documents) if (row.kind == "markdown") == markdown]
            splits.update(zip(positions, self.split([documents[i][0].text for i in positions], markdown=markdown), strict=True))
        chunks = [
            Chunk(row.doc_id, index, text, start, end, row.title, row.source, row.metadata, doc_hash)
            for position, (row, doc_hash) in enumerate(documents)
            for index, (start, end, text) in enumerate(splits[position])
        ]
        return self._fit_titles(chunks) if self.model_tokens is not None else chunks

    def _fit_titles(self, chunks: list[Chunk]) -> list[Chunk]:
        """Cut each title, chunk by chunk, to the tokens the model has left beside the chunk and the line
        break between them. Only chunks of titles that might not fit are tokenized."""
        title_offsets = {title: self._tokenizer.encode(title, add_special_tokens=False).offsets
                         for title in {chunk.title for chunk in chunks if chunk.title}}
        at_risk = [i for i, chunk in enumerate(chunks)
                   if chunk.title and len(title_offsets[chunk.title]) + TITLE_SEPARATOR_TOKENS + self.chunk_tokens > self.model_tokens]
        encodings = self._tokenizer.encode_batch([chunks[i].text for i in at_risk], add_special_tokens=False)
        for i, encoding in zip(at_risk, encodings, strict=True):
            offsets = title_offsets[chunks[i].title]
            room = max(0, self.model_tokens - TITLE_SEPARATOR_TOKENS - len(encoding.ids))
            if len(offsets) > room:
                chunks[i] = replace(chunks[i], embedded_title=self._cut(chunks[i].title, offsets, room))
        return chunks

    def _cut(self, title: str, offsets: list[tuple[int, int]], room: int) -> str:
        """The title up to where its first token past `room` starts, then shorter while it re-tokenizes
        into more than `room` tokens: a byte-level BPE token can hold part of a character, and merges
        differ at the new end."""
        while room > 0:
            cut = title[: offsets[room][0]].rstrip()
            if len(self._tokenizer.encode(cut, add_special_tokens=False).ids) <= room:
                return cut
            room -= 1
        return ""
