"""BM25 recall over flattened documents: one index per resource type, Lucene's IDF, stems.

Real charts are mostly notes, and notes repeat the problem list: in one index over all three
types, a word such as "kidney" is in most documents, Okapi's IDF log((N − n + 0.5)/(n + 0.5))
is zero or below for it, and the Condition that names it scores nothing. So:

- **One index per resource type** (`recall_matches`): a Condition competes with Conditions,
  a note with notes. Within the Conditions "kidney" is rare again, and its weight says so.
- **Lucene's IDF**, log(1 + (N − n + 0.5)/(n + 0.5)), which never reaches zero: a word found
  in every document of a type still counts a little. Term frequency and length are Okapi's
  (k1 = 1.5, b = 0.75).
- **Per-type quotas**: the `k` candidates hold, for each type with matches, its best
  matching documents up to an equal share of `k` (k // types with matches); the remaining
  places go to the best documents of any type by score. However many notes a chart holds,
  the matching Conditions and Observations reach the reranker.
- **Stems** (adapter/search/analyze.py): documents are indexed as Snowball stems of their
  language; the query (adapter/search/expand.py) is weighted stems too. A term's BM25
  contribution is multiplied by its query weight.

`BM25Index` keeps postings (term → documents, frequencies), so a query costs its own terms.
With `idf="robertson"` its scores are rank-bm25's `BM25Okapi(k1=1.5, b=0.75, epsilon=0)`,
and with the default Lucene IDF those of a `BM25Okapi` whose `_calc_idf` is Lucene's: tests
keep rank-bm25 as the reference. An empty corpus, or one whose documents are all empty,
scores 0.0 everywhere.

Recall never drops a document it does not have to: when the documents fit in `k`, all of them
come back (in score order). Ties are broken by document id, so the order is deterministic.
"""
from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import numpy as np

from adapter.errors import BadRequest
from adapter.lru import LRU
from adapter.models import Document
from adapter.search.analyze import DEFAULT_LANGUAGE, language_of, stems
from adapter.search.expand import OWN_WORD_WEIGHT, own_words, weighted_query
from adapter.search.tokenize import tokenize

if TYPE_CHECKING:
    from adapter.caches import Caches

log = logging.getLogger(__name__)

K1, B = 1.5, 0.75
IDF = ("lucene", "robertson")
#: a record word sharing a long beginning with the user's word, or holding it whole
#: ("anemic" ~ "anemia", "osteoporotic" ~ "osteoporosis", "triglycerid" in
#: "hypertriglyceridemia"), counts at this share of the user's weight
NEIGHBOUR_WEIGHT = 0.5
NEIGHBOUR_MIN = 5         # shared beginning: at least this many letters …
NEIGHBOUR_SHARE = 0.75    # … and this share of the shorter word
CONTAINED_MIN = 7         # a user's word found inside a longer record word: this long at least
USER_NEIGHBOUR = NEIGHBOUR_WEIGHT * 1.0  # the user's words weigh 1.0


def _shares_beginning(word: str, term: str) -> bool:
    shorter = min(len(word), len(term))
    common = 0
    for a, b in zip(word, term):
        if a != b:
            break
        common += 1
    return common >= NEIGHBOUR_MIN and common >= NEIGHBOUR_SHARE * shorter


class Vocabulary:
    """An index's words, sorted (a shared beginning is a range) and joined (a word inside a
    longer one is a substring search in C): finding a word's neighbours costs its range and
    its occurrences, not a pass over every word."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = sorted(w for w in words if w.isalpha())
        self.joined = "\n" + "\n".join(self.words) + "\n"
        self.offsets = []
        at = 1
        for w in self.words:
            self.offsets.append(at)
            at += len(w) + 1

    def neighbours(self, term: str) -> list[str]:
        if len(term) < NEIGHBOUR_MIN + 1 or not term.isalpha():
            return []
        found: dict[str, None] = {}
        head = term[:NEIGHBOUR_MIN]
        i = bisect.bisect_left(self.words, head)
        while i < len(self.words) and self.words[i].startswith(head):
            word = self.words[i]
            if word != term and _shares_beginning(word, term):
                found[word] = None
            i += 1
        if len(term) >= CONTAINED_MIN:
            at = self.joined.find(term)
            while at != -1:
                k = bisect.bisect_right(self.offsets, at) - 1
                word = self.words[k]
                if len(word) > len(term):
                    found[word] = None
                at = self.joined.find(term, self.offsets[k] + len(word))
        return sorted(found)


def neighbours(term: str, vocabulary: Sequence[str]) -> list[str]:
    """Record words that are another form of the user's `term` (Snowball stems inflections,
    not derivations): a shared beginning of `NEIGHBOUR_MIN`+ letters covering
    `NEIGHBOUR_SHARE` of the shorter word, or `term` inside a longer word. Letters only."""
    return Vocabulary(vocabulary).neighbours(term)


def analyzed(text: str, language: str = DEFAULT_LANGUAGE,
             cache: LRU[list[str]] | None = None) -> list[str]:
    """The index terms of `text` (its tokens' stems in `language`), remembered per text in
    `cache` when given (a runtime's `Caches.tokens`; callers must not modify the list)."""
    key = text if language == DEFAULT_LANGUAGE else f"{language}\0{text}"
    terms = cache.get(key) if cache is not None else None
    if terms is None:
        terms = stems(tokenize(text), language)
        if cache is not None:
            cache.put(key, terms)
    return terms


def document_language(document: Document) -> str:
    """The language a record is stemmed in: its FHIR `language`, English when absent."""
    resource = document.resource if isinstance(document.resource, dict) else {}
    return language_of(resource.get("language"))


class BM25Index:
    """BM25 over a fixed list of texts, as postings: `scores(query)` gives raw BM25 of the
    weighted query in input order, costing the query terms' postings only.

    idf "lucene" (default): log(1 + (N − n + 0.5)/(n + 0.5)), always positive. idf
    "robertson": log((N − n + 0.5)/(n + 0.5)) floored at 0, rank-bm25's BM25Okapi with
    epsilon = 0 (the reference the tests compare with). Built in one pass with
    `collections.Counter` (rank-bm25 counts token by token in Python, and has no postings).
    """

    def __init__(self, texts: Sequence[str] = (), *,
                 tokenized: Sequence[list[str]] | None = None,
                 tokens: LRU[list[str]] | None = None,
                 languages: Sequence[str] | None = None, idf: str = "lucene") -> None:
        if idf not in IDF:
            raise ValueError(f"idf {idf!r}: use one of {IDF}")
        if tokenized is not None:
            corpus = list(tokenized)
        else:
            langs = list(languages) if languages is not None else [DEFAULT_LANGUAGE] * len(texts)
            corpus = [analyzed(t or "", lang, tokens) for t, lang in zip(texts, langs)]
        self.size = len(corpus)
        self._terms: dict[str, int] = {}
        self._starts = np.zeros(1, dtype=np.int64)
        self._docs = np.zeros(0, dtype=np.int64)
        self._freqs = np.zeros(0)
        self._idf = np.zeros(0)
        self._df = np.zeros(0, dtype=np.int64)
        self._neighbours: dict[str, list[str]] = {}
        self._vocabulary: Vocabulary | None = None
        doc_len = np.fromiter(map(len, corpus), dtype=float, count=self.size)
        if not self.size or not doc_len.any():
            return  # nothing to match: every score is 0.0
        self._norm = K1 * (1 - B + B * doc_len / doc_len.mean())
        counters = [Counter(terms) for terms in corpus]
        keys: list[str] = []
        freqs: list[int] = []
        for counts in counters:  # C-level extends: one Python step per document
            keys.extend(counts)
            freqs.extend(counts.values())
        self._terms = terms = {t: i for i, t in enumerate(dict.fromkeys(keys))}
        term_ids = np.fromiter(map(terms.__getitem__, keys), dtype=np.int64, count=len(keys))
        docs = np.repeat(np.arange(self.size, dtype=np.int64),
                         np.fromiter(map(len, counters), dtype=np.int64, count=self.size))
        order = np.argsort(term_ids, kind="stable")  # a term's documents are distinct
        self._docs = docs[order]
        self._freqs = np.fromiter(freqs, dtype=float, count=len(freqs))[order]
        self._df = df = np.bincount(term_ids, minlength=len(terms))
        self._starts = np.concatenate(([0], np.cumsum(df)))
        ratio = (self.size - df + 0.5) / (df + 0.5)
        self._idf = np.log1p(ratio) if idf == "lucene" else np.maximum(0.0, np.log(ratio))

    def __len__(self) -> int:
        return self.size

    def scores(self, query: str) -> list[float]:
        """Raw BM25 score of every document for the weighted `query`, in input order."""
        return self.scores_and_matches(query)[0]

    def scores_and_matches(self, query: str) -> tuple[list[float], list[bool]]:
        """(scores, matched): matched is True where a document holds one of the user's own
        words, or an added term that tells documents apart (found in fewer than half of
        them; an added word such as a category every Condition has does not)."""
        score = np.zeros(self.size)
        matched = np.zeros(self.size, dtype=bool)
        for term, weight in self._with_neighbours(query).items():
            tid = self._terms.get(term)
            if tid is None:
                continue
            span = slice(self._starts[tid], self._starts[tid + 1])
            where, tf = self._docs[span], self._freqs[span]
            idf = self._idf[tid]
            if weight >= OWN_WORD_WEIGHT or 2 * self._df[tid] < self.size:
                matched[where] = True
            if idf > 0.0:
                score[where] += weight * idf * (tf * (K1 + 1) / (tf + self._norm[where]))
        return score.tolist(), matched.tolist()

    def _with_neighbours(self, query: str) -> dict[str, float]:
        """The weighted query plus, for each of the user's words (as typed and as stems), its
        `neighbours` in this index at `NEIGHBOUR_WEIGHT` (a term keeps its highest weight)."""
        weights = weighted_query(query)
        out = dict(weights)
        own = [t for t, w in weights.items() if w >= OWN_WORD_WEIGHT]
        for word in dict.fromkeys([*own_words(query), *own]):
            found = self._neighbours.get(word)
            if found is None:
                if self._vocabulary is None:
                    self._vocabulary = Vocabulary(list(self._terms))
                if len(self._neighbours) > 4096:  # one index, many questions: stay bounded
                    self._neighbours.clear()
                found = self._neighbours[word] = self._vocabulary.neighbours(word)
            for term in found:
                if term not in weights:
                    out[term] = max(out.get(term, 0.0), USER_NEIGHBOUR)
        return out


def index_for(texts: list[str], caches: "Caches | None" = None,
              languages: list[str] | None = None) -> BM25Index:
    """The BM25 index over `texts` (stemmed in `languages`, English by default); with a
    runtime's `caches`, built once per distinct corpus (the same record searched again, for
    another question or the next page, reuses it) from terms cached per text."""
    if caches is None:
        return BM25Index(texts, languages=languages)
    key = (tuple(texts), tuple(languages or ()))
    index = caches.indexes.get(key)
    if index is None:
        index = BM25Index(texts, tokens=caches.tokens, languages=languages)
        caches.indexes.put(key, index)
    return index


def bm25_scores(query: str, texts: list[str]) -> list[float]:
    """Raw BM25 scores of `texts` for `query`, in input order."""
    return BM25Index(texts).scores(query)


def ranking_scores(query: str, texts: list[str], tokens: LRU[list[str]] | None = None
                   ) -> list[float]:
    """BM25 scores of a small set on its own (the `none` backend's candidates), in input
    order: Lucene's IDF stays positive, so even two records can be told apart."""
    return BM25Index(texts, tokens=tokens).scores(query)


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
    documents (of all, not only the candidates) that hold one.

    Each resource type is scored in its own index; the candidates are each type's best
    matches up to an equal share of `k`, then the best of the rest by score (see the module
    docstring), listed best first by score, ties by id."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(f"recall of {k!r} is not a positive whole number; ask for at least 1 "
                         "candidate (e.g. recall=100)", expression="recall")
    if not documents:
        return [], 0
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        groups.setdefault(doc.type, []).append(i)
    scores = [0.0] * len(documents)
    matched = [False] * len(documents)
    for members in groups.values():
        index = index_for([documents[i].text for i in members], caches,
                          [document_language(documents[i]) for i in members])
        type_scores, type_matched = index.scores_and_matches(query)
        for i, score, holds in zip(members, type_scores, type_matched):
            scores[i], matched[i] = score, holds

    def rank_key(i: int) -> tuple[float, bool, str]:
        return (-scores[i], not matched[i], documents[i].id)

    order = sorted(range(len(documents)), key=rank_key)
    if len(documents) > k:
        order = with_quotas(order, [d.type for d in documents], matched, k)
    log.debug("bm25 recall: %d of %d documents kept (%d types)", len(order), len(documents),
              len(groups))
    return [(documents[i], scores[i], matched[i]) for i in order], sum(matched)


def with_quotas(order: list[int], types: Sequence[str], eligible: Sequence[bool], k: int
                ) -> list[int]:
    """The first `k` of `order` (indices, best first) such that each type with eligible
    documents keeps its best eligible ones up to k // (such types), the other places going to
    the best of the rest; the kept indices stay in `order`'s order."""
    with_matches = {types[i] for i in order if eligible[i]}
    share = k // max(1, len(with_matches))
    taken: dict[str, int] = {}
    chosen: set[int] = set()
    for i in order:
        if eligible[i] and taken.get(types[i], 0) < share:
            taken[types[i]] = taken.get(types[i], 0) + 1
            chosen.add(i)
    for i in order:
        if len(chosen) >= k:
            break
        chosen.add(i)
    return [i for i in order if i in chosen]
