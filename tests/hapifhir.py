"""A real HAPI FHIR JPA server (R4, `tests/hapi/`, our own Spring Boot launcher) for the tests.

`hapi_fhir_server` (session) is HAPI itself on a free loopback port, with full-text search
(`_content`, `_text`) on an in-memory Lucene index and an in-memory H2 database; `hapi_fhir`
resets its bearer-token demand after each test. The JVM takes a minute or more to start on two
cores, so conftest starts it in the background as soon as collection shows a test that needs it
(`start_early`), and only those tests wait for it. When it cannot start, they fail with the
server's own log, never skip.

`make hapi HAPI_PORT=8090` runs the same launcher in the foreground; `HAPI_TEST_SERVER_URL=
http://127.0.0.1:8090/fhir pytest ...` makes the tests use it instead of starting their own.

With pytest-xdist (`make test` runs two workers), the controller process owns the one HAPI
server: it launches it as soon as a worker's collection names a test whose id says `hapi`
(conftest's scheduler sends all of those to one worker, and refuses a test that needs HAPI
without `hapi` in its id) and writes
`ready <version> <url> <seconds>` (or `error <why>`) to the file named by HAPI_SHARED_FILE,
which the workers' `wait_ready()` waits for.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

__all__ = ["HapiFhirServer", "hapi_fhir_server", "hapi_fhir"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
HAPI_DIR = Path(__file__).resolve().parent / "hapi"
JAR = HAPI_DIR / "target" / "hapi-test-server.jar"
BUILD_TIMEOUT_S = 900.0
# How long a HAPI test waits: until START_TIMEOUT_S after the launch, and at least
# MIN_WAIT_S from when it starts waiting (the JVM runs niced while the suite uses the cores).
# The JVM's own watchdog (hapi.startup-timeout-s) ends a start that hangs past JVM_TIMEOUT_S.
START_TIMEOUT_S = float(os.environ.get("HAPI_START_TIMEOUT_S", "600"))
MIN_WAIT_S = 300.0
JVM_TIMEOUT_S = 1200
HTTP_TIMEOUT_S = 60.0
JAVA_OPTS = ["-Xmx1g", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss512k"]
READY = re.compile(r"HAPI FHIR (\S+) ready at (http://\S+/fhir) \(started in ([\d.]+) s\)")
# What the core end-to-end tests need in HAPI: the largest Synthea Bulk patient (708 notes,
# 219 Conditions), not every fixture (HAPI indexes each resource for full text: minutes)
BIG = "79a66c97-6131-3213-f3c9-4606946ab056"
HAPI_LOAD_PATIENTS = [BIG]
#: environment variable naming the file through which an xdist controller shares its server
SHARED_FILE_ENV = "HAPI_SHARED_FILE"


def _sources() -> list[Path]:
    return [HAPI_DIR / "pom.xml", *sorted((HAPI_DIR / "src").rglob("*"))]


def jar_is_fresh() -> bool:
    return JAR.exists() and all(JAR.stat().st_mtime >= p.stat().st_mtime for p in _sources() if p.is_file())


def build_jar() -> None:
    """`mvn package` in tests/hapi when the jar is missing or older than its sources (the
    Makefile's `hapi-jar` target does the same before pytest). A file lock keeps parallel
    builds apart."""
    if jar_is_fresh():
        return
    with open(Path(tempfile.gettempdir()) / "hapi-test-server-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jar_is_fresh():
            return
        log.info("building the HAPI test server (mvn package in tests/hapi)")
        done = subprocess.run(["mvn", "-B", "-q", "package"], cwd=HAPI_DIR, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0 or not JAR.exists():
            raise RuntimeError(f"building the HAPI test server failed (mvn package in {HAPI_DIR}):\n"
                               f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


class HapiFhirServer:
    """One `java -jar hapi-test-server.jar` process on a free loopback port."""

    def __init__(self) -> None:
        self.base_url: str | None = None
        self.version: str | None = None
        self.start_seconds: float | None = None  # as the JVM measured it
        self.wait_seconds: float | None = None  # from start() to ready, as we measured it
        self.loaded: list[str] = []  # Patient ids of the Synthea patients loaded
        self._process: subprocess.Popen[str] | None = None
        self._log: tempfile._TemporaryFileWrapper[str] | None = None
        self._ready = threading.Event()
        self._found: list[re.Match[str]] = []
        self._started_at = 0.0
        self._error: str | None = None
        self._shared: Path | None = None  # an xdist worker: the controller's server, via a file
        self.external = False  # HAPI_TEST_SERVER_URL or the controller's: not ours to stop

    def start(self, port: int = 0, owner: bool = False) -> None:
        """Launch in the background and return at once; `wait_ready()` blocks. With
        HAPI_TEST_SERVER_URL set (a `make hapi` server already running), use that instead; in
        an xdist worker (HAPI_SHARED_FILE set), the controller's (`owner`: the controller)."""
        if self._process is not None or self.base_url is not None or self._shared is not None:
            return
        if os.environ.get("HAPI_TEST_SERVER_URL"):
            self.external = True
            self.base_url = os.environ["HAPI_TEST_SERVER_URL"].rstrip("/")
            self.version = requests.get(f"{self.base_url}/metadata", timeout=HTTP_TIMEOUT_S,
                                        headers={"Accept": "application/fhir+json"}).json()["software"]["version"]
            return
        if os.environ.get(SHARED_FILE_ENV) and not owner:
            self._shared, self.external = Path(os.environ[SHARED_FILE_ENV]), True
            self._started_at = time.monotonic()
            return
        self._started_at = time.monotonic()
        try:
            build_jar()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self._error = str(exc)
            self._ready.set()
            return
        self._log = tempfile.NamedTemporaryFile("w+", prefix="hapi-test-server-", suffix=".log")
        # niced: it starts while the rest of the suite runs, and must not slow those tests
        command = ["nice", "-n", "10", "java", *JAVA_OPTS, "-jar", str(JAR), f"--server.port={port}",
                   f"--hapi.startup-timeout-s={JVM_TIMEOUT_S}"]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, cwd=HAPI_DIR)
        threading.Thread(target=self._read_output, daemon=True).start()

    def _read_output(self) -> None:
        """Copy the JVM's output to the log file; note the ready line (or EOF)."""
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._log is not None and not self._log.closed:
                self._log.write(line)
                self._log.flush()
            if not self._ready.is_set() and (found := READY.search(line)):
                self._found.append(found)
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> str:
        """Block until HAPI answers (or raise with its log); returns the base URL."""
        if self.base_url is not None:
            return self.base_url
        if self._process is None and self._error is None and self._shared is None:
            self.start()
            if self.base_url is not None:  # HAPI_TEST_SERVER_URL
                return self.base_url
        if self._shared is not None:
            return self._wait_shared()
        waited_from = time.monotonic()
        remaining = START_TIMEOUT_S - (waited_from - self._started_at)
        self._ready.wait(max(remaining, MIN_WAIT_S))
        if self._error is not None:
            raise RuntimeError(self._error)
        if not self._found:
            code = None
            if self._process is not None:
                try:  # the output ended: the JVM is exiting, wait for its code
                    code = self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    code = None
            why = (f"the JVM exited with {code}" if code is not None
                   else f"not ready {time.monotonic() - self._started_at:.0f} s after launch")
            self.stop_with_error(why)
        found = self._found[0]
        self.version, self.base_url = found.group(1), found.group(2)
        self.start_seconds = float(found.group(3))
        self.wait_seconds = time.monotonic() - self._started_at
        log.info("HAPI FHIR %s ready in %.1f s (JVM), %.1f s since launch",
                 self.version, self.start_seconds, self.wait_seconds)
        return self.base_url

    def _wait_shared(self) -> str:
        """An xdist worker: wait for the controller's line in the shared file."""
        deadline = time.monotonic() + max(START_TIMEOUT_S, MIN_WAIT_S) + 60
        assert self._shared is not None
        while not self._shared.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the HAPI test server was not ready in time: the pytest-xdist "
                                   f"controller wrote nothing to {self._shared}")
            time.sleep(0.5)
        state, _, rest = self._shared.read_text().partition(" ")
        if state != "ready":
            self._error = rest
            raise RuntimeError(rest)
        self.version, self.base_url, seconds = rest.split()
        self.start_seconds = float(seconds)
        self.wait_seconds = time.monotonic() - self._started_at
        return self.base_url

    def share(self, path: Path) -> None:
        """The xdist controller: launch (as the owner), and write the outcome to `path` once
        known (`ready <version> <url> <seconds>` or `error <why>`), from a background thread."""
        if self._process is not None or self._error is not None:
            return
        self.start(owner=True)

        def wait_and_write() -> None:
            try:
                self.wait_ready()
                line = f"ready {self.version} {self.base_url} {self.start_seconds}"
            except RuntimeError as exc:
                line = f"error {exc}"
            staging = path.with_suffix(".writing")
            staging.write_text(line)
            os.replace(staging, path)

        threading.Thread(target=wait_and_write, daemon=True).start()

    def server_log(self) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop_with_error(self, why: str) -> None:
        tail = "\n".join(self.server_log().splitlines()[-60:])
        self.stop()
        self._error = f"the HAPI test server failed to start: {why}\n--- its log (tail) ---\n{tail}"
        raise RuntimeError(self._error)

    def stop(self) -> None:
        """SIGTERM (Spring closes HAPI cleanly), SIGKILL after 30 s."""
        if self.external:
            return  # not ours to stop
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(timeout=10)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self.base_url = None

    # ------------------------------------------------------------------ controls

    @property
    def admin_url(self) -> str:
        if self.base_url is None:
            raise RuntimeError("the HAPI test server is not running")
        return self.base_url.rsplit("/fhir", 1)[0] + "/admin"

    def set_auth(self, token: str | None = None, forbid: str | None = None) -> None:
        """Require exactly `token` as Authorization on /fhir (401 otherwise, GET /metadata
        stays open); 403 for `forbid`. Both None: open again. Same contract as the Node
        server's FhirTestServer.set_auth."""
        response = requests.post(f"{self.admin_url}/auth", json={"token": token, "forbid": forbid},
                                 timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()

    def reset(self) -> None:
        requests.post(f"{self.admin_url}/reset", timeout=HTTP_TIMEOUT_S).raise_for_status()

    def load_bulk_patients(self, patient_ids: list[str]) -> None:
        """PUT these Synthea Bulk patients (Patient, Conditions, DocumentReferences from
        fhir_fixtures/synthea-bulk) in one transaction, keeping their ids, so a test can ask
        both servers about the same patient. HAPI enforces referential integrity on write and
        the Bulk files lack Encounters, so references to anything not loaded are dropped."""
        assert self.base_url is not None
        resources = bulk_resources(patient_ids)
        keep = {f"{r['resourceType']}/{r['id']}" for r in resources}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": _drop_references(r, keep),
             "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources]}
        response = requests.post(self.base_url, json=bundle, timeout=900, headers={
            "Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
            "Prefer": "return=minimal"})
        if response.status_code != 200:
            raise RuntimeError(f"HAPI refused the fixture transaction: {response.status_code} "
                               f"{response.text[:400]}")
        self.loaded = list(patient_ids)


def bulk_resources(patient_ids: list[str]) -> list[dict]:
    """The Patient, Condition and DocumentReference lines of these patients, Patients first."""
    folder = REPO_ROOT / "fhir_fixtures" / "synthea-bulk"
    wanted = set(patient_ids)
    found = []
    for rtype in ("Patient", "Condition", "DocumentReference"):
        with open(folder / f"{rtype}.000.ndjson", encoding="utf-8") as lines:
            for line in lines:
                resource = json.loads(line)
                owner = (resource["id"] if rtype == "Patient"
                         else (resource.get("subject") or {}).get("reference", "").rsplit("/", 1)[-1])
                if owner in wanted:
                    found.append(resource)
    return found


def _drop_references(node: object, keep: set[str]) -> object:
    """A copy without the `reference` of any Reference to something not loaded (its
    `display` stays, so the flattened text is the same on both servers)."""
    if isinstance(node, list):
        return [v for v in (_drop_references(v, keep) for v in node) if v != {}]
    if not isinstance(node, dict):
        return node
    out = {k: _drop_references(v, keep) for k, v in node.items()}
    ref = out.get("reference")
    if isinstance(ref, str) and not ref.startswith("#") and ref not in keep:
        del out["reference"]
    return {k: v for k, v in out.items() if v != {}}


# One server per pytest process, started early by conftest (start_early) or on first use.
HAPI = HapiFhirServer()


def start_early(items: list[pytest.Item]) -> None:
    """Called from conftest once collection is done: launch HAPI in the background when a
    collected test uses it, so its minute of JVM start overlaps the rest of the suite (in an
    xdist worker, the controller launches it: see `share`)."""
    if any(needs_hapi(item) for item in items) and not os.environ.get(SHARED_FILE_ENV):
        HAPI.start()


#: what the id of every test that needs HAPI says (conftest's xdist scheduler: one worker)
GROUP = "hapi"


def needs_hapi(item: pytest.Item) -> bool:
    """A test that asks for HAPI's fixtures, or is a `hapi-jpa` case of a parametrised
    fixture that picks its server by name (test_servers_e2e.upstream)."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    return bool(names & {"hapi_fhir_server", "hapi_fhir"}) or (
        callspec is not None and "hapi-jpa" in callspec.params.values())


def stop_at_end() -> None:
    """conftest's session end: stop HAPI even when no test ended up asking for it."""
    HAPI.stop()


@pytest.fixture(scope="session")
def hapi_fhir_server() -> Iterator[HapiFhirServer]:
    """Real HAPI, ready, with the HAPI_LOAD_PATIENTS Synthea Bulk patients loaded (once)."""
    HAPI.wait_ready()
    if not HAPI.loaded:
        started = time.monotonic()
        HAPI.load_bulk_patients(HAPI_LOAD_PATIENTS)
        log.info("HAPI FHIR: fixture patients loaded in %.1f s", time.monotonic() - started)
    yield HAPI
    HAPI.stop()


@pytest.fixture
def hapi_fhir(hapi_fhir_server: HapiFhirServer) -> Iterator[HapiFhirServer]:
    """The session HAPI server with its auth demand reset after the test."""
    hapi_fhir_server.reset()
    yield hapi_fhir_server
    hapi_fhir_server.reset()
