"""One retry rule for the FHIR client and the remote reranker (adapter/retry.py)."""
from __future__ import annotations

import email.utils
import time

import pytest

from adapter import retry
from adapter.fhir import client
from adapter.deadline import upstream_deadline
from adapter.rerank import remote


def test_backoff_doubles_and_a_longer_retry_after_wins_up_to_the_cap() -> None:
    assert [retry.retry_delay(n, 0.5, None, 10.0) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry.retry_delay(0, 0.5, "3", 10.0) == 3.0
    assert retry.retry_delay(3, 0.5, "1", 10.0) == 4.0  # the backoff is longer
    assert retry.retry_delay(0, 0.5, "600", 10.0) == 10.0  # capped
    assert retry.retry_delay(1, 0.5, "soon", 10.0) == 1.0  # unreadable: the backoff


def test_an_http_date_retry_after_is_read() -> None:
    """The remote reranker once read Retry-After with float(): a date was ignored."""
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= retry.retry_delay(0, 0.5, when, 60.0) <= 5.0


def test_the_wait_never_outlasts_the_searchs_deadline() -> None:
    started = time.monotonic()
    with upstream_deadline(0.3):
        retry.wait_before_retry(0, 5.0, None, 10.0)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("module", [client, remote])
def test_both_clients_retry_by_the_one_rule(module) -> None:
    assert module.RETRY_STATUSES is retry.RETRY_STATUSES
    assert module.wait_before_retry is retry.wait_before_retry
