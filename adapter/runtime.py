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
from typing import TYPE_CHECKING

from adapter.caches import Caches, ModelStore
from adapter.rerank import build_reranker, reranker_key
from adapter.search.hybrid import build_embedder, embedder_key

if TYPE_CHECKING:
    from adapter.config import Settings
    from adapter.rerank.base import Reranker

__all__ = ["Caches", "ModelStore", "Runtime"]


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
        if self.settings.reranker == "none":
            return self.reranker(model)
        with self._lock:
            return self._rerankers.get(reranker_key(self.settings, model or self.settings.model))

    def register_reranker(self, reranker: "Reranker", model: str | None = None,
                          settings: "Settings | None" = None) -> None:
        """Serve `reranker` for `model` (benchmarks that build a model from random weights)."""
        settings = settings or self.settings
        with self._lock:
            self._rerankers[reranker_key(settings, model or settings.model)] = reranker

    # --- the embedder (dense recall) ------------------------------------------------------
    def embedder(self, settings: "Settings | None" = None) -> object | None:
        """The Qwen3Embedder for the settings, a str saying why it is unavailable, or None when
        dense recall is off. Built (or failed) once; a failure is logged once."""
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
