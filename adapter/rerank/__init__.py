"""Reranker backends, and how one is built from settings.

`build_reranker(settings, model, models)` returns the backend named by `settings.reranker`:
"none" → BM25 order; "remote" → a `/v1/rerank` server at `remote_url`; "qwen3" → the Qwen3-Reranker engine for `model` (a tier alias, a
Hugging Face id or a local directory), its weights from `models` (an `adapter.runtime.ModelStore`). A model that cannot be loaded either raises
(`reranker_required = true`) or degrades to BM25 order; that backend's `ScoreResult` then
says why (`keyword_reason`, `fallback`), which the pipeline turns into a warning in every Bundle.
Built backends are kept by their owner, `adapter.runtime.Runtime.reranker`, under
`reranker_key`: there is no process-wide registry.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapter.config import Settings
from adapter.errors import BadRequest, ModelLoadError
from adapter.metrics import MODEL_LOADS
from adapter.rerank.base import Reranker, ScoreOptions, ScoreResult
from adapter.rerank.keyword import KeywordReranker
from adapter.rerank.remote import RemoteReranker

if TYPE_CHECKING:
    from adapter.caches import Caches, ModelStore

__all__ = ["Reranker", "ScoreOptions", "ScoreResult", "build_reranker", "reranker_key",
           "BACKENDS"]

log = logging.getLogger(__name__)
BACKENDS = ("qwen3", "none", "remote")


def build_reranker(settings: Settings, model: str, models: "ModelStore | None" = None,
                   caches: "Caches | None" = None) -> Reranker:
    """A new reranker for `model` under `settings`; Qwen3 weights come from `models` when
    given (loaded there once), else are loaded for this instance alone. Keyword order reads
    BM25 tokens from `caches` (the runtime's, which recall already filled)."""
    tokens = caches.tokens if caches is not None else None
    if settings.reranker == "none":
        MODEL_LOADS.labels("none", "loaded").inc()
        return KeywordReranker(tokens=tokens)
    if settings.reranker == "remote":
        return RemoteReranker.from_settings(settings, model)
    if settings.reranker != "qwen3":
        raise BadRequest(f"unknown reranker {settings.reranker!r}; use one of {', '.join(BACKENDS)}")
    from adapter.rerank.qwen3 import Qwen3Reranker  # torch/transformers only when needed

    try:
        loaded = Qwen3Reranker(model, device=settings.device, dtype=settings.dtype,
                               max_length=settings.max_length,
                               batch_tokens=settings.batch_tokens,
                               instruction=settings.instruction,
                               options=ScoreOptions.from_settings(settings), models=models,
                               attention=settings.attention, cuda_graphs=settings.cuda_graphs)
        MODEL_LOADS.labels("qwen3", "loaded").inc()
        return loaded
    except ModelLoadError as exc:
        if settings.reranker_required:
            MODEL_LOADS.labels("qwen3", "failed").inc()
            raise
        MODEL_LOADS.labels("qwen3", "fallback").inc()
        log.warning("reranker: serving BM25 order, the model is unavailable: %s", exc.message)
        return KeywordReranker(fallback_reason=exc.message, tokens=tokens)


def reranker_key(settings: Settings, model: str) -> tuple:
    """Every setting a loaded reranker is built with: two settings that differ in any of them
    get two instances (and two ranking-cache namespaces)."""
    return (settings.reranker, model, settings.device, settings.dtype, settings.max_length,
            settings.batch_tokens, settings.attention, settings.cuda_graphs,
            settings.instruction, settings.reranker_required,
            settings.long_documents, settings.max_chunks_per_doc, settings.overlap_tokens,
            settings.remote_url, settings.remote_model)
