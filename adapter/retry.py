"""One retry rule for every HTTP call the adapter makes upstream (the FHIR server, a remote
reranker): which answers are retried, and how long to wait before the next attempt.

- Retried: connection errors and the statuses in `RETRY_STATUSES` (429 and the 5xx a proxy or
  a busy server gives); never a redirect, never another 4xx.
- The wait before attempt n + 1 is `backoff × 2ⁿ`, or the server's `Retry-After` (seconds or
  an HTTP date) when that is longer, capped at `cap`; inside a search it never outlasts the
  search's `upstream_deadline` (adapter.deadline).
"""
from __future__ import annotations

import email.utils
import time

from adapter.deadline import remaining

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent
    or unreadable."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def retry_delay(attempt: int, backoff: float, retry_after: str | None, cap: float) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): see the module docstring."""
    delay = backoff * (2 ** attempt)
    hinted = parse_retry_after(retry_after)
    if hinted is not None:
        delay = max(delay, min(hinted, cap))
    return delay


def wait_before_retry(attempt: int, backoff: float, retry_after: str | None, cap: float) -> None:
    """Sleep `retry_delay`, cut to what is left of the current upstream deadline."""
    delay = retry_delay(attempt, backoff, retry_after, cap)
    left = remaining()
    time.sleep(delay if left is None else max(0.0, min(delay, left)))
