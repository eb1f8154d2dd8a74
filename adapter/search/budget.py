"""The candidate budget as time: how many candidates the reranker can score in `rerank_budget_s`.

With `rerank_budget_s = 0` (the default) the count budget `recall` alone decides, as before.
With a time budget the first stage hands over up to `max_recall` candidates (a request's own
`recall` still caps it), and `rank_prepared` keeps the longest head of that order whose tokens
the reranker can score in time: tokens = each (instruction, query, document) sequence as the
engine builds it; speed = the reranker's measured tokens/s for its model, device and dtype
(`Qwen3Reranker.tokens_per_s`: measured at warm-up on a synthetic batch, then a running
average of real calls). A record that fits is reranked whole; when the budget cuts, an outcome
says how many were kept and what budget would keep them all. Backends without a model (`none`)
have no speed limit and keep every candidate. The count is remembered per ranking so the next
page of a result sees the same candidates.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

from adapter.config import Settings
from adapter.errors import BadRequest
from adapter.lru import LRU
from adapter.models import Document, Outcome, SearchRequest

def candidates_within(lengths: Sequence[int], tokens_per_s: float, budget_s: float) -> int:
    """How many of the candidates (in order) fit: the longest head whose token total is at most
    `tokens_per_s × budget_s`; at least 1 when there is any, so a search always answers."""
    if tokens_per_s <= 0 or budget_s <= 0 or not math.isfinite(tokens_per_s * budget_s):
        raise ValueError(f"tokens_per_s {tokens_per_s} and budget_s {budget_s} must be positive")
    allowance, total = tokens_per_s * budget_s, 0
    for kept, length in enumerate(lengths):
        total += length
        if total > allowance:
            return max(kept, 1)
    return len(lengths)


def add_budget_param(req: SearchRequest, values: dict[str, list[str]],
                     used: list[tuple[str, str]], settings: Settings) -> None:
    """Set `req.rerank_budget_s` from the setting or the `rerank_budget_s` parameter (0 turns
    it off, at most task_soft_time_limit); with a budget, `recall` defaults to max_recall."""
    budget = settings.rerank_budget_s
    if values.get("rerank_budget_s"):
        raw = values["rerank_budget_s"][-1]
        limit = settings.task_soft_time_limit
        try:
            budget = float(raw)
        except ValueError:
            budget = math.nan
        if not 0 <= budget <= limit:
            raise BadRequest(f"`rerank_budget_s` must be a number of seconds in 0..{limit}, got "
                             f"{raw[:40]!r}; 0 turns the time budget off", expression="rerank_budget_s")
        used.append(("rerank_budget_s", f"{budget:g}"))
    req.rerank_budget_s = budget
    if budget > 0 and not values.get("recall"):
        req.recall = settings.max_recall


def apply_time_budget(req: dict[str, Any], docs: list[Document], recall_scores: list[float],
                      reranker: Any, cache: LRU[Any] | None = None
                      ) -> tuple[list[Document], list[float], list[Outcome]]:
    """The candidates the reranker can score within the request's time budget, and an outcome
    when some were cut. `cache` (a runtime's `Caches.budgets`) remembers the cut per
    (reranker instance, ranking) with the speed and token count it was decided on, so pages of
    one result agree and the outcome's numbers are the ones that decided it (the speed is a
    running average: the one measured now may be another)."""
    budget = float(req.get("rerank_budget_s") or 0.0)
    speed = getattr(reranker, "tokens_per_s", None)
    if budget <= 0 or not speed or not docs:
        return docs, recall_scores, []
    digest = hashlib.sha256()
    for part in (req["query"], req.get("instruction") or "", f"{budget!r}",
                 *(f"{d.id}\0{d.text}" for d in docs)):
        digest.update(part.encode("utf-8"))
        digest.update(b"\1")
    key = (reranker.instance_id, digest.hexdigest())
    cut = cache.get(key) if cache is not None else None
    if cut is None:
        lengths = reranker.token_lengths(req["query"], [d.text for d in docs],
                                         req.get("instruction"))
        cut = (candidates_within(lengths, speed, budget), float(speed), sum(lengths))
        if cache is not None:
            cache.put(key, cut)
    kept, speed, tokens = cut
    if kept >= len(docs):
        return docs, recall_scores, []
    seconds = tokens / speed  # tenths under 10 s: a fast GPU's "about 0 s" would say nothing
    whole = f"; about {seconds:.1f} s would rerank all {tokens} tokens" if seconds < 10 else \
        f"; about {seconds:.0f} s would rerank all {tokens} tokens"
    best = "the best one by the first stage was" if kept == 1 else \
        f"the {kept} best by the first stage were"
    left = len(docs) - kept
    outcome = Outcome(
        "information", "informational",
        f"total {kept}: rerank_budget_s={budget:g}: at the {speed:.0f} tokens/s measured when "
        f"this ranking was cut, the reranker can score {kept} of the {len(docs)} candidates "
        f"in time, so {best} reranked and {left} "
        f"{'was' if left == 1 else 'were'} left out{whole}; raise `rerank_budget_s` to rerank "
        "more", ("rerank_budget_s",))
    return docs[:kept], recall_scores[:kept], [outcome]
