"""BM25 as Qdrant sparse vectors: term statistics are computed here once, idf by Qdrant at query time.

A document (chunk) vector holds, per term, the BM25 term-frequency part
`tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))`; the collection's sparse vector uses
Qdrant's IDF modifier, and a query vector holds weight 1 per unique term, so Qdrant's dot product
is exactly BM25 (idf computed by Qdrant over the collection's points).

Terms: words of two or more characters (the scikit-learn / bm25s token pattern) of the text in
Unicode NFKC, case-folded, minus Lucene's English stop words (the set Anserini and bm25s use for
their published BEIR numbers), Snowball-stemmed (PyStemmer). A term's sparse index is the first
four bytes of its BLAKE2b hash, stable across runs and processes, so incremental ingest needs no
shared vocabulary.

A collection records the analyzer version it was built with (`bm25_analyzer` in its metadata);
collections from before the version was recorded (version 1: lowercased, not normalised) keep
their analyzer for their queries and later writes, until a rebuild.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

K1 = 1.2
B = 0.75
# Lucene's EnglishAnalyzer stop set (ENGLISH_STOP_WORDS_SET), as used by Anserini and bm25s.
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there "
    "these they this to was will with".split()
)
_TOKEN = re.compile(r"(?u)\b\w\w+\b")
ANALYZER_VERSION = 2


@dataclass(frozen=True)
class SparseVector:
    """Term ids (sorted, unique) and their weights."""

    indices: list[int]
    values: list[float]


class Analyzer:
    """Text -> stemmed index terms, by the rules of `version` (see the module's docstring)."""

    def __init__(self, version: int = ANALYZER_VERSION) -> None:
        self.version = version

    @cached_property
    def _stemmer(self):
        import Stemmer

        return Stemmer.Stemmer("english")

    def terms(self, text: str) -> list[str]:
        """Version 2 compares text in one Unicode form: a document in NFD (macOS) or fullwidth forms
        matched no query typed the usual way."""
        text = text.lower() if self.version == 1 else unicodedata.normalize("NFKC", text).casefold()
        return self._stemmer.stemWords([w for w in _TOKEN.findall(text) if w not in STOPWORDS])


@lru_cache(maxsize=1 << 16)
def term_id(term: str) -> int:
    """A stable unsigned 32-bit id for a term. Memoized: hashing was 40 % of a chunk's BM25 vector,
    and a corpus repeats a small vocabulary (bench/bench_prep.py)."""
    return int.from_bytes(hashlib.blake2b(term.encode("utf-8"), digest_size=4).digest(), "little")


def _counts(terms: Iterable[str]) -> Counter[int]:
    return Counter(term_id(term) for term in terms)


@dataclass(frozen=True)
class Bm25:
    """BM25 document and query vectors; `avgdl` is the collection's mean document length in terms."""

    avgdl: float
    k1: float = K1
    b: float = B
    analyzer_version: int = ANALYZER_VERSION

    @cached_property
    def analyzer(self) -> Analyzer:
        return Analyzer(self.analyzer_version)

    def document(self, text: str) -> SparseVector:
        counts = _counts(self.analyzer.terms(text))
        norm = self.k1 * (1 - self.b + self.b * sum(counts.values()) / self.avgdl)
        ids = sorted(counts)
        return SparseVector(ids, [counts[i] * (self.k1 + 1) / (counts[i] + norm) for i in ids])

    def query(self, text: str) -> SparseVector:
        ids = sorted(_counts(self.analyzer.terms(text)))
        return SparseVector(ids, [1.0] * len(ids))


def mean_length(texts: Sequence[str], version: int = ANALYZER_VERSION) -> float:
    """Mean number of index terms per text (at least 1): the avgdl estimate for a new collection."""
    analyzer = Analyzer(version)
    total = sum(len(analyzer.terms(text)) for text in texts)
    return max(1.0, total / max(1, len(texts)))
