"""The first stage: BM25, optionally fused with Qwen3-Embedding (dense) recall by RRF.

`first_stage` is the one call `prepare_search` makes. With `embedder = ""` (the default) it is
BM25 recall exactly as before. With an embedder, every fetched document is ranked twice — by
BM25 (documents that match at least one query word) and by cosine to the query embedding —
and the two rankings are fused by reciprocal rank fusion (`adapter.search.fusion`, k =
`rrf_k`); the `recall` best fused documents, each resource type keeping up to its equal
share of them as in keyword recall (`bm25.with_quotas`), are the candidates, in fused order (each keeps its
BM25 score and "holds a query term" flag, which keyword order and its outcomes use). Dense recall runs in the API process (which already holds the documents), so nothing
new crosses Redis. An embedder that cannot be loaded is reported once at start-up and as a
warning in every Bundle; recall is then BM25 only.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapter.config import Settings
from adapter.errors import ModelLoadError
from adapter.lru import LRU
from adapter.models import Document, Outcome
from adapter.search.bm25 import recall_matches, with_quotas
from adapter.search.fusion import reciprocal_rank_fusion

if TYPE_CHECKING:
    from adapter.caches import ModelStore
    from adapter.runtime import Runtime

log = logging.getLogger(__name__)

def embedder_key(settings: Settings) -> tuple:
    """Every setting an embedder is built with (`adapter.runtime.Runtime.embedder` keeps one
    per distinct key)."""
    return (settings.embedder, settings.device, settings.dtype, settings.embedder_max_length,
            settings.batch_tokens, settings.embedder_instruction)


def build_embedder(settings: Settings, models: "ModelStore | None" = None,
                   vectors: LRU | None = None) -> object:
    """A warmed Qwen3Embedder for the settings (weights from `models`, document vectors cached
    in `vectors`), or the text saying why it cannot be loaded (logged once, here)."""
    from adapter.rerank.qwen3 import pick_device, pick_dtype
    from adapter.search.dense import Qwen3Embedder, load_embedding_model

    try:
        device = pick_device(settings.device)
        loaded = load_embedding_model(settings.embedder, device,
                                      pick_dtype(settings.dtype, device), models)
        embedder = Qwen3Embedder(loaded, task=settings.embedder_instruction or None,
                                 max_length=settings.embedder_max_length,
                                 batch_tokens=settings.batch_tokens, vectors=vectors)
        embedder.embed(["warm-up"])
        return embedder
    except ModelLoadError as exc:
        log.warning("dense recall off, keyword recall only: %s", exc.message)
        return exc.message


def first_stage(query: str, documents: list[Document], k: int, settings: Settings, *,
                ordered: bool = True, runtime: "Runtime | None" = None
                ) -> tuple[list[tuple[Document, float, bool]], int, list[Outcome]]:
    """The `k` best documents, best first, as (document, BM25 score, holds a query term); the
    number of documents holding a query term; and any outcome. Like `recall_matches`, whose
    result this is when dense recall is off.

    `ordered=False` says only the set matters (every candidate gets reranked): when all the
    documents fit in `k` the dense ranking then changes nothing and is skipped. `runtime`
    holds the embedder and the caches (none: no caches, and an embedder built for this
    call alone, as a new runtime would give).
    """
    if runtime is None:  # what a new Runtime would give: empty caches, a new embedder
        indexes = None
        embedder = (build_embedder(settings) if documents and settings.embedder.strip()
                    else None)
    else:
        indexes = runtime.caches
        embedder = runtime.embedder(settings) if documents else None
    if embedder is None:
        return (*recall_matches(query, documents, k, indexes), [])
    if isinstance(embedder, str):
        return (*recall_matches(query, documents, k, indexes), [Outcome(
            "warning", "processing",
            f"dense recall is off, candidates are by keywords only: {embedder}")])
    if len(documents) <= k and not ordered:
        return (*recall_matches(query, documents, k, indexes), [])
    ranked, matched = recall_matches(query, documents, len(documents), indexes)
    position = {id(d): i for i, d in enumerate(documents)}
    keyword_ranking = [position[id(d)] for d, _, holds in ranked if holds]
    dense_ranking = [i for i, _ in embedder.rank(query, documents)]  # type: ignore[attr-defined]
    fused = reciprocal_rank_fusion([keyword_ranking, dense_ranking], k=settings.rrf_k,
                                   tiebreak=lambda i: (documents[i].id, i))
    keyword = {position[id(d)]: (score, holds) for d, score, holds in ranked}
    order = [i for i, _ in fused]
    kept = with_quotas(order, [d.type for d in documents], [True] * len(documents), k)
    log.debug("hybrid recall: %d keyword matches, %d documents fused, %d kept",
              len(keyword_ranking), len(fused), len(kept))
    return [(documents[i], *keyword[i]) for i in kept], matched, []
