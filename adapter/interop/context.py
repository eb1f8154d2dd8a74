"""What the scenarios share: the server, the token, the test patient, in-process adapters,
and the results and named findings they produce."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from adapter.config import load_settings
from adapter.interop.capability import ServerProfile
from adapter.interop.loader import LoadedPatient, ServerCall

PASS, FAIL, SKIP = "pass", "fail", "skipped"


class ScenarioSkipped(Exception):
    """The scenario cannot run against this server; the message says why."""


class ScenarioFailed(Exception):
    """The adapter and the server do not work together here; the message says how."""


@dataclass
class Finding:
    """A named way this server differs from HAPI that the adapter handles (not a failure)."""

    code: str
    text: str
    scenario: str


@dataclass
class ScenarioResult:
    name: str
    status: str  # pass | fail | skipped
    reason: str
    seconds: float
    findings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdapterAnswer:
    """One answer of the in-process adapter."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    def issue(self) -> str:
        issues = self.body.get("issue") or [{}]
        return f"{issues[0].get('code', '?')}: {issues[0].get('diagnostics', '')}"

    def matches(self) -> list[dict[str, Any]]:
        return [e for e in self.body.get("entry") or [] if e.get("search", {}).get("mode") == "match"]

    def outcome_codes(self) -> list[str]:
        return [i.get("code", "") for e in self.body.get("entry") or []
                if e.get("search", {}).get("mode") == "outcome"
                for i in e.get("resource", {}).get("issue") or []]

    def link(self, relation: str) -> str | None:
        return next((lk["url"] for lk in self.body.get("link") or []
                     if lk.get("relation") == relation), None)


def resource_ids(entries: list[dict[str, Any]]) -> list[str]:
    """Ids from entries' fullUrls (…/Type/id), in order."""
    return [e["fullUrl"].rstrip("/").rsplit("/", 1)[-1] for e in entries]


class InteropContext:
    """State for one run. `adapter_get`/`adapter_post` build apps lazily, one per settings."""

    def __init__(self, base_url: str, authorization: str | None, *,
                 model_dir: str | None = None, model_problem: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.authorization = authorization
        self.call = ServerCall(self.base_url, authorization)
        self.profile = ServerProfile()
        self.patient: LoadedPatient | None = None
        self.load_problem = "the test patient was not loaded"
        self.server_requires_auth: bool | None = None
        self.model_dir = model_dir
        self.model_problem = model_problem
        self.findings: list[Finding] = []
        self.current = ""
        self._clients: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ findings, preconditions

    def finding(self, code: str, text: str) -> None:
        """Record a named finding for the scenario that is running."""
        self.findings.append(Finding(code, text, self.current))

    def need_patient(self) -> LoadedPatient:
        if self.patient is None:
            raise ScenarioSkipped(self.load_problem)
        return self.patient

    # ------------------------------------------------------------------ the in-process adapter

    def client(self, **overrides: Any) -> Any:
        """A Flask test client of `create_app` on this server (reranker none, jobs in-process)."""
        key = tuple(sorted(overrides.items()))
        if key not in self._clients:
            # Not at the top: the CLI's parser imports adapter.interop, and the app would bring
            # prometheus_client in before `serve` sets PROMETHEUS_MULTIPROC_DIR.
            from adapter.api.app import create_app

            # keyword_list_unmatched: every resource reaches the keyword ranking, so `total`
            # shows whether the adapter fetched all of the test patient
            settings = {"fhir_base_url": self.base_url, "reranker": "none", "redis_url": "",
                        "fhir_timeout": 60.0, "keyword_list_unmatched": True, **overrides}
            self._clients[key] = create_app(load_settings(settings, env={})).test_client()
        return self._clients[key]

    def _headers(self, auth: bool | str, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Accept": "application/fhir+json", **(extra or {})}
        token = auth if isinstance(auth, str) else (self.authorization if auth else None)
        if token:
            headers["Authorization"] = token
        return headers

    def adapter_get(self, path: str, params: list[tuple[str, str]] | None = None, *,
                    auth: bool | str = True, headers: dict[str, str] | None = None,
                    **overrides: Any) -> AdapterAnswer:
        """GET `path` (relative to the adapter, e.g. /fhir/Condition) with `params`."""
        url = f"{path}?{urlencode(params)}" if params else path
        response = self.client(**overrides).get(url, headers=self._headers(auth, headers))
        return _answer(response)

    def adapter_request(self, method: str, path: str, *, body: Any = None,
                        auth: bool | str = True, headers: dict[str, str] | None = None,
                        **overrides: Any) -> AdapterAnswer:
        response = self.client(**overrides).open(path, method=method, json=body,
                                                 headers=self._headers(auth, headers))
        return _answer(response)

    def adapter_all_pages(self, path: str, params: list[tuple[str, str]],
                          **overrides: Any) -> tuple[AdapterAnswer, list[dict[str, Any]]]:
        """The first answer and the matches of every page, following the adapter's next links."""
        first = self.adapter_get(path, params, **overrides)
        answer, entries, pages = first, [], 0
        while answer.status == 200:
            entries += answer.matches()
            nxt = answer.link("next")
            pages += 1
            if not nxt or pages > 100:
                break
            parts = urlsplit(nxt)
            answer = self.adapter_get(f"{parts.path}?{parts.query}", **overrides)
        if answer.status != 200:
            raise ScenarioFailed(f"page {pages + 1} of the adapter's answer was "
                                 f"{answer.status} ({answer.issue()})")
        return first, entries


def _answer(response: Any) -> AdapterAnswer:
    body = response.get_json(silent=True)
    return AdapterAnswer(response.status_code, body if isinstance(body, dict) else {},
                         {k: v for k, v in response.headers.items()})
