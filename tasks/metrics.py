"""Evaluation metrics: ranking metrics from ir-measures (TREC's trec_eval underneath), answer metrics
as in SQuAD (normalized exact match and token F1), and citation checks."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from ir_measures import RR, R, nDCG

from tasks.prompts import without_citations

# Output name -> ir-measures measure. MRR@10 is the reciprocal rank of the first relevant document in the top 10.
RETRIEVAL_MEASURES = {"ndcg@10": nDCG @ 10, "recall@10": R @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}

Qrels = Mapping[str, Mapping[str, int]]


def rank_documents(doc_ids: Sequence[str]) -> list[str]:
    """Chunk hits (best first) -> documents ranked by their best chunk."""
    return list(dict.fromkeys(doc_ids))


def retrieval_metrics(qrels: Qrels, rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per query of `qrels`: every retrieval measure; a query with nothing retrieved scores 0.

    Documents are scored by position, so trec_eval ranks exactly in the given order (it would
    otherwise break score ties by document id).
    """
    import ir_measures

    per_query = {query_id: dict.fromkeys(RETRIEVAL_MEASURES, 0.0) for query_id in qrels}
    run = {
        query_id: {doc_id: float(len(ranking) - position) for position, doc_id in enumerate(ranking)}
        for query_id, ranking in rankings.items() if query_id in qrels and ranking
    }
    names = {measure: name for name, measure in RETRIEVAL_MEASURES.items()}
    qrels_dict = {query_id: dict(docs) for query_id, docs in qrels.items()}
    for metric in ir_measures.iter_calc(list(RETRIEVAL_MEASURES.values()), qrels_dict, run):
        per_query[metric.query_id][names[metric.measure]] = float(metric.value)
    return per_query


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization (lowercase, no punctuation, no articles, single spaces), after removing
    citation markers like [1] or [1, 2], which are not part of the answer."""
    return " ".join(_ARTICLES.sub(" ", without_citations(text).lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when the normalized prediction equals any normalized reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(reference) for reference in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best token-overlap F1 against the references (SQuAD)."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for reference in references:
        expected = normalize_answer(reference).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
        elif common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def citation_checks(citations: Sequence[int], context_doc_ids: Sequence[str], relevant: Mapping[str, int] | None) -> dict:
    """For one answer: how many citations point at a passage it was given, and whether a cited
    passage comes from a relevant document (None without relevance judgements or citations)."""
    valid = [number for number in citations if 1 <= number <= len(context_doc_ids)]
    cited_relevant = None
    if relevant is not None and citations:
        cited_relevant = any(relevant.get(context_doc_ids[number - 1], 0) > 0 for number in valid)
    return {"citations": len(citations), "valid_citations": len(valid), "cited_relevant": cited_relevant}
