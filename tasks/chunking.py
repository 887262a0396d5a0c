"""Token-aware chunking with the embedding model's own tokenizer, at paragraph and sentence boundaries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.errors import ModelError, first_line
from tasks.sources import SourceRow

# The splitter runs many texts on a Rust thread pool that does not survive fork(): a forked child that
# uses it waits forever for threads that exist only in its parent. Processes forked after this module
# loaded split one text at a time.
_POOL_PROCESS = os.getpid()


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

    @property
    def embedding_text(self) -> str:
        """What the model embeds: the title (document context for every chunk) and the chunk."""
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
    """

    def __init__(self, *, tokenizer, chunk_tokens: int, overlap_tokens: int) -> None:
        from semantic_text_splitter import MarkdownSplitter, TextSplitter

        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
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
        return [
            Chunk(row.doc_id, index, text, start, end, row.title, row.source, row.metadata, doc_hash)
            for position, (row, doc_hash) in enumerate(documents)
            for index, (start, end, text) in enumerate(splits[position])
        ]
