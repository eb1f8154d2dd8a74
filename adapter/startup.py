"""One start-up log line per dependency of `fhir-rerank serve`, before the first request.

A dependency that is down is reported (WARNING, with what to do) but does not stop start-up:
/readyz stays 503 until it answers. Nothing here loads patient data.
"""
from __future__ import annotations

import logging

from adapter.config import Settings
from adapter.fhir import make_source
from adapter.readiness import probe_redis, probe_source, probe_workers

log = logging.getLogger("adapter.startup")


def _line(ok: bool, message: str, *args: object) -> None:
    (log.info if ok else log.warning)(message, *args)


def report_dependencies(settings: Settings) -> None:
    if settings.host in ("0.0.0.0", "::") and not (settings.trusted_hosts
                                                  or settings.public_base_url):
        log.warning("listening on all interfaces, but only Host localhost / 127.0.0.1 is "
                    "answered; set trusted_hosts (the names clients use) or public_base_url")
    if settings.fhir_base_url:
        check = probe_source(make_source(settings), settings.readyz_timeout)
        _line(check.ok, "FHIR source: %s%s", check.detail,
              "" if check.ok else "; searches answer 502 until it is reachable")
    else:
        data = settings.data_dir()
        _line(data.is_dir(), "FHIR source: files under %s%s", data,
              "" if data.is_dir() else " (no such directory; set fhir_data)")
    if not settings.redis_url:
        log.info("jobs: in-process (no redis_url); reranker %s loads in the server process",
                 settings.reranker)
        return
    check = probe_redis(settings)
    _line(check.ok, "Redis: %s%s", check.detail,
          "" if check.ok else "; jobs answer 503 until it is reachable")
    if not check.ok:
        return
    check = probe_workers(settings)
    _line(check.ok, "workers: %s", check.detail)
