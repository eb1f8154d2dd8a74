"""Reranker backends and the per-process registry that loads each model once.

`get_reranker(settings, model)` returns the backend named by `settings.reranker`:
"none" → BM25 order; "remote" → a `/v1/rerank` server at `remote_url`; "qwen3" → the Qwen3-Reranker engine for `model` (a tier alias, a
Hugging Face id or a local directory). A model that cannot be loaded either raises
(`reranker_required = true`) or degrades to BM25 order; that backend's `ScoreResult` then
says why (`keyword_reason`, `fallback`), which the pipeline turns into a warning in every Bundle.
"""
from __future__ import annotations

import logging
import threading

from adapter.config import Settings
from adapter.errors import BadRequest, ModelLoadError
from adapter.metrics import MODEL_LOADS
from adapter.rerank.base import Reranker, ScoreOptions, ScoreResult
from adapter.rerank.bm25_only import BM25OnlyReranker

__all__ = ["Reranker", "ScoreOptions", "ScoreResult", "get_reranker", "peek_reranker",
           "register_reranker", "reset_rerankers", "BACKENDS"]

log = logging.getLogger(__name__)
BACKENDS = ("qwen3", "none", "remote")
_cache: dict[tuple, Reranker] = {}
_lock = threading.Lock()


def _load(settings: Settings, model: str) -> Reranker:
    if settings.reranker == "none":
        MODEL_LOADS.labels("none", "loaded").inc()
        return BM25OnlyReranker()
    if settings.reranker == "remote":
        from adapter.rerank.remote import RemoteReranker

        return RemoteReranker.from_settings(settings, model)
    if settings.reranker != "qwen3":
        raise BadRequest(f"unknown reranker {settings.reranker!r}; use one of {', '.join(BACKENDS)}")
    from adapter.rerank.qwen3 import Qwen3Reranker  # torch/transformers only when needed

    try:
        loaded = Qwen3Reranker(model, device=settings.device, dtype=settings.dtype,
                               max_length=settings.max_length,
                               batch_tokens=settings.batch_tokens,
                               instruction=settings.instruction,
                               options=ScoreOptions.from_settings(settings))
        MODEL_LOADS.labels("qwen3", "loaded").inc()
        return loaded
    except ModelLoadError as exc:
        if settings.reranker_required:
            MODEL_LOADS.labels("qwen3", "failed").inc()
            raise
        MODEL_LOADS.labels("qwen3", "fallback").inc()
        log.warning("reranker: serving BM25 order, the model is unavailable: %s", exc.message)
        return BM25OnlyReranker(fallback_reason=exc.message)


def _key(settings: Settings, model: str) -> tuple:
    """Every setting a loaded reranker is built with: two settings that differ in any of them
    get two instances (and two ranking-cache namespaces)."""
    return (settings.reranker, model, settings.device, settings.dtype, settings.max_length,
            settings.batch_tokens, settings.instruction, settings.reranker_required,
            settings.long_documents, settings.max_chunks_per_doc, settings.overlap_tokens,
            settings.remote_url, settings.remote_model)


def peek_reranker(settings: Settings, model: str | None = None) -> Reranker | None:
    """The reranker for `model` if this process has loaded it already (readiness), else None."""
    if settings.reranker == "none":
        return get_reranker(settings, model)  # nothing to load
    with _lock:
        return _cache.get(_key(settings, model or settings.model))


def get_reranker(settings: Settings, model: str | None = None) -> Reranker:
    """The process-wide reranker for (backend, model, device, dtype, …), loaded once."""
    model = model or settings.model
    key = _key(settings, model)
    with _lock:
        if key not in _cache:
            _cache[key] = _load(settings, model)
        return _cache[key]


def register_reranker(settings: Settings, model: str, reranker: Reranker) -> None:
    """Serve an already built reranker for `model` (benchmarks with random weights)."""
    with _lock:
        _cache[_key(settings, model)] = reranker


def reset_rerankers() -> None:
    """Forget loaded models (tests)."""
    with _lock:
        _cache.clear()
