"""BM25 recall over flattened documents (Okapi BM25, k1=1.5, b=0.75, epsilon=0).

`BM25Index` keeps postings (term → documents, frequencies) so a query costs its own terms;
its scores equal rank-bm25's `BM25Okapi(k1=1.5, b=0.75, epsilon=0)` (a test checks this).
With epsilon=0 a term found in more than half of the documents has idf 0, so it neither helps
nor hurts; these settings give the same scores as bm25s' "atire" method with "robertson" idf.
An empty corpus, or one whose documents are all empty, scores 0.0 everywhere.

The query is weighted (adapter/search/expand.py): the user's words at 1.0, clinical
expansions lower, stopwords dropped; a term's BM25 contribution is multiplied by its weight.
With all weights 1.0 the scores are rank-bm25's own.

Recall never drops a document it does not have to: when the documents fit in `k`, all of them
come back (in BM25 order). Ties are broken by document id, so the order is deterministic.
"""
from __future__ import annotations

import heapq
from collections import Counter
import logging
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from rank_bm25 import BM25Plus

from adapter.errors import BadRequest
from adapter.lru import LRU
from adapter.models import Document
from adapter.search.expand import OWN_WORD_WEIGHT, weighted_query
from adapter.search.tokenize import tokenize

if TYPE_CHECKING:
    from adapter.runtime import Caches

log = logging.getLogger(__name__)

K1, B, EPSILON = 1.5, 0.75, 0.0


def tokenize_cached(text: str, cache: LRU[list[str]] | None = None) -> list[str]:
    """`tokenize`, remembered per text in `cache` when given (a runtime's `Caches.tokens`;
    callers must not modify the returned list)."""
    tokens = cache.get(text) if cache is not None else None
    if tokens is None:
        tokens = tokenize(text)
        if cache is not None:
            cache.put(text, tokens)
    return tokens


def weighted_scores(model: BM25Plus, weights: dict[str, float]) -> tuple[list[float], list[bool]]:
    """`BM25Index`'s weighted scoring over a rank-bm25 model (the small candidate sets that
    `ranking_scores` orders), scanning each query term's frequencies."""
    size = model.corpus_size
    score = np.zeros(size)
    matched = np.zeros(size, dtype=bool)
    doc_len = np.asarray(model.doc_len, dtype=float)
    norm = model.k1 * (1 - model.b + model.b * doc_len / model.avgdl)
    for term, weight in weights.items():
        idf = model.idf.get(term)
        if idf is None:
            continue
        tf = np.fromiter((d.get(term, 0) for d in model.doc_freqs), dtype=float, count=size)
        if idf > 0.0 or weight >= OWN_WORD_WEIGHT:
            matched |= tf > 0
        if idf > 0.0:
            score += weight * idf * (tf * (model.k1 + 1) / (tf + norm))
    return score.tolist(), matched.tolist()


class BM25Index:
    """Okapi BM25 over a fixed list of texts, as postings: `scores(query)` gives raw BM25 of
    the weighted query in input order, costing the query terms' postings only.

    The same numbers as rank-bm25's `BM25Okapi(k1=1.5, b=0.75, epsilon=0)`: idf =
    log((N - n + 0.5) / (n + 0.5)), negative idf floored at 0. Built in one pass with
    `collections.Counter` (rank-bm25 counts token by token in Python, and has no postings).
    """

    def __init__(self, texts: Sequence[str] = (), *,
                 tokenized: Sequence[list[str]] | None = None,
                 tokens: LRU[list[str]] | None = None) -> None:
        corpus = (list(tokenized) if tokenized is not None
                  else [tokenize_cached(t or "", tokens) for t in texts])
        self.size = len(corpus)
        self._terms: dict[str, int] = {}
        self._starts = np.zeros(1, dtype=np.int64)
        self._docs = np.zeros(0, dtype=np.int64)
        self._freqs = np.zeros(0)
        self._idf = np.zeros(0)
        doc_len = np.fromiter(map(len, corpus), dtype=float, count=self.size)
        if not self.size or not doc_len.any():
            return  # nothing to match: every score is 0.0
        self._norm = K1 * (1 - B + B * doc_len / doc_len.mean())
        counters = [Counter(tokens) for tokens in corpus]
        keys: list[str] = []
        freqs: list[int] = []
        for counts in counters:  # C-level extends: one Python step per document
            keys.extend(counts)
            freqs.extend(counts.values())
        self._terms = terms = {t: i for i, t in enumerate(dict.fromkeys(keys))}
        term_ids = np.fromiter(map(terms.__getitem__, keys), dtype=np.int64, count=len(keys))
        docs = np.repeat(np.arange(self.size, dtype=np.int64),
                         np.fromiter(map(len, counters), dtype=np.int64, count=self.size))
        order = np.argsort(term_ids)  # any order within a term: its documents are distinct
        self._docs = docs[order]
        self._freqs = np.fromiter(freqs, dtype=float, count=len(freqs))[order]
        df = np.bincount(term_ids, minlength=len(terms))
        self._starts = np.concatenate(([0], np.cumsum(df)))
        self._idf = np.maximum(0.0, np.log((self.size - df + 0.5) / (df + 0.5)))

    def __len__(self) -> int:
        return self.size

    def scores(self, query: str) -> list[float]:
        """Raw BM25 score of every document for the weighted `query`, in input order."""
        return self.scores_and_matches(query)[0]

    def scores_and_matches(self, query: str) -> tuple[list[float], list[bool]]:
        """(scores, matched): matched is True where a document holds one of the user's own
        words, or an added term that tells documents apart (idf > 0; an added word found in
        over half the record, like a category every Condition has, does not)."""
        score = np.zeros(self.size)
        matched = np.zeros(self.size, dtype=bool)
        for term, weight in weighted_query(query).items():
            tid = self._terms.get(term)
            if tid is None:
                continue
            span = slice(self._starts[tid], self._starts[tid + 1])
            where, tf = self._docs[span], self._freqs[span]
            idf = self._idf[tid]
            if idf > 0.0 or weight >= OWN_WORD_WEIGHT:
                matched[where] = True
            if idf > 0.0:
                score[where] += weight * idf * (tf * (K1 + 1) / (tf + self._norm[where]))
        return score.tolist(), matched.tolist()


def index_for(texts: list[str], caches: "Caches | None" = None) -> BM25Index:
    """The BM25 index over `texts`; with a runtime's `caches`, built once per distinct corpus
    (the same record searched again, for another question or the next page, reuses it) from
    tokens cached per text."""
    if caches is None:
        return BM25Index(texts)
    key = tuple(texts)
    index = caches.indexes.get(key)
    if index is None:
        index = BM25Index(texts, tokens=caches.tokens)
        caches.indexes.put(key, index)
    return index


def bm25_scores(query: str, texts: list[str]) -> list[float]:
    """Raw BM25 scores of `texts` for `query`, in input order."""
    return BM25Index(texts).scores(query)


def ranking_scores(query: str, texts: list[str], tokens: LRU[list[str]] | None = None
                   ) -> list[float]:
    """BM25 scores for *ordering* a small set (the `none` backend), in input order.

    Okapi's idf is 0 for a term found in half the documents or more, so on a record of two
    Observations "hemoglobin" cannot tell them apart. Ordering uses BM25+'s idf,
    log((N + 1) / n), which stays positive, with Okapi's term-frequency part (delta = 0).
    """
    corpus = [tokenize_cached(t or "", tokens) for t in texts]
    weights = weighted_query(query)
    if not any(corpus) or not weights:
        return [0.0] * len(texts)
    plus = BM25Plus(corpus, k1=K1, b=B, delta=0)
    return weighted_scores(plus, weights)[0]


def normalise_scores(scores: list[float]) -> list[float]:
    """Map scores to [0, 1], 1 = best, monotone and deterministic.

    Non-negative scores (BM25's case) are divided by the best one, so 0.0 keeps meaning "no
    match" and 1.0 is the best document. Scores with negatives are min-max scaled. When every
    finite score is equal there is no evidence either way and each gets 0.5. +inf → 1.0;
    -inf and NaN → 0.0.
    """
    finite = [s for s in scores if math.isfinite(s)]
    out: list[float] = []
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    for s in scores:
        if math.isnan(s) or s == -math.inf:
            out.append(0.0)
        elif s == math.inf:
            out.append(1.0)
        elif high == low:
            out.append(0.5)
        elif low >= 0.0:
            out.append(s / high)
        else:
            out.append((s - low) / (high - low))
    return out


def recall(query: str, documents: list[Document], k: int, caches: "Caches | None" = None
           ) -> list[tuple[Document, float]]:
    """The `k` best documents by BM25 as (document, raw score), best first, ties by id.

    When `len(documents) <= k` every document is returned (ordered, none dropped).
    """
    return [(doc, score) for doc, score, _ in recall_matches(query, documents, k, caches)[0]]


def recall_matches(query: str, documents: list[Document], k: int,
                   caches: "Caches | None" = None
                   ) -> tuple[list[tuple[Document, float, bool]], int]:
    """`recall`, with each candidate's "holds a query term" flag and the number of
    documents (of all, not only the candidates) that hold one."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(f"recall of {k!r} is not a positive whole number; ask for at least 1 "
                         "candidate (e.g. recall=100)", expression="recall")
    if not documents:
        return [], 0
    scores, matched = index_for([d.text for d in documents], caches).scores_and_matches(query)

    def rank_key(i: int) -> tuple[float, bool, str]:
        return (-scores[i], not matched[i], documents[i].id)

    if len(documents) <= k:
        order = sorted(range(len(documents)), key=rank_key)
    else:
        order = heapq.nsmallest(k, range(len(documents)), key=rank_key)
    log.debug("bm25 recall: %d of %d documents kept", len(order), len(documents))
    return [(documents[i], scores[i], matched[i]) for i in order], sum(matched)
