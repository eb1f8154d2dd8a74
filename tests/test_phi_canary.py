"""No patient data in logs, proven: canary strings go into patient ids and names, file
names, questions, notes, attachments, filter values and upstream diagnostics; normal
searches, bad input, malformed request lines, upstream faults, unreadable files and jobs on
a real Celery worker run through real `fhir-rerank serve` processes; then every line the API
processes, the worker and their libraries (urllib3, celery, werkzeug/gunicorn) wrote at INFO
and above — their whole output — is scanned: zero canaries. The REST API and the worker log
JSON lines (`log_format = json`), the file-source API text lines: both formats are scanned."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from fixtures_jobs import REPO_ROOT, free_port, settings_env

TAG = uuid.uuid4().hex[:6]
CANARY = {kind: f"cnry{kind}{TAG}" for kind in (
    "pid", "name", "question", "note", "attach", "filter", "diag", "file", "docid")}


def _lines_with_canaries(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(c in line for c in CANARY.values())]


class ServeProcess:
    """`python -m adapter.cli serve` on a free port, output to a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
        full_env.update(env, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "--log-level", "INFO", "serve", "--host",
             "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                if requests.get(self.base + "/metadata", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise AssertionError("serve did not start: " + self.log_path.read_text()[-2000:])

    def raw(self, data: bytes) -> bytes:
        """Send raw bytes (a malformed request line); whatever comes back."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except OSError:
                pass
        return b"".join(chunks)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        return self.log_path.read_text(errors="replace")


@pytest.fixture()
def canary_record(fhir):
    """A patient whose id, name, notes, attachment and Binary carry canaries."""
    pid = CANARY["pid"]
    note = f"{CANARY['note']} biopsy discussed"
    made = [
        fhir.put({"resourceType": "Patient", "id": pid,
                  "name": [{"family": CANARY["name"], "given": ["Jane"]}]}),
        fhir.put({"resourceType": "Binary", "id": f"{CANARY['attach']}bin",
                  "contentType": "text/plain",
                  "data": base64.b64encode(f"{CANARY['attach']} result".encode()).decode()}),
        fhir.put({"resourceType": "Condition", "id": CANARY["docid"],
                  "subject": {"reference": f"Patient/{pid}"},
                  "code": {"text": f"diabetes {CANARY['note']}"}, "note": [{"text": note}],
                  "meta": {"versionId": ["not", "a", "string"]}}),
        fhir.put({"resourceType": "DocumentReference", "id": f"{CANARY['docid']}doc",
                  "status": "current", "subject": {"reference": f"Patient/{pid}"},
                  "description": note, "content": [{"attachment": {
                      "contentType": "text/plain", "title": CANARY["file"],
                      "url": f"Binary/{CANARY['attach']}bin"}}]}),
    ]
    # One caller may read the attachment; another gets a 403 (a logged, skipped attachment).
    fhir.protect_binary(f"{CANARY['attach']}bin", "Bearer alice")
    yield pid
    for resource in reversed(made):
        fhir.delete(resource["resourceType"], resource["id"])


@pytest.fixture()
def canary_files(tmp_path):
    """A data directory whose file names, ids and text carry canaries, some files unreadable."""
    data = tmp_path / "data"
    data.mkdir()
    pid = CANARY["pid"]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": pid,
                      "name": [{"family": CANARY["name"]}]}},
        {"resource": {"resourceType": "Condition", "id": CANARY["docid"],
                      "subject": {"reference": f"Patient/{pid}"},
                      "code": {"text": "diabetes"}, "note": [{"text": CANARY["note"]}]}},
        {"resource": {"resourceType": "Observation", "id": "x"}},
        {"fullUrl": "urn:uuid:1", "resource": {"note": CANARY["note"]}}]}
    (data / f"{CANARY['file']}_Jane_Doe.json").write_text(json.dumps(bundle))
    (data / f"{CANARY['file']}_broken.json").write_text('{"resourceType": "Bund')
    (data / f"{CANARY['file']}_lines.ndjson").write_text(
        json.dumps({"resourceType": "Condition", "id": "n1"}) + f"\n{{{CANARY['note']}\n")
    (data / f"{CANARY['file']}_latin1.ndjson").write_bytes(b"\xff\xfe" + CANARY["note"].encode())
    return data


def _poll(url: str, headers: dict, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = requests.get(url, headers=headers, timeout=30)
        if resp.status_code != 202:
            return resp
        time.sleep(0.1)
    raise AssertionError("job not done")


def test_no_canary_reaches_any_log_line(fhir, canary_record, canary_files, redis_server,
                                        celery_workers, tiny_model_dir, tmp_path):
    pid, q, flt = canary_record, CANARY["question"], CANARY["filter"]
    settings = {"redis_url": redis_server.url, "fhir_base_url": fhir.base_url,
                "reranker": "qwen3", "model": str(tiny_model_dir),
                "models_allowed": [str(tiny_model_dir)], "device": "cpu", "max_length": 256,
                "batch_tokens": 256, "fhir_retries": 1, "fhir_backoff": 0.05,
                "upstream_deadline": 3, "fhir_timeout": 2, "log_format": "json"}
    worker = celery_workers.start("canary", [], settings, tiers=["default"])
    api = ServeProcess("api-rest", settings_env(settings), tmp_path)
    files_api = ServeProcess("api-files", settings_env(
        {"reranker": "none", "fhir_data": str(canary_files)}), tmp_path)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    answered: list[int] = []
    try:
        base = api.base
        searches = [
            f"{base}/Condition?patient={pid}&_content={q}",
            f"{base}/DocumentReference?patient={pid}&_content={q}%20biopsy",
            f"{base}/Condition?patient={pid}&_content={q}&code={flt}&clinical-status={flt}",
            f"{base}/Patient/{pid}/$rerank?query={q}",
            f"{base}/$rerank?patient={pid}&query={q}&_type=DocumentReference",
        ]
        for url in searches:  # normal searches, sync and async, two callers
            for headers in (alice, bob, {}):
                answered.append(requests.get(url, headers=headers, timeout=60).status_code)
            accepted = requests.get(url, headers={**alice, "Prefer": "respond-async"},
                                    timeout=60)
            answered.append(accepted.status_code)
            if accepted.status_code == 202:
                answered.append(_poll(accepted.headers["Content-Location"], alice).status_code)
        job = requests.get(searches[0], headers={"Prefer": "respond-async"}, timeout=30)
        answered.append(requests.delete(job.headers["Content-Location"], timeout=30).status_code)
        answered.append(requests.post(f"{base}/$rerank", timeout=30, json={
            "resourceType": "Parameters", "parameter": [
                {"name": "query", "valueString": q}, {"name": "patient", "valueString": pid},
                {"name": f"{flt}", "valueString": flt}]}).status_code)
        # Bad input: unknown parameters, bad values, bad bodies, unknown patients.
        for url in (f"{base}/Condition?patient={pid}&_content={q}&{flt}={flt}",
                    f"{base}/Condition?patient={pid}&_content={q}&_count={flt}",
                    f"{base}/Condition?patient={pid}&_content={q}&recall={flt}",
                    f"{base}/Condition?patient={flt}&_content={q}",
                    f"{base}/Condition?patient={pid}&_content={q}&model={flt}",
                    f"{base}/Condition?patient={pid}&_content={q}&_format={flt}",
                    f"{base}/{flt}?patient={pid}&_content={q}",
                    f"{base}/_async/{flt}{'A' * 30}"):
            answered.append(requests.get(url, timeout=30).status_code)
        answered.append(requests.post(f"{base}/$rerank", data=f'{{"{q}": [{pid}',
                                      timeout=30).status_code)
        # Malformed request lines.
        for raw in (f"GET /fhir/Condition?patient={pid}&_content={q}\t HTTP/1.1\r\n\r\n",
                    f"GET /fhir/Patient/{pid}/$rerank?query={q} HTTP/2.0\r\n\r\n",
                    f"GET /fhir/Condition?patient={pid}&q={q}{'x' * 70000} HTTP/1.1\r\n\r\n",
                    f"GET /fhir/Condition?patient={pid}\xa0{q} HTTP/1.1\r\nHost: x\r\n\r\n",
                    f"{q} {pid}\r\n\r\n"):
            api.raw(raw.encode("utf-8", errors="replace"))
        # Upstream faults: errors with canary diagnostics, throttling, a stalled body.
        diag = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": f"{CANARY['diag']} {pid}"}]}
        for fault in ({"status": 400, "body": diag}, {"status": 500, "body": diag, "times": 2},
                      {"status": 429, "retry_after": 0, "times": 2}, {"stall": 10},
                      {"malformed": True}, {"status": 403, "body": diag}):
            fhir.inject_fault(path_contains=pid, **fault)
            answered.append(requests.get(searches[0], headers=alice, timeout=60).status_code)
            fhir.reset()
            fhir.protect_binary(f"{CANARY['attach']}bin", "Bearer alice")
        # The file source: canary file names, unreadable files, searches.
        for url in (f"{files_api.base}/Condition?patient={pid}&_content={q}",
                    f"{files_api.base}/Condition/{CANARY['docid']}",
                    f"{files_api.base}/Condition/{flt}"):
            answered.append(requests.get(url, timeout=30).status_code)
        time.sleep(1.0)  # the worker's last lines
    finally:
        outputs = {"api-rest": api.stop(), "api-files": files_api.stop()}
        worker.stop()
        outputs["worker"] = worker.log()
    assert 200 in answered and 202 in answered and 400 in answered and 504 in answered
    assert 500 not in answered, answered
    lines = [json.loads(line) for line in outputs["api-rest"].splitlines() if line.strip()]
    assert {line["logger"] for line in lines} >= {"adapter.access", "gunicorn.error"}
    access = [line for line in lines if line["logger"] == "adapter.access"]
    assert len(access) >= len(answered) and all(
        len(line["request_id"]) == 32 and line["route"] and isinstance(line["status"], int)
        and line["duration_ms"] >= 0 for line in access)
    worker_lines = [json.loads(line) for line in outputs["worker"].splitlines()
                    if line.startswith("{")]
    assert sum("reranking with" in line["message"] for line in worker_lines) >= 5
    assert outputs["worker"].count("reranking with") >= 5  # the jobs ran on the worker
    assert "skipped part of a data file" in outputs["api-files"]  # unreadable files were met
    leaks = {name: _lines_with_canaries(text) for name, text in outputs.items()}
    assert not any(leaks.values()), json.dumps(
        {n: lines[:8] for n, lines in leaks.items() if lines}, indent=1)[:6000]
