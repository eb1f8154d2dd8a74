"""What one app owns besides its settings: the caches of derived data and the loaded models.

A `Runtime` is built by whoever serves: `create_app` (one per Flask app, in
`AppState.runtime`), a Celery worker (`make_worker_app`: one per worker app, in
`app.fhir_runtime`, used by each of its processes), and each CLI command. Nothing here is a
module global: two apps in one process (tests, an embedding service) share no cached patient
text and no model, and dropping the app frees both.

- `Runtime.caches` (`Caches`): flattened text, validation problems, BM25 tokens and indexes,
  document vectors, time-budget cuts and whole rankings. All hold patient data, so they live
  in process memory only, bounded by `doc_cache_size` (0 turns them off).
- `Runtime.models` (`ModelStore`): model weights by (kind, checkpoint, device, dtype), loaded
  once and shared by every reranker or embedder built on them.
- `Runtime.reranker(model)` / `Runtime.embedder()`: the backends for this app's settings,
  built once per distinct setting (`adapter.rerank.reranker_key`).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from adapter.lru import LRU

if TYPE_CHECKING:
    from adapter.config import Settings
    from adapter.rerank.base import Reranker

__all__ = ["Caches", "ModelStore", "Runtime"]

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


class Runtime:
    """The caches and models of one app; see the module docstring."""

    def __init__(self, settings: "Settings") -> None:
        self.settings = settings
        self.caches = Caches(settings.doc_cache_size)
        self.models = ModelStore()
        self._rerankers: dict[tuple, "Reranker"] = {}
        self._embedders: dict[tuple, object] = {}
        self._lock = threading.Lock()

    # --- rerankers -----------------------------------------------------------------------
    def reranker(self, model: str | None = None, settings: "Settings | None" = None
                 ) -> "Reranker":
        """The reranker for `model` (default: the settings' model) under `settings` (default:
        this runtime's), built once: `adapter.rerank.build_reranker` (which may raise
        ModelLoadError, or fall back to BM25 order, as the settings say)."""
        from adapter.rerank import build_reranker, reranker_key

        settings = settings or self.settings
        model = model or settings.model
        key = reranker_key(settings, model)
        with self._lock:
            if key not in self._rerankers:
                self._rerankers[key] = build_reranker(settings, model, self.models,
                                                      self.caches)
            return self._rerankers[key]

    def loaded_reranker(self, model: str | None = None) -> "Reranker | None":
        """The reranker for `model` if it is built already (readiness), else None; the
        `none` backend has nothing to load and is always there."""
        from adapter.rerank import reranker_key

        if self.settings.reranker == "none":
            return self.reranker(model)
        with self._lock:
            return self._rerankers.get(reranker_key(self.settings, model or self.settings.model))

    def register_reranker(self, reranker: "Reranker", model: str | None = None,
                          settings: "Settings | None" = None) -> None:
        """Serve `reranker` for `model` (benchmarks that build a model from random weights)."""
        from adapter.rerank import reranker_key

        settings = settings or self.settings
        with self._lock:
            self._rerankers[reranker_key(settings, model or settings.model)] = reranker

    # --- the embedder (dense recall) ------------------------------------------------------
    def embedder(self, settings: "Settings | None" = None) -> object | None:
        """The Qwen3Embedder for the settings, a str saying why it is unavailable, or None when
        dense recall is off. Built (or failed) once; a failure is logged once."""
        from adapter.search.hybrid import build_embedder, embedder_key

        settings = settings or self.settings
        if not settings.embedder.strip():
            return None
        key = embedder_key(settings)
        with self._lock:
            if key not in self._embedders:
                self._embedders[key] = build_embedder(settings, self.models, self.caches.vectors)
            return self._embedders[key]

    def forget_models(self) -> None:
        """Drop every built backend and loaded weight (the next call loads again)."""
        with self._lock:
            self._rerankers.clear()
            self._embedders.clear()
        self.models.clear()
