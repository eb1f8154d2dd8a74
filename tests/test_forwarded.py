"""X-Forwarded-* headers are trusted only from the proxies named in `forwarded_allow_ips`.

gunicorn's own default trusts them from any loopback peer, so any local process (or a proxy
that passes a client's header through) could make the adapter write `https://…` or another
prefix into every link it answers. Real `fhir-rerank serve` processes, raw sockets.
"""
from __future__ import annotations

import json
import socket

import pytest

from test_slow_clients import _read_answer, _status, start_serve, stop_serve

SEARCH = b"/fhir/Condition?patient=f201&_content=pain"


def links(port: int, extra: bytes) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"GET " + SEARCH + b" HTTP/1.1\r\nHost: localhost\r\n" + extra +
                     b"Connection: close\r\n\r\n")
        answer = _read_answer(sock, 20)
    assert _status(answer) == 200, answer[:300]
    bundle = json.loads(answer.partition(b"\r\n\r\n")[2])
    return [link["url"] for link in bundle["link"]]


FORWARDED = b"X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: on\r\n"


@pytest.mark.parametrize("allow", [None, "10.1.2.3"])
def test_forwarded_headers_from_an_untrusted_peer_are_ignored(tmp_path, allow):
    """Default (no proxy configured), or a proxy elsewhere: a loopback peer's claim of https
    changes no link."""
    extra = {"forwarded_allow_ips": allow} if allow else {}
    proc, port, log_path = start_serve(tmp_path, **extra)
    try:
        urls = links(port, FORWARDED)
        assert urls and all(u.startswith("http://localhost") for u in urls), urls
    finally:
        stop_serve(proc, log_path)


def test_forwarded_headers_from_a_configured_proxy_are_used(tmp_path):
    proc, port, log_path = start_serve(tmp_path, forwarded_allow_ips="127.0.0.1")
    try:
        assert all(u.startswith("https://localhost") for u in links(port, FORWARDED))
        assert all(u.startswith("http://localhost") for u in links(port, b""))
    finally:
        stop_serve(proc, log_path)
