"""The `none` backend: no model; BM25 scores (see `ranking_scores`), mapped to [0, 1], give
the order. Also what serves when the configured model cannot be loaded (`fallback_reason`)."""
from __future__ import annotations

from typing import Callable

from adapter.lru import LRU
from adapter.rerank.base import Reranker, ScoreOptions, ScoreResult
from adapter.search.bm25 import normalise_scores, ranking_scores

CONFIGURED_REASON = "reranker = none"


class KeywordReranker(Reranker):
    name = "none"
    is_model = False

    def __init__(self, fallback_reason: str | None = None,
                 tokens: LRU[list[str]] | None = None) -> None:
        super().__init__()
        #: why the model is not there, when this backend stands in for one
        self.fallback_reason = fallback_reason
        #: tokens per candidate text: the runtime's `Caches.tokens`, which recall filled
        self.tokens = tokens

    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None,
              options: ScoreOptions | None = None) -> ScoreResult:
        scores = normalise_scores(ranking_scores(query, texts, self.tokens)) if texts else []
        if on_progress:
            on_progress(len(texts), len(texts))
        return ScoreResult(list(scores), empty_docs=[i for i, t in enumerate(texts) if not t.strip()],
                           keyword_reason=self.fallback_reason or CONFIGURED_REASON,
                           fallback=self.fallback_reason is not None)
