"""The interop kit (`fhir-rerank interop`, adapter/interop/) against real FHIR servers.

- Against the project's test server in its plain (r4) and HAPI-behaviour modes: every
  scenario that can run passes, the JUnit file parses and its counts match, and the kit's
  test patient is gone afterwards.
- Against servers with one behaviour broken (server.js --fault): exactly that scenario fails,
  with its reason; servers that merely differ from HAPI give named findings, not failures.
- `pytest -m hapi --fhir-base-url URL` is a thin wrapper: one test per kit scenario against
  that live server (a token, if it needs one, in FHIR_INTEROP_TOKEN).
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest
import requests

from adapter.cli import main as cli_main
from adapter.interop import InteropOptions, run_interop, scenario_names
from adapter.interop.context import ScenarioFailed
from adapter.interop.loader import ServerCall, delete_test_patient, load_test_patient
from adapter.interop.report import InteropReport
from fhirserver import FhirTestServer

TOKEN = "interop-secret"
MODEL = ("model-rerank", "long-note-whole")
AUTH = ("auth-pass-through", "auth-missing-token", "auth-wrong-token")


def _statuses(report: InteropReport, status: str) -> set[str]:
    return {r.name for r in report.results if r.status == status}


def _assert_patient_gone(base_url: str, patient_id: str, authorization: str | None = None) -> None:
    headers = {"Accept": "application/fhir+json"}
    if authorization:
        headers["Authorization"] = authorization
    read = requests.get(f"{base_url}/Patient/{patient_id}", headers=headers, timeout=30)
    assert read.status_code in (404, 410), read.text[:200]
    for rtype in ("Observation", "Condition", "DocumentReference"):
        found = requests.get(f"{base_url}/{rtype}", params={"patient": patient_id, "_summary": "count"},
                             headers=headers, timeout=30)
        assert found.status_code == 200 and found.json()["total"] == 0, (rtype, found.text[:200])


@pytest.fixture
def broken_server(request: pytest.FixtureRequest) -> Iterator[FhirTestServer]:
    """A test server with no data of its own and one behaviour broken: (mode, faults, max_count)."""
    mode, faults, max_count = request.param
    server = FhirTestServer()
    server.start([], mode=mode, faults=tuple(faults), max_count=max_count)
    yield server
    server.stop()


def test_cli_on_the_plain_server_with_auth_passes_every_scenario(fhir, tiny_model_dir, tmp_path,
                                                                 capsys, monkeypatch):
    fhir.set_auth(token=f"Bearer {TOKEN}")
    monkeypatch.setenv("INTEROP_TEST_TOKEN", TOKEN)
    junit, report_json = tmp_path / "interop.xml", tmp_path / "interop.json"
    code = cli_main(["interop", "--fhir-base-url", fhir.base_url, "--token-env", "INTEROP_TEST_TOKEN",
                     "--junit", str(junit), "--json", str(report_json),
                     "--model-dir", str(tiny_model_dir)])
    out, err = capsys.readouterr()
    data = json.loads(report_json.read_text())
    statuses = {s["name"]: s for s in data["scenarios"]}
    assert code == 0, out
    assert list(statuses) == scenario_names()
    # the r4-mode server ignores _content, so there is nothing to delegate; all else passes
    assert {n for n, s in statuses.items() if s["status"] != "pass"} == {"content-delegation"}
    assert {f["code"] for f in data["findings"]} == {"401-without-www-authenticate", "content-ignored"}
    assert TOKEN not in out + err + report_json.read_text() + junit.read_text()
    # the JUnit file parses and agrees with the table and the JSON
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == scenario_names()
    assert int(suite.get("tests")) == len(cases) == data["counts"]["pass"] + 1
    assert int(suite.get("failures")) == 0 and int(suite.get("skipped")) == 1
    assert f"{len(cases)} scenarios, {data['counts']['pass']} passed, 0 failed, 1 skipped" in out
    assert all(name in out for name in scenario_names())
    assert sum(line.startswith("[") for line in err.splitlines()) == len(cases)
    _assert_patient_gone(fhir.base_url, data["test_patient"]["id"], f"Bearer {TOKEN}")


def test_hapi_mode_passes_with_getpages_paging_and_no_fulltext(hapi):
    report = run_interop(InteropOptions(hapi.base_url, model_dir=""), progress=None)
    assert report.ok, [(r.name, r.reason) for r in report.results if r.status == "fail"]
    assert _statuses(report, "skipped") == {*AUTH, *MODEL, "content-delegation"}
    assert "_getpages" in report.profile.paging
    assert [f.code for f in report.findings] == ["no-fulltext"]
    assert report.by_name()["paging-next-links"].reason.endswith("(HAPI _getpages next links)")
    _assert_patient_gone(hapi.base_url, report.patient_id)


@pytest.mark.parametrize("broken_server, reason", [
    (("r4", ["drop-next-links"], None), "the adapter saw 5 of 36 Observations; the server's "
                                         "first page has 5 of 36 and no next link"),
    (("hapi", ["gone-paging"], None), "paging cache expired twice (410 Gone)"),
], indirect=["broken_server"], ids=["dropped-next-links", "paging-410"])
def test_a_broken_behaviour_fails_exactly_its_scenario(broken_server, reason, tmp_path):
    junit = tmp_path / "interop.xml"
    code = cli_main(["interop", "--fhir-base-url", broken_server.base_url, "--no-model",
                     "--junit", str(junit)])
    suite = ET.parse(junit).getroot().find("testsuite")
    failed = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert code == 1
    assert [c.get("name") for c in failed] == ["paging-next-links"]
    assert reason in failed[0].find("failure").get("message")
    assert suite.get("failures") == "1"


@pytest.mark.parametrize("broken_server", [
    ("r4", ["ignore-count", "refuse-filter=Condition:clinical-status"], 10)], indirect=True)
def test_servers_that_differ_from_hapi_give_findings_not_failures(broken_server):
    report = run_interop(InteropOptions(broken_server.base_url, model_dir=""), progress=None)
    results = report.by_name()
    assert report.ok, [(r.name, r.reason) for r in report.results if r.status == "fail"]
    assert {"count-ignored", "filter-refused"} <= {f.code for f in report.findings}
    assert results["filters-Condition"].status == "pass"
    assert "refused by the server: clinical-status" in results["filters-Condition"].reason
    assert "the server capped the page at 10" in results["page-size-above-max"].reason
    assert "over 4 pages" in results["paging-next-links"].reason
    _assert_patient_gone(broken_server.base_url, report.patient_id)


def test_a_failed_cleanup_is_reported(fhir):
    call = ServerCall(fhir.base_url, None)
    loaded = load_test_patient(call)
    fhir.inject_fault(status=409, times=2, path_contains=f"/Patient/{loaded.patient_id}")
    problems = delete_test_patient(call, loaded)
    assert problems == ["DELETE Patient answered 409: Injected fault: HTTP 409",
                        "the test Patient still reads 409 after DELETE"]
    assert delete_test_patient(call, loaded) == []
    _assert_patient_gone(fhir.base_url, loaded.patient_id)


def test_a_wrong_expectation_fails_the_scenario(hapi, monkeypatch):
    """The scenarios check against the test data, not the server: change the truth and the
    filter scenario must fail (guards against checks that cannot fail)."""
    from adapter.interop import testdata

    cases = dict(testdata.FILTER_CASES)
    cases["Observation"] = [("status", "amended", lambda r: r["status"] == "final")]
    monkeypatch.setattr("adapter.interop.scenarios_search.FILTER_CASES", cases)
    report = run_interop(InteropOptions(hapi.base_url, model_dir=""), progress=None)
    assert _statuses(report, "fail") == {"filters-Observation"}
    assert "status=amended: 4 resources, expected 32" in report.by_name()["filters-Observation"].reason


# ---------------------------------------------------------------- `pytest -m hapi`: a live server

@pytest.fixture(scope="module")
def live_report(request: pytest.FixtureRequest) -> InteropReport:
    url = request.config.getoption("--fhir-base-url")
    token = os.environ.get("FHIR_INTEROP_TOKEN")
    authorization = None if not token else (token if " " in token else f"Bearer {token}")
    return run_interop(InteropOptions(url, authorization))


@pytest.mark.hapi
@pytest.mark.parametrize("scenario", scenario_names())
def test_live_server(live_report: InteropReport, scenario: str) -> None:
    result = live_report.by_name()[scenario]
    if result.status == "skipped":
        pytest.skip(result.reason)
    if result.status == "fail":
        raise ScenarioFailed(result.reason)


def test_cli_against_real_hapi_passes_every_scenario(hapi_fhir, tmp_path, capsys, monkeypatch):
    """Real HAPI FHIR (tests/hapi, started by the suite) with a bearer token demanded: every
    server scenario runs and passes, `content-delegation` included (HAPI does full text). The
    two model scenarios are server-independent and run on the Node server above (`--no-model`
    here: on a loaded 2-core machine they can outlast the 30 s synchronous budget)."""
    hapi_fhir.set_auth(token=f"Bearer {TOKEN}")
    monkeypatch.setenv("INTEROP_TEST_TOKEN", TOKEN)
    junit, report_json = tmp_path / "interop.xml", tmp_path / "interop.json"
    code = cli_main(["interop", "--fhir-base-url", hapi_fhir.base_url, "--token-env", "INTEROP_TEST_TOKEN",
                     "--junit", str(junit), "--json", str(report_json), "--no-model"])
    out, _ = capsys.readouterr()
    data = json.loads(report_json.read_text())
    statuses = {s["name"]: s for s in data["scenarios"]}
    assert code == 0, out
    assert list(statuses) == scenario_names()
    assert {n: s["status"] for n, s in statuses.items() if s["status"] != "pass"} == \
        {n: "skipped" for n in MODEL}, out
    assert "the server's _content full text matched" in statuses["content-delegation"]["reason"]
    assert "HAPI _getpages next links" in statuses["paging-next-links"]["reason"]
    assert data["findings"] == [], data["findings"]
    assert f"HAPI FHIR Server {hapi_fhir.version}" in out
    assert f"{len(statuses)} scenarios, {len(statuses) - 2} passed, 0 failed, 2 skipped" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("failures")) == 0 and int(suite.get("skipped")) == 2
    _assert_patient_gone(hapi_fhir.base_url, data["test_patient"]["id"], f"Bearer {TOKEN}")
