"""The HAPI test server itself (tests/hapi, `make hapi`): it fails fast and says why, and the
features the adapter's HAPI tests rely on are on (full text, the token demand)."""
from __future__ import annotations

import socket
import time

import pytest
import requests

from hapifhir import BIG, HapiFhirServer

FHIR_JSON = "application/fhir+json"


def test_a_taken_port_fails_at_once_with_the_reason():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HapiFhirServer()
        started = time.monotonic()
        server.start(port=port, owner=True)  # its own JVM, also under xdist
        with pytest.raises(RuntimeError) as failed:
            server.wait_ready()
    assert time.monotonic() - started < 60  # not HAPI's minute of start-up, nor the timeout
    assert "the JVM exited with 2" in str(failed.value)
    assert f"port {port} on 127.0.0.1 is in use" in str(failed.value)
    assert server.base_url is None


def test_full_text_is_on_and_bulk_export_kicks_off(hapi_fhir):
    base = hapi_fhir.base_url
    cap = requests.get(f"{base}/metadata", headers={"Accept": FHIR_JSON}, timeout=60).json()
    condition = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Condition")
    assert {"_content", "_text"} <= {p["name"] for p in condition["searchParam"]}
    found = requests.get(f"{base}/Condition", params={"patient": BIG, "_content": "sinusitis",
                                                      "_summary": "count"}, timeout=60).json()
    assert 0 < found["total"] < 219  # HAPI's own full text, over the fixture patient
    # Bulk $export: the operation is registered and kicks off (202 and a poll URL), but on
    # this configuration (Hibernate Search on) HAPI 8.8.0's export job fails with HAPI-0464
    # (docs/INTEROP.md); the poll is not asserted
    kick = requests.get(f"{base}/Patient/$export", params={"_type": "Condition"},
                        headers={"Prefer": "respond-async", "Accept": FHIR_JSON}, timeout=60)
    assert kick.status_code == 202, kick.text[:300]
    assert "$export-poll-status?_jobId=" in kick.headers["Content-Location"]


def test_the_token_demand_is_switchable(hapi_fhir):
    url = f"{hapi_fhir.base_url}/Patient/{BIG}"
    assert requests.get(url, timeout=60).status_code == 200
    hapi_fhir.set_auth(token="Bearer t0k")
    refused = requests.get(url, timeout=60)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert requests.get(url, headers={"Authorization": "Bearer t0k"}, timeout=60).status_code == 200
    assert requests.get(f"{hapi_fhir.base_url}/metadata", timeout=60).status_code == 200
    hapi_fhir.reset()
    assert requests.get(url, timeout=60).status_code == 200
