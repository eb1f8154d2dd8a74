"""The `none` backend: no model; BM25 scores (see `ranking_scores`), mapped to [0, 1], give
the order."""
from __future__ import annotations

from typing import Callable

from adapter.rerank.base import Reranker, ScoreReport
from adapter.search.bm25 import normalise_scores, ranking_scores


class BM25OnlyReranker(Reranker):
    name = "none"
    is_model = False

    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None) -> list[float]:
        self.last_report = ScoreReport(empty_docs=[i for i, t in enumerate(texts) if not t.strip()])
        scores = normalise_scores(ranking_scores(query, texts))
        if on_progress:
            on_progress(len(texts), len(texts))
        return scores
