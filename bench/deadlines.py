"""Benchmark: a slow or stalled FHIR server, with the issue-8 scenarios, in one run.

    .venv/bin/python bench/deadlines.py

Starts the real Node test FHIR server and times, through the Flask app (reranker none,
default settings unless named):
  - a Condition search whose upstream body stalls (200, a few bytes, then nothing): the
    answer (504) and how long it took, at fhir_timeout 30 and upstream_deadline 10;
  - a search whose 4 attachments each hang 5 s (fhir_timeout 5): fetched concurrently;
  - `Prefer: respond-async` against an upstream that takes 10 s: time to the 202.
"""
from __future__ import annotations

import base64
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from adapter import create_app  # noqa: E402
from adapter.config import load_settings  # noqa: E402
from fhirserver import FhirTestServer, fixture_load_paths  # noqa: E402

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def timed(client, url: str, headers: dict | None = None) -> tuple[int, float]:
    started = time.monotonic()
    resp = client.get(url, headers=headers or {})
    return resp.status_code, time.monotonic() - started


def main() -> None:
    server = FhirTestServer()
    server.start(fixture_load_paths(), mode="r4")
    try:
        def client(**extra):
            settings = {"reranker": "none", "fhir_base_url": server.base_url, **extra}
            return create_app(load_settings(settings, env={})).test_client()

        server.inject_fault(stall=200, times=10, path_contains="Condition")
        status, took = timed(client(fhir_timeout=30, upstream_deadline=10),
                             f"/fhir/Condition?patient={BIG}&_content=diabetes")
        calls = len([r for r in server.requests() if r["path"].endswith("/Condition")])
        print(f"stalled upstream body: {status} after {took:.1f} s, {calls} upstream call(s)")
        server.reset()

        tag = uuid.uuid4().hex[:8]
        pid = f"bench-{tag}"
        server.put({"resourceType": "Patient", "id": pid})
        for i in range(4):
            server.put({"resourceType": "Binary", "id": f"b-{tag}-{i}", "contentType":
                        "text/plain", "data": base64.b64encode(b"note").decode()})
            server.put({"resourceType": "DocumentReference", "id": f"d-{tag}-{i}",
                        "status": "current", "subject": {"reference": f"Patient/{pid}"},
                        "content": [{"attachment": {"contentType": "text/plain",
                                                    "url": f"Binary/b-{tag}-{i}"}}]})
        server.inject_fault(delay=6, times=4, path_contains=f"Binary/b-{tag}")
        status, took = timed(client(fhir_timeout=5),
                             f"/fhir/DocumentReference?patient={pid}&_content=note")
        print(f"4 hanging attachments (fhir_timeout 5): {status} after {took:.1f} s")
        server.reset()

        server.inject_fault(delay=10, times=1, path_contains="Condition")
        status, took = timed(client(), f"/fhir/Condition?patient={BIG}&_content=diabetes",
                             {"Prefer": "respond-async"})
        print(f"respond-async, upstream takes 10 s: {status} after {took * 1000:.0f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
