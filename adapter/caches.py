"""The two stores a runtime owns, below everything that fills them: `Caches` (derived data,
each an `adapter.lru.LRU`) and `ModelStore` (loaded weights). `adapter.runtime.Runtime` holds
one of each per app; the search, rerank and FHIR modules are handed them (and name them only
for type checking)."""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from adapter.lru import LRU

__all__ = ["Caches", "ModelStore"]

T = TypeVar("T")

#: whole-corpus entries (BM25 indexes, rankings, budget cuts) are few and large
SMALL_CACHE = 32
RANKINGS_CACHE = 256


class Caches:
    """The derived-data caches of one runtime; every one bounded, every one in memory only."""

    def __init__(self, entries: int = 10000) -> None:
        #: flattened text per resource version (and per caller when an attachment was fetched)
        self.flattened: LRU[str] = LRU(0, "flattened_text")
        #: R4B validation problems per resource version
        self.problems: LRU[list[str]] = LRU(0, "validation")
        #: BM25 tokens per document text
        self.tokens: LRU[list[str]] = LRU(0, "bm25_tokens")
        #: whole BM25 indexes per corpus (another question over the same record reuses one)
        self.indexes: LRU[Any] = LRU(0, "bm25_index")
        #: document vectors per (embedder, resource version, text digest): per caller's text
        self.vectors: LRU[Any] = LRU(0, "doc_vectors")
        #: time-budget cuts (kept, tokens/s, tokens) per (reranker, question, candidates)
        self.budgets: LRU[tuple] = LRU(0, "budget")
        #: whole scoring results per (reranker, question, candidates): the next page is free
        self.scores: LRU[Any] = LRU(0, "scores")
        self.resize(entries)

    def resize(self, entries: int) -> None:
        """Bound the per-document caches at `entries` (0 turns every cache off)."""
        on = entries > 0
        for cache in (self.flattened, self.problems, self.tokens, self.vectors):
            cache.resize(entries)
        self.indexes.resize(SMALL_CACHE if on else 0)
        for cache in (self.budgets, self.scores):
            cache.resize(RANKINGS_CACHE if on else 0)

    def clear(self) -> None:
        for cache in self.all():
            cache.clear()

    def all(self) -> tuple[LRU[Any], ...]:
        return (self.flattened, self.problems, self.tokens, self.indexes, self.vectors,
                self.budgets, self.scores)


class ModelStore:
    """Loaded model weights by key, each loaded once (loads are serialised: two threads asking
    for one checkpoint load it once, and two large models never load at the same time)."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple, load: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._models:
                self._models[key] = load()
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
