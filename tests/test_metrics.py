import math

import pytest

from tasks.metrics import citation_checks, exact_match, normalize_answer, rank_documents, retrieval_metrics, token_f1


def test_chunk_hits_map_to_documents_by_their_best_chunk():
    assert rank_documents(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_retrieval_metrics_against_hand_computed_values():
    qrels = {
        "q1": {"d1": 1, "d2": 1},
        "q2": {"d3": 1},
        "q3": {"d4": 1},
        "q4": {"d50": 1},
        "q5": {"a": 2, "b": 1, "z": 0},
    }
    rankings = {
        "q1": ["d1", "d9", "d2"],  # the order is kept although "d9" sorts after "d2"
        "q2": ["d5", "d3"],
        "q3": [],
        "q4": [f"d{i}" for i in range(51)],  # the relevant document is 51st
        "q5": ["b", "a"],
        "not-judged": ["d1"],
    }
    metrics = retrieval_metrics(qrels, rankings)
    assert set(metrics) == set(qrels)
    assert metrics["q1"] == pytest.approx(
        {"ndcg@10": (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), "recall@10": 1, "recall@100": 1, "mrr@10": 1})
    assert metrics["q2"] == pytest.approx({"ndcg@10": 1 / math.log2(3), "recall@10": 1, "recall@100": 1, "mrr@10": 0.5})
    assert metrics["q3"] == {"ndcg@10": 0, "recall@10": 0, "recall@100": 0, "mrr@10": 0}
    assert metrics["q4"] == pytest.approx({"ndcg@10": 0, "recall@10": 0, "recall@100": 1, "mrr@10": 0})
    # Graded relevance: gain = grade; ideal order a (2), b (1).
    assert metrics["q5"]["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert metrics["q5"]["mrr@10"] == 1


def test_squad_normalization_exact_match_and_f1():
    assert normalize_answer("  The Wind-sensor  bus, timed out!") == "windsensor bus timed out"
    assert exact_match("The tipping bucket assembly [2].", ["tipping bucket assembly"]) == 1.0
    assert exact_match("a tipping bucket", ["tipping bucket assembly"]) == 0.0
    # prediction "wind sensor bus timeout error" vs "wind sensor bus timeout": 4 common, P = 4/5, R = 1.
    assert token_f1("wind sensor bus timeout error", ["clock drift", "wind sensor bus timeout"]) == pytest.approx(2 * 0.8 / 1.8)
    assert token_f1("nothing alike", ["wind sensor"]) == 0.0
    assert token_f1("", [""]) == 1.0
    assert exact_match("drift", ["clock", "drift"]) == 1.0  # any reference, not the first
    assert token_f1("the bus bus", ["bus bus"]) == 1.0  # tokens are counted, not a set: {bus} would give 0.5
    assert normalize_answer("An anemometer at the theatre") == "anemometer at theatre"  # whole words only


def test_citation_checks():
    contexts = ["a.md", "b.md", "c.md"]
    assert citation_checks([2, 7], contexts, {"b.md": 1}) == {"citations": 2, "valid_citations": 1, "cited_relevant": True}
    assert citation_checks([1], contexts, {"b.md": 1}) == {"citations": 1, "valid_citations": 1, "cited_relevant": False}
    assert citation_checks([], contexts, {"b.md": 1})["cited_relevant"] is None
    assert citation_checks([3], contexts, None)["cited_relevant"] is None
    # [0] is no passage: counted as a citation, valid for none (contexts[-1] is the last passage).
    assert citation_checks([0], ["a.md", "b.md"], {"b.md": 1}) == {"citations": 1, "valid_citations": 0, "cited_relevant": False}
