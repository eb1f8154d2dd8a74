"""The real test FHIR R4 server (medplum 4.5.2 on Node, `tests/fhir_server/server.js`) as a
Python helper and pytest fixtures.

Tests talk HTTP to a real FHIR engine instead of mocking one; the admin endpoints let a test
inject upstream faults (status, delay, malformed body), demand a bearer token and read the
request log. `fhir_server` / `hapi_server` are session-wide; use the function-scoped `fhir` /
`hapi` in tests that change faults or auth, so the next test starts clean.
"""
from __future__ import annotations

import fcntl
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

__all__ = [
    "FhirTestServer",
    "fixture_patients",
    "fixture_load_paths",
    "fhir_server",
    "hapi_server",
    "fhir",
    "hapi",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
FIXTURES = REPO_ROOT / "fhir_fixtures"
HL7_TYPES = ("Patient", "Condition", "Observation", "DocumentReference", "Binary")
START_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 30.0


def fixture_load_paths() -> list[Path]:
    """What the shared servers load: the Synthea bundles, the Bulk NDJSON and the HL7 examples
    of the five types we search (not the HL7 example Bundles)."""
    hl7 = sorted(p for p in (FIXTURES / "hl7-r4-examples").glob("*.json") if p.name.split("-", 1)[0] in HL7_TYPES)
    return [FIXTURES / "synthea-r4-bundles", FIXTURES / "synthea-bulk", *hl7]


def _ensure_node_modules() -> None:
    """`npm ci` once when node_modules is missing or older than package-lock.json.

    A file lock keeps parallel pytest processes from installing over each other.
    """
    lock_path = SERVER_DIR / "package-lock.json"
    marker = SERVER_DIR / "node_modules" / ".package-lock.json"

    def fresh() -> bool:
        return marker.exists() and marker.stat().st_mtime >= lock_path.stat().st_mtime

    if fresh():
        return
    with open(Path(tempfile.gettempdir()) / "fhir-test-server-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fresh():
            return
        log.info("installing the test FHIR server's npm packages (npm ci)")
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=SERVER_DIR,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed in {SERVER_DIR}:\n{done.stdout}\n{done.stderr}")


class FhirTestServer:
    """One `node server.js` process on a free loopback port, plus its admin controls."""

    def __init__(self) -> None:
        self.base_url: str | None = None
        self.start_seconds: float | None = None
        self._process: subprocess.Popen[str] | None = None
        self._stderr: tempfile._TemporaryFileWrapper[str] | None = None
        self._patients: list[dict] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, load: list[Path], mode: str = "r4", faults: tuple[str, ...] = (),
              max_count: int | None = None) -> str:
        """Start the server with `load` (files or folders) and return its base URL (…/fhir).
        `faults` (server.js --fault) break one behaviour for the whole run; `max_count` caps
        the page size the server serves (default 1000)."""
        if self._process is not None:
            raise RuntimeError("this FhirTestServer is already running; stop() it first")
        _ensure_node_modules()
        started = time.monotonic()
        self._stderr = tempfile.NamedTemporaryFile("w+", prefix="fhir-test-server-", suffix=".log")
        command = ["node", str(SERVER_DIR / "server.js"), "--port", "0", "--mode", mode]
        for fault in faults:
            command += ["--fault", fault]
        if max_count is not None:
            command += ["--max-count", str(max_count)]
        if load:
            command += ["--load", *(str(p) for p in load)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr,
                                         text=True, cwd=REPO_ROOT)
        found: list[str] = []
        ready = threading.Event()
        reader = threading.Thread(target=self._read_listening_line, args=(found, ready), daemon=True)
        reader.start()
        ready.wait(START_TIMEOUT_S)
        if not found:
            self.stop_with_error(f"no LISTENING line within {START_TIMEOUT_S:.0f} s")
        self.base_url = found[0]
        self.start_seconds = time.monotonic() - started
        log.info("test FHIR server (%s mode) at %s, ready in %.2f s", mode, self.base_url, self.start_seconds)
        return self.base_url

    def _read_listening_line(self, found: list[str], ready: threading.Event) -> None:
        """Wait for the LISTENING line (or EOF), then keep draining stdout so the server can
        never block on a full pipe."""
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        for line in stdout:
            if line.startswith("LISTENING "):
                found.append(line.split(" ", 1)[1].strip())
                break
        ready.set()
        for _ in stdout:
            pass

    def stop_with_error(self, why: str) -> None:
        """Stop and raise with the server's stderr, so a failed start says why."""
        stderr = self.server_log()
        self.stop()
        raise RuntimeError(f"test FHIR server failed to start: {why}\n--- server stderr ---\n{stderr}")

    def server_log(self) -> str:
        """What the server wrote to stderr so far."""
        if self._stderr is None:
            return ""
        self._stderr.flush()
        return Path(self._stderr.name).read_text(errors="replace")

    def stop(self) -> None:
        """Terminate the node process (kill after 5 s) and forget the URL."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.base_url = None
        self._patients = None

    # ------------------------------------------------------------------ admin controls

    @property
    def admin_url(self) -> str:
        if self.base_url is None:
            raise RuntimeError("the test FHIR server is not running")
        return self.base_url.rsplit("/fhir", 1)[0] + "/admin"

    def _admin(self, action: str, payload: dict | None = None) -> None:
        response = requests.post(f"{self.admin_url}/{action}", json=payload or {}, timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()

    def inject_fault(self, status: int | None = None, times: int = 1, path_contains: str = "",
                     retry_after: float | None = None, delay: float = 0, malformed: bool = False,
                     body: dict | str | None = None, stall: float = 0) -> None:
        """The next `times` /fhir requests whose path+query contains `path_contains` get
        `status` (OperationOutcome or `body`), wait `delay` s first, get a non-JSON 200, or
        (`stall`) get a 200 whose body stops after a few bytes for `stall` seconds."""
        self._admin("faults", {"status": status, "times": times, "path_contains": path_contains,
                               "retry_after": retry_after, "delay": delay, "malformed": malformed,
                               "body": body, "stall": stall})

    def put(self, resource: dict) -> dict:
        """PUT one resource (created or updated with a new meta.versionId); the stored copy."""
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        response = requests.put(url, json=resource, timeout=HTTP_TIMEOUT_S, headers={
            "Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
        response.raise_for_status()
        return response.json()

    def delete(self, resource_type: str, resource_id: str) -> None:
        requests.delete(f"{self.base_url}/{resource_type}/{resource_id}", timeout=HTTP_TIMEOUT_S)

    def protect_binary(self, binary_id: str, token: str) -> None:
        """Serve Binary/<binary_id> only to Authorization == `token` (403 to anyone else)."""
        self._admin("binary-auth", {"id": binary_id, "token": token})

    def set_auth(self, token: str | None = None, forbid: str | None = None,
                 introspect: str | None = None) -> None:
        """Require exactly `token` as Authorization (401 otherwise); answer 403 to `forbid`;
        with `introspect` (an RFC 7662 URL, e.g. the SMART stand-in's) accept only bearer
        tokens it calls active. All None turns auth off. GET /fhir/metadata stays open, as on
        SMART servers."""
        self._admin("auth", {"token": token, "forbid": forbid, "introspect": introspect})

    def set_smart(self, configuration: dict | None) -> None:
        """Serve `configuration` at /fhir/.well-known/smart-configuration and answer browsers
        with CORS (a SMART server); None turns both off."""
        self._admin("smart", {"configuration": configuration})

    def expire_paging(self) -> None:
        """Drop HAPI mode's paging cache: old `_getpages` links now answer 410 Gone."""
        self._admin("expire-paging")

    def reset(self) -> None:
        """Clear faults, auth and the request log (the data stays)."""
        self._admin("reset")

    def requests(self) -> list[dict]:
        """Received /fhir requests: {method, path, query, authorization, accept, ignored?}."""
        response = requests.get(f"{self.admin_url}/requests", timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        return response.json()


def _count(base_url: str, resource_type: str, patient_id: str) -> int:
    response = requests.get(f"{base_url}/{resource_type}", params={"patient": patient_id, "_summary": "count"},
                            headers={"Accept": "application/fhir+json"}, timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    return int(response.json()["total"])


def fixture_patients(server: FhirTestServer | str) -> list[dict]:
    """Per Patient: {"id", "DocumentReference", "Observation", "Condition", "total"} counts,
    largest total first (ties by id), so `fixture_patients(s)[0]` is the largest patient."""
    if isinstance(server, FhirTestServer) and server._patients is not None:
        return server._patients
    base_url = server if isinstance(server, str) else server.base_url
    if base_url is None:
        raise RuntimeError("the test FHIR server is not running")
    response = requests.get(f"{base_url}/Patient", params={"_count": "1000", "_sort": "_id"},
                            headers={"Accept": "application/fhir+json"}, timeout=HTTP_TIMEOUT_S)
    response.raise_for_status()
    patients = []
    for entry in response.json().get("entry", []):
        patient_id = entry["resource"]["id"]
        counts = {t: _count(base_url, t, patient_id) for t in ("DocumentReference", "Observation", "Condition")}
        patients.append({"id": patient_id, **counts, "total": sum(counts.values())})
    patients.sort(key=lambda p: (-p["total"], p["id"]))
    if isinstance(server, FhirTestServer):
        server._patients = patients
    return patients


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[FhirTestServer]:
    """The r4-mode server with every fixture loaded, shared by the whole session."""
    server = FhirTestServer()
    server.start(fixture_load_paths(), mode="r4")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hapi_server() -> Iterator[FhirTestServer]:
    """The HAPI-behaviour server (`_getpages` links, 410, no `_content`), same data."""
    server = FhirTestServer()
    server.start(fixture_load_paths(), mode="hapi")
    yield server
    server.stop()


@pytest.fixture
def fhir(fhir_server: FhirTestServer) -> Iterator[FhirTestServer]:
    """The session r4 server, reset (faults, auth, request log) after the test."""
    fhir_server.reset()
    yield fhir_server
    fhir_server.reset()


@pytest.fixture
def hapi(hapi_server: FhirTestServer) -> Iterator[FhirTestServer]:
    """The session HAPI-mode server, reset after the test."""
    hapi_server.reset()
    yield hapi_server
    hapi_server.reset()
