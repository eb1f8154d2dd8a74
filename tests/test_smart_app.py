"""Chart search, the SMART on FHIR app (issue 19): the SMART authorization stand-in's refusals,
the launch URL's `iss` allow-list and the page headers through Flask's test client; then the
whole EHR launch in Debian's headless Chromium (playwright-core, tests/browser/) against a
real `fhir-rerank serve` (tiny Qwen3 reranker, chunked notes) in front of the real test FHIR
server, which accepts the stand-in's tokens by RFC 7662 introspection only."""
from __future__ import annotations

import base64
import html
import http.server
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from adapter import create_app
from adapter.app.standin import s256
from adapter.fhir.bundle import PASSAGE_TEXT_URL, PASSAGE_URL, add_passage_extensions
from fhirserver import FhirTestServer
from fixtures_jobs import REPO_ROOT, free_port

ROOT = "http://localhost"
ISS = ROOT + "/fhir"
REDIRECT = ROOT + "/app/"
CLIENT = "fhir-rerank-chart-search"
BROWSER_DIR = REPO_ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")


# ---------------------------------------------------------------- the stand-in, in-process

@pytest.fixture()
def client():
    app = create_app({"reranker": "none", "smart_standin": True, "fhir_base_url": "",
                      "smart_issuers": [], "public_base_url": ""})
    return app.test_client()


def _verifier() -> str:
    return secrets.token_urlsafe(48)


def _authorize_args(verifier: str, launch: str | None = None, **over: str) -> dict[str, str]:
    args = {"response_type": "code", "client_id": CLIENT, "redirect_uri": REDIRECT,
            "scope": "launch openid fhirUser patient/Condition.rs", "aud": ISS,
            "state": secrets.token_urlsafe(16), "code_challenge": s256(verifier),
            "code_challenge_method": "S256"}
    if launch:
        args["launch"] = launch
    args.update(over)
    return {k: v for k, v in args.items() if v is not None}


def _launch(client, patient: str = "p-1") -> str:
    answer = client.post("/smart/launches", json={"patient": patient})
    assert answer.status_code == 201
    return answer.json["launch"]


def _redirect_query(answer) -> dict[str, str]:
    assert answer.status_code == 302, answer.data
    location = answer.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def _code(client, verifier: str, patient: str = "p-1") -> tuple[str, dict[str, str]]:
    args = _authorize_args(verifier, _launch(client, patient))
    query = _redirect_query(client.get("/smart/authorize?" + urlencode(args)))
    assert query["state"] == args["state"] and "code" in query
    return query["code"], args


def _token(client, code: str, verifier: str | None, **over: str):
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "client_id": CLIENT, "code_verifier": verifier}
    form.update(over)
    return client.post("/smart/token", data={k: v for k, v in form.items() if v is not None})


def test_ehr_launch_code_token_and_introspection(client):
    verifier = _verifier()
    code, args = _code(client, verifier, patient="p-42")
    answer = _token(client, code, verifier)
    assert answer.status_code == 200, answer.json
    body = answer.json
    assert body["token_type"] == "Bearer" and body["patient"] == "p-42"
    assert body["scope"] == args["scope"]  # granted as asked
    assert body["need_patient_banner"] is True and body["smart_style_url"].endswith(".json")
    assert body["expires_in"] == 3600
    assert answer.headers["Cache-Control"] == "no-store"
    active = client.post("/smart/introspect", data={"token": body["access_token"]}).json
    assert active["active"] is True and active["patient"] == "p-42"
    assert client.post("/smart/introspect", data={"token": "nope"}).json == {"active": False}


def test_token_refuses_a_missing_verifier(client):
    verifier = _verifier()
    code, _ = _code(client, verifier)
    answer = _token(client, code, None)
    assert answer.status_code == 400 and answer.json["error"] == "invalid_request"
    assert "code_verifier is required" in answer.json["error_description"]


def test_token_refuses_a_wrong_verifier_and_burns_the_code(client):
    verifier = _verifier()
    code, _ = _code(client, verifier)
    answer = _token(client, code, _verifier())
    assert answer.status_code == 400 and answer.json["error"] == "invalid_grant"
    assert "does not match" in answer.json["error_description"]
    again = _token(client, code, verifier)  # the right verifier, too late: codes are single-use
    assert again.status_code == 400 and "unknown, used or expired" in again.json["error_description"]


def test_token_refuses_another_redirect_uri_or_client(client):
    verifier = _verifier()
    code, _ = _code(client, verifier)
    assert _token(client, code, verifier, redirect_uri=ROOT + "/evil/").json["error"] == "invalid_grant"
    code, _ = _code(client, verifier)
    assert _token(client, code, verifier, client_id="other").json["error"] == "invalid_client"


@pytest.mark.parametrize("over, said", [
    ({"code_challenge_method": "plain"}, "only S256"),
    ({"code_challenge_method": None}, "PKCE is required"),
    ({"code_challenge": None}, "PKCE is required"),
    ({"state": None}, "state is required"),
    ({"aud": "http://evil.example/fhir"}, "aud is not a FHIR server"),
    ({"response_type": "token"}, "response_type must be code"),
])
def test_authorize_refuses_what_the_spec_refuses(client, over, said):
    args = _authorize_args(_verifier(), _launch(client), **over)
    query = _redirect_query(client.get("/smart/authorize?" + urlencode(args)))
    assert "code" not in query and said in query["error_description"]
    assert query.get("state") == args.get("state")


def test_authorize_never_redirects_to_an_unregistered_uri(client):
    args = _authorize_args(_verifier(), _launch(client), redirect_uri="http://evil.example/")
    answer = client.get("/smart/authorize?" + urlencode(args))
    assert answer.status_code == 400 and "Location" not in answer.headers
    args = _authorize_args(_verifier(), _launch(client), client_id="someone-else")
    assert client.get("/smart/authorize?" + urlencode(args)).status_code == 400


def test_launch_is_bound_to_one_patient_and_used_once(client):
    verifier = _verifier()
    launch = _launch(client, "p-7")
    args = _authorize_args(verifier, launch)
    code = _redirect_query(client.get("/smart/authorize?" + urlencode(args)))["code"]
    assert _token(client, code, verifier).json["patient"] == "p-7"
    reused = _redirect_query(client.get("/smart/authorize?" + urlencode(
        _authorize_args(verifier, launch))))
    assert "code" not in reused and "unknown or expired launch" in reused["error_description"]


def test_standalone_launch_asks_for_the_patient(client):
    verifier = _verifier()
    args = _authorize_args(verifier, scope="launch/patient openid patient/Condition.rs")
    picker = client.get("/smart/authorize?" + urlencode(args))
    assert picker.status_code == 200 and b'name="patient"' in picker.data
    chosen = client.post("/smart/authorize", data={**args, "patient": "p-9"})
    code = _redirect_query(chosen)["code"]
    assert _token(client, code, verifier).json["patient"] == "p-9"


def test_tokens_expire(monkeypatch):
    app = create_app({"reranker": "none", "smart_standin": True, "smart_token_lifetime": 5,
                      "fhir_base_url": "", "smart_issuers": [], "public_base_url": ""})
    client = app.test_client()
    verifier = _verifier()
    code, _ = _code(client, verifier)
    token = _token(client, code, verifier).json["access_token"]
    assert client.post("/smart/introspect", data={"token": token}).json["active"] is True
    import adapter.app.standin as standin

    later = time.monotonic() + 6
    monkeypatch.setattr(standin.time, "monotonic", lambda: later)
    assert client.post("/smart/introspect", data={"token": token}).json == {"active": False}


def test_launch_url_refuses_an_iss_not_on_the_allow_list(client):
    answer = client.get("/app/launch?" + urlencode({"iss": "http://evil.example/fhir",
                                                     "launch": "x"}))
    assert answer.status_code == 400 and b"smart_issuers" in answer.data
    assert client.get("/app/launch?" + urlencode({"iss": ISS, "launch": "x"})).status_code == 200


def test_allow_list_setting_and_frame_ancestors():
    app = create_app({"reranker": "none", "fhir_base_url": "http://fhir.example/r4",
                      "smart_issuers": ["https://ehr.example/fhir/"],
                      "smart_frame_ancestors": "https://ehr.example"})
    client = app.test_client()
    assert client.get("/app/launch?iss=https://ehr.example/fhir&launch=1").status_code == 200
    # the adapter's own upstream is not allowed once smart_issuers names others
    assert client.get("/app/launch?iss=http://fhir.example/r4&launch=1").status_code == 400
    csp = client.get("/app/").headers["Content-Security-Policy"]
    assert "frame-ancestors https://ehr.example" in csp and "script-src 'self'" in csp
    assert "connect-src 'self' https://ehr.example" in csp
    assert client.get("/smart/token").status_code == 404  # no stand-in unless asked for
    default = create_app({"reranker": "none", "fhir_base_url": "http://fhir.example/r4"})
    headers = default.test_client().get("/app/").headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    assert default.test_client().get(
        "/app/launch?iss=http://fhir.example/r4&launch=1").status_code == 200


def test_file_source_serves_the_patient_for_the_banner():
    app = create_app({"reranker": "none", "fhir_base_url": "", "smart_standin": True})
    client = app.test_client()
    patient = client.get("/fhir/Patient/79a66c97-6131-3213-f3c9-4606946ab056")
    assert patient.status_code == 200 and patient.json["resourceType"] == "Patient"
    assert client.get("/fhir/Patient/no-such-patient").status_code == 404


def test_vendored_fhirclient_is_the_pinned_npm_build():
    """The browser build of fhirclient 2.6.3 (npm, Apache-2.0), unmodified, licence beside it."""
    import hashlib

    vendor = REPO_ROOT / "adapter" / "app" / "static" / "vendor" / "fhirclient"
    digest = hashlib.sha256((vendor / "fhir-client.pure.min.js").read_bytes()).hexdigest()
    assert digest == "658dec434e308a6ba682158f1e94bfaa0f600bb500e78443369bfe7818133d90"
    assert "Apache License" in (vendor / "LICENSE").read_text()


def test_passage_extension_carries_the_passage_text():
    bundle = {"entry": [{"resource": {"resourceType": "DocumentReference", "id": "d1"},
                         "search": {"mode": "match", "score": 0.5}}]}
    text = "intro. The patient reports shortness of breath on exertion. outro"
    add_passage_extensions(bundle, {"DocumentReference/d1": (7, 59)},
                           {"DocumentReference/d1": text})
    span, passage = bundle["entry"][0]["search"]["extension"]
    assert span == {"url": PASSAGE_URL, "extension": [{"url": "start", "valueInteger": 7},
                                                      {"url": "end", "valueInteger": 59}]}
    assert passage == {"url": PASSAGE_TEXT_URL,
                       "valueString": "The patient reports shortness of breath on exertion."}


# ---------------------------------------------------------------- the browser, end to end

PARAGRAPH = ("Paragraph {n}. The patient describes shortness of breath when climbing stairs; "
             "breathing is worse at night and better sitting up. Lungs have scattered wheezes. "
             "Plan: continue the inhaler and review in clinic. ")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _chart(pid: str) -> list[dict]:
    subject = {"reference": f"Patient/{pid}"}
    long_note = "".join(PARAGRAPH.format(n=n) for n in range(1, 31))
    return [
        {"resourceType": "Patient", "id": pid, "name": [{"given": ["Ada"], "family": "Testperson"}],
         "gender": "female", "birthDate": "1950-02-03"},
        {"resourceType": "DocumentReference", "id": f"{pid}-long", "status": "current",
         "subject": subject, "date": "2019-03-04T10:00:00Z",
         "type": {"text": "Progress note"}, "description": "Pulmonology progress note",
         "content": [{"attachment": {"contentType": "text/plain", "data": _b64(long_note)}}]},
        {"resourceType": "DocumentReference", "id": f"{pid}-short", "status": "current",
         "subject": subject, "date": "2023-06-01T09:00:00Z", "type": {"text": "Telephone note"},
         "description": "Telephone follow-up",
         "content": [{"attachment": {"contentType": "text/plain", "data": _b64(
             "Called about shortness of breath; inhaler refilled.")}}]},
        {"resourceType": "Condition", "id": f"{pid}-asthma", "subject": subject,
         "code": {"text": "Asthma"}, "onsetDateTime": "2015-05-05",
         "clinicalStatus": {"coding": [{"code": "active", "display": "Active"}]}},
        {"resourceType": "Condition", "id": f"{pid}-dyspnea", "subject": subject,
         "code": {"text": "Shortness of breath (dyspnea)"}, "onsetDateTime": "2022-02-02"},
        {"resourceType": "Observation", "id": f"{pid}-rr", "status": "final", "subject": subject,
         "code": {"text": "Respiratory rate"}, "effectiveDateTime": "2023-06-01",
         "valueQuantity": {"value": 22, "unit": "/min"}},
        {"resourceType": "Observation", "id": f"{pid}-spo2", "status": "final",
         "subject": subject, "code": {"text": "Oxygen saturation, short of breath at rest"},
         "effectiveDateTime": "2018-01-01", "valueQuantity": {"value": 91, "unit": "%"}},
        *({"resourceType": "Observation", "id": f"{pid}-weight-{year}", "status": "final",
           "subject": subject, "code": {"text": "Body weight"},
           "effectiveDateTime": f"{year}-04-01", "valueQuantity": {"value": 60 + year % 7,
                                                                 "unit": "kg"}}
          for year in range(2010, 2015)),
    ]


def _browser_ready() -> str | None:
    """Why the browser tests cannot run here, or None (`make test` installs all three)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (make test installs Debian's chromium)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules is missing (make test runs npm ci there)"
    if shutil.which("node") is None:
        return "node is missing"
    return None


class EhrPages:
    """A loopback "EHR": any GET answers a chart page embedding `?app=<url>` in an iframe."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                app = parse_qs(urlsplit(self.path).query).get("app", [""])[0]
                body = ("<!doctype html><title>EHR</title><h1>EHR chart</h1><iframe id=\"app\" "
                        f"title=\"Chart search\" src=\"{html.escape(app)}\" width=\"1000\" "
                        "height=\"800\"></iframe>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, app: str) -> str:
        return self.origin + "/chart?" + urlencode({"app": app})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Serve:
    """`python -m adapter.cli serve` on a free port with the given settings."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
        # DEBUG on purpose (allowed by log_phi_at_debug): the token must not reach even the
        # debug lines, which are the ones that may hold patient data
        full.update(env, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                    FHIR_RERANK_LOG_PHI_AT_DEBUG="true")
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapter.cli", "--log-level", "DEBUG", "serve", "--host",
             "127.0.0.1", "--port", str(self.port)], cwd=REPO_ROOT, env=full,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(self.root + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("serve did not start: " + log_path.read_text()[-3000:])

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def smart_stack(tmp_path_factory, tiny_model_dir):
    why = _browser_ready()
    if why and os.environ.get("SMART_APP_BROWSER") == "required":  # `make test` installed them
        pytest.fail(why)
    if why:
        pytest.skip(why)
    fhir = FhirTestServer()
    fhir.start([])
    ehr, other = EhrPages(), EhrPages()  # the EHR may frame the app; the other origin may not
    try:
        stack = _start_stack(fhir, ehr, other, tmp_path_factory.mktemp("smart-app"),
                             tiny_model_dir)
    except BaseException:
        fhir.stop()
        ehr.stop()
        other.stop()
        raise
    try:
        yield stack
    finally:
        stack["serve"].stop()
        fhir.stop()
        ehr.stop()
        other.stop()


def _start_stack(fhir: FhirTestServer, ehr: EhrPages, other: EhrPages, log_dir: Path,
                 tiny_model_dir: Path) -> dict:
    pid = f"smartapp-{uuid.uuid4().hex[:10]}"
    for resource in _chart(pid):
        fhir.put(resource)
    serve = Serve({
        "FHIR_RERANK_FHIR_BASE_URL": fhir.base_url,
        "FHIR_RERANK_SMART_STANDIN": "true",
        "FHIR_RERANK_RERANKER": "qwen3", "FHIR_RERANK_MODEL": str(tiny_model_dir),
        "FHIR_RERANK_MODELS_ALLOWED": str(tiny_model_dir), "FHIR_RERANK_DEVICE": "cpu",
        "FHIR_RERANK_DTYPE": "float32", "FHIR_RERANK_MAX_LENGTH": "256",
        "FHIR_RERANK_MAX_CHUNKS_PER_DOC": "50",
        "FHIR_RERANK_SMART_FRAME_ANCESTORS": ehr.origin,
    }, log_dir / "serve.log")
    return {"fhir": fhir, "serve": serve, "pid": pid, "dir": log_dir, "ehr": ehr,
            "other": other}


@pytest.fixture()
def smart(smart_stack):
    """The stack with the test FHIR server made a SMART server whose authorization server is
    the stand-in (discovery, CORS, only tokens the stand-in calls active), no faults armed."""
    from adapter.app.standin import configuration

    fhir, root = smart_stack["fhir"], smart_stack["serve"].root
    fhir.reset()
    fhir.set_smart(configuration(root))
    fhir.set_auth(introspect=root + "/smart/introspect")
    yield smart_stack
    fhir.reset()


def _drive(plan: dict, timeout: float = 150) -> dict:
    done = subprocess.run(["node", str(BROWSER_DIR / "chart_search.js"), json.dumps(plan)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ehr_launch_search_filter_and_401_in_chromium(smart):
    fhir, serve, pid = smart["fhir"], smart["serve"], smart["pid"]
    made = requests.post(serve.root + "/smart/launches", json={"patient": pid}, timeout=10).json()
    assert made["url"].startswith(serve.root + "/app/launch?iss=")
    shot = smart["dir"] / "chart-search.png"
    seen = _drive({"launchUrl": made["url"], "question": "shortness of breath",
                   "dateFrom": "2021-01-01", "fhirAdminUrl": fhir.admin_url,
                   "screenshot": str(shot), "timeoutMs": 60000})
    steps = seen["steps"]

    # launch link → authorize (S256) → token → /app/, with the banner the token asked for
    launched = steps["launched"]
    assert launched["url"].startswith(serve.root + "/app/")
    assert "code=" not in launched["url"]  # fhirclient took the code out of the address
    assert "Ada Testperson" in launched["banner"] and "1950-02-03" in launched["banner"]
    assert launched["focused"] == "q"
    style = json.loads((REPO_ROOT / "adapter/app/static/smart-style.json").read_text())
    assert launched["styleBackground"] == style["color_background"]  # smart_style_url applied
    authorize = [r["url"] for r in seen["requests"] if "/smart/authorize?" in r["url"]]
    assert len(authorize) == 1, seen["requests"]
    query = parse_qs(urlsplit(authorize[0]).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["launch"] == [made["launch"]] and query["state"][0]
    assert "patient/DocumentReference.rs" in query["scope"][0].split()

    # the async job's progress, from X-Progress (the first answer is always a 202 "fetching")
    assert "Reading the chart from the FHIR server…" in seen["progress"], seen["progress"]

    grouped = steps["grouped"]
    assert grouped["error"] is None
    assert [g["type"] for g in grouped["groups"]] == ["DocumentReference", "Observation",
                                                       "Condition"]
    assert grouped["heading"] == "Results 1–10 of 11" and grouped["nextEnabled"]
    assert sum(g["count"] for g in grouped["groups"]) == 10
    page2 = steps["page2"]
    assert page2["heading"] == "Results 11–11 of 11" and not page2["nextEnabled"]
    both = grouped["entries"] + page2["entries"]
    assert len({(e["type"], e["date"], e["text"]) for e in both}) == 11
    long_note = next(e for e in both if e["text"] == "Pulmonology progress note")
    note_text = "".join(PARAGRAPH.format(n=n) for n in range(1, 31))
    # the best passage the adapter scored (best-passage extension): a part of the note, shown
    # with the question's words marked
    assert long_note["passageSource"] == "model"
    passage = long_note["passage"].strip()
    assert 40 < len(passage) < len(note_text) and passage in note_text
    assert {m.lower() for m in long_note["marks"]} >= {"shortness", "breath"}
    assert any("scored as overlapping chunks" in n for n in grouped["notes"])
    assert all(0 <= e["meter"] <= 1 for e in grouped["entries"])
    assert shot.stat().st_size > 10_000

    flat = steps["flat"]
    assert flat["groups"] == [] and len(flat["entries"]) == 10
    assert sorted(e["text"] for e in flat["entries"]) == sorted(
        e["text"] for e in grouped["entries"])

    recent = [e["date"] for e in steps["recent"]["entries"]]
    assert len(recent) == 10 and recent == sorted(recent, reverse=True)
    assert recent[0] == "2023-06-01"

    dated = steps["dated"]
    assert dated["error"] is None and dated["heading"] == "Results 1–3 of 3"
    assert all(e["date"] >= "2021-01-01" for e in dated["entries"]), dated["entries"]
    assert {e["text"] for e in dated["entries"]} == {
        "Telephone follow-up", "Respiratory rate: 22 /min", "Shortness of breath (dyspnea)"}

    refused = steps["refused"]
    assert not refused["resultsVisible"]
    assert refused["error"].startswith("The FHIR server did not accept your sign-in (HTTP 401)")

    # the token: never in a URL the browser requested or navigated to, nor in the console,
    # the adapter's log (DEBUG and up) or the FHIR server's request paths
    token = launched["token"]
    assert token and len(token) >= 32
    assert not [r for r in seen["requests"] if token in r["url"]]
    assert not [u for u in seen["navigations"] if token in u]
    assert not [c for c in seen["console"] if token in c]
    logged = fhir.requests() if hasattr(fhir, "requests") else requests.get(
        fhir.admin_url + "/requests", timeout=10).json()
    assert logged and not [r for r in logged if token in r["path"] + r["query"]]
    assert any(r["authorization"] == f"Bearer {token}" for r in logged)  # passed through
    serve_log = serve.log_path.read_text(errors="replace")
    assert token not in serve_log
    # nor the patient id or the question, at INFO and above (the launch and the searches name both)
    loud = [line for line in serve_log.splitlines() if "DEBUG" not in line]
    assert loud and not [line for line in loud if pid in line or "shortness" in line]
    if os.environ.get("SMART_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SMART_APP_SCREENSHOT"])


def test_standalone_launch_picks_the_patient_in_chromium(smart):
    serve, pid = smart["serve"], smart["pid"]
    seen = _drive({"launchUrl": serve.root + "/app/launch", "standalonePatient": pid,
                   "question": "inhaler", "timeoutMs": 60000})
    assert seen["steps"]["picker"]["url"].startswith(serve.root + "/smart/authorize?")
    query = parse_qs(urlsplit(seen["steps"]["picker"]["url"]).query)
    assert "launch" not in query and "launch/patient" in query["scope"][0].split()
    assert query["code_challenge_method"] == ["S256"]
    assert "Ada Testperson" in seen["steps"]["launched"]["banner"]
    grouped = seen["steps"]["grouped"]
    assert grouped["error"] is None and grouped["entries"]
    short = next(e for e in grouped["entries"] if e["text"] == "Telephone follow-up")
    assert short["passageSource"] == "words" and short["marks"] == ["inhaler"]


def test_ehr_launch_inside_the_ehr_iframe_in_chromium(smart):
    """frame-ancestors = smart_frame_ancestors: the EHR's origin may frame the app (the whole
    launch runs inside the iframe), another origin may not."""
    serve, pid = smart["serve"], smart["pid"]
    made = requests.post(serve.root + "/smart/launches", json={"patient": pid}, timeout=10).json()
    ehr, other = smart["ehr"], smart["other"]
    seen = _drive({"question": "inhaler", "timeoutMs": 60000, "iframe": {
        "parentUrl": ehr.url(made["url"]), "refusedParentUrl": other.url(serve.root + "/app/")}})
    framed = seen["steps"]["iframe"]
    assert framed["url"].startswith(serve.root + "/app/") and framed["results"] == 10
    assert framed["heading"] == "Results 1–10 of 11"
    assert "frame-ancestors" in seen["steps"]["iframeRefused"]
    assert ehr.origin in seen["steps"]["iframeRefused"]


def test_no_launch_without_s256_in_chromium(smart):
    """A SMART server that does not offer S256 gets no authorization request at all: the app
    (fhirclient, pkceMode "required") stops on its launch page and says why."""
    from adapter.app.standin import configuration

    fhir, serve, pid = smart["fhir"], smart["serve"], smart["pid"]
    weak = configuration(serve.root)
    weak["code_challenge_methods_supported"] = ["plain"]
    fhir.set_smart(weak)
    made = requests.post(serve.root + "/smart/launches", json={"patient": pid}, timeout=10).json()
    seen = _drive({"launchUrl": made["url"], "question": "-", "expectLaunchError": True,
                   "timeoutMs": 60000})
    error = seen["steps"]["launchError"]
    assert error["url"].startswith(serve.root + "/app/launch?")
    assert error["status"].startswith("The app could not start:") and "S256" in error["status"]
    assert not [r for r in seen["requests"] if "/smart/authorize" in r["url"]]


def test_launch_with_an_iss_off_the_list_is_refused_by_the_server(smart):
    serve = smart["serve"]
    answer = requests.get(serve.root + "/app/launch", params={
        "iss": "http://127.0.0.1:9/fhir", "launch": "x"}, timeout=10)
    assert answer.status_code == 400 and "not configured for" in answer.text
