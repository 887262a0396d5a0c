import math

from tasks.sparse import STOPWORDS, Analyzer, Bm25, mean_length, term_id


def test_analyzer_lowercases_drops_stopwords_and_stems():
    assert Analyzer().terms("The Studies of running IS a generalization, x 42") == ["studi", "run", "general", "42"]


def test_term_ids_are_stable_unsigned_32_bit():
    assert term_id("studi") == term_id("studi") != term_id("run")
    assert 0 <= term_id("studi") < 2**32
    assert term_id("studi") == 2201219497  # fixed forever: stored vectors depend on it


def test_document_values_are_bm25_term_frequency_saturation():
    bm25 = Bm25(avgdl=4.0, k1=1.2, b=0.75)
    vector = bm25.document("cells cells proteins")  # dl = 3 terms: cell x2, protein x1
    norm = 1.2 * (1 - 0.75 + 0.75 * 3 / 4.0)
    expected = {term_id("cell"): 2 * 2.2 / (2 + norm), term_id("protein"): 1 * 2.2 / (1 + norm)}
    assert vector.indices == sorted(expected)
    assert all(math.isclose(v, expected[i]) for i, v in zip(vector.indices, vector.values))


def test_query_weights_each_unique_term_once():
    vector = Bm25(avgdl=10).query("cell cells CELL protein the")
    assert vector.indices == sorted([term_id("cell"), term_id("protein")]) and vector.values == [1.0, 1.0]


def test_mean_length_counts_index_terms():
    assert mean_length(["the cell divides", "proteins fold and bind quickly"]) == (2 + 4) / 2
    assert mean_length([]) == 1.0
    assert mean_length(["x", "the cell"]) == 1.0  # half a term per text is still one: no length divides by less
    assert len(STOPWORDS) == 33 and {"a", "the", "with", "will", "such"} <= STOPWORDS  # Lucene's English set


def test_text_is_compared_in_one_unicode_form_and_older_collections_keep_version_1():
    """A document in NFD (macOS) or fullwidth forms matched no query typed the usual way."""
    analyzer = Analyzer()
    nfc, nfd = "café résumé", "cafe\u0301 re\u0301sume\u0301"
    assert analyzer.terms(nfd) == analyzer.terms(nfc) == ["café", "résumé"]
    assert analyzer.terms("ＣＡＦＥ ﬁle STRASSE") == analyzer.terms("cafe file straße") == ["cafe", "file", "strass"]
    # Collections from before keep version 1's terms, for their queries as for their later writes.
    assert Analyzer(1).terms(nfd) == ["cafe", "re", "sume"] and Analyzer(1).terms("ＣＡＦＥ") == ["ｃａｆｅ"]
    assert Bm25(avgdl=3.0, analyzer_version=1).query(nfd) != Bm25(avgdl=3.0).query(nfd) == Bm25(avgdl=3.0).query(nfc)
