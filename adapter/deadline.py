"""One deadline for a search's upstream work (every page and every attachment).

`with upstream_deadline(seconds):` around the work; `remaining()` inside it says how long the
next request may take (the per-request timeout is cut to it), and `expired_error()` is the
504 to raise. It lives in a context variable, so it follows the search into the threads it
starts when they run with `contextvars.copy_context().run` (see `submit_in_context`).
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any, Callable

from adapter.errors import UpstreamTimeout

_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "upstream_deadline", default=None)


@contextmanager
def upstream_deadline(seconds: float | None) -> Iterator[None]:
    """Bound the upstream work inside the block to `seconds` (None or <= 0: no bound)."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds) if seconds and seconds > 0
                          else None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left for upstream work, or None when no deadline is set."""
    current = _DEADLINE.get()
    return None if current is None else current[0] - time.monotonic()


def expired_error(what: str) -> UpstreamTimeout:
    current = _DEADLINE.get()
    limit = f"{current[1]:g} s" if current else "the deadline"
    return UpstreamTimeout(f"the FHIR server's answers took longer than upstream_deadline "
                           f"({limit}) at {what}; narrow the search (fewer types, a date "
                           "range) or raise upstream_deadline")


def submit_in_context(pool: Executor, fn: Callable[..., Any], *args: Any) -> Future:
    """`pool.submit` that carries this thread's deadline into the worker thread."""
    return pool.submit(contextvars.copy_context().run, fn, *args)
