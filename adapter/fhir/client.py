"""The REST FHIR source: searches a live FHIR R4 server with requests.

Every request carries a timeout, `Accept: application/fhir+json`, `Cache-Control: no-cache` (HAPI
would otherwise answer a repeated search from its result cache, missing what was just written),
a User-Agent and the caller's
Authorization header (passed through unchanged, never logged, sent only to URLs under the FHIR
base: a URL's path is normalised before that check, see `under_base_url`). Connection errors, 429 and 5xx are retried with exponential backoff, read timeouts are
not; each failure that remains becomes a named error (adapter.fhir.responses) whose message
names the upstream status, the URL path (never the query: it may carry patient ids) and the
fix. The search's `upstream_deadline` (adapter.deadline) cuts every timeout and backoff.
Paging follows `next` links under the FHIR base only, up to `max_pages`, and re-runs a search
once when HAPI's paging cache expires (410 Gone).
"""
from __future__ import annotations

import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit, urlunsplit

import requests

from adapter.deadline import expired_error, remaining, submit_in_context
from adapter.errors import (BadRequest, UpstreamError, UpstreamGone, UpstreamNotFound,
                            UpstreamTimeout)
from adapter.fhir.responses import outcome_warnings, raise_for_status
from adapter.retry import RETRY_STATUSES, wait_before_retry
from adapter.fhir.source import FhirSource
from adapter.logsafe import redact_path
from adapter.models import FetchResult, Outcome

if TYPE_CHECKING:
    from adapter.config import Settings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
USER_AGENT = "fhir-rerank-adapter/0.1"
MAX_WORKERS = 4


def limit_outcome(limit: int) -> Outcome:
    """The warning added when a search is cut at the per-request resource cap."""
    return Outcome("warning", "incomplete",
                   f"stopped at {limit} resources; narrow the search (date, category …) "
                   "or raise max_resources")


def _origin(url: str) -> tuple[str, str]:
    """(scheme, host:port) with default ports made explicit, for same-server checks."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), f"{(parts.hostname or '').lower()}:{port}"


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4: `/fhir/a/../b/./c` → `/fhir/b/c` (never above the root)."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if len(out) > 1 or (out and out[0]):
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # `/a/b/..` is the folder `/a/`
    joined = "/".join(out)
    return joined if joined.startswith("/") or not path.startswith("/") else "/" + joined


def path_readings(path: str) -> set[str]:
    """Every path a server might take `path` for, dot segments removed: as sent, and with
    percent-encoding undone (`%2e%2e`, `%2F`, up to three times for double encoding),
    backslashes read as slashes and `;params` dropped from segments (`..;/`), as lenient
    servers and proxies do. A URL is under the FHIR base only when all of them are."""
    decoded, text = [path], path
    for _ in range(3):
        text = unquote(text)
        if text == decoded[-1]:
            break
        decoded.append(text)
    readings = set()
    for text in decoded:
        slashed = text.replace("\\", "/")
        unparam = "/".join(segment.split(";", 1)[0] for segment in slashed.split("/"))
        readings.update(remove_dot_segments(t) for t in (text, slashed, unparam))
    return readings


class FhirRestSource(FhirSource):
    """Searches a FHIR R4 server over HTTP (see the module docstring for the guarantees)."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_pages: int = 50, page_size: int = 200,
                 max_attachment_bytes: int = 1_000_000, max_resources: int = 5000,
                 retry_after_cap: float = 10.0,
                 session: requests.Session | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"fhir_base_url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_pages = max(1, max_pages)
        self.page_size = page_size
        self.max_attachment_bytes = max_attachment_bytes
        self.max_resources = max_resources
        self.retry_after_cap = retry_after_cap
        self.session = session or requests.Session()
        self._origin = _origin(self.base_url)
        self._base_path = urlsplit(self.base_url).path.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> "FhirRestSource":
        """A source configured from Settings (fhir_base_url, fhir_timeout, …)."""
        return cls(settings.fhir_base_url, timeout=settings.fhir_timeout,
                   retries=settings.fhir_retries, backoff=settings.fhir_backoff,
                   max_pages=settings.fhir_max_pages, page_size=settings.fhir_page_size,
                   max_attachment_bytes=settings.max_attachment_bytes,
                   max_resources=settings.max_resources)

    def under_base_url(self, url: str) -> str | None:
        """`url` as it will be sent (dot segments removed) when it is on the FHIR base's
        origin *and* under its path however a server reads it (`path_readings`: `..`, `%2e%2e`,
        backslashes, `..;`), else None: the only URLs the caller's Authorization is sent to
        (not other paths of the same host)."""
        if _origin(url) != self._origin:
            return None
        parts = urlsplit(url)
        bases = {b.rstrip("/") for b in path_readings(self._base_path or "/")}
        for path in path_readings(parts.path):
            path = path.rstrip("/")
            if not any(path == base or path.startswith(base + "/") for base in bases):
                return None
        return urlunsplit(parts._replace(path=remove_dot_segments(parts.path)))

    def _under_base(self, url: str) -> bool:
        return self.under_base_url(url) is not None

    def describe(self) -> str:
        return f"FhirRestSource({self.base_url})"

    def _get(self, url: str, authorization: str | None, *, accept: str = FHIR_JSON,
             stream: bool = False) -> requests.Response:
        """GET with retries; returns a 2xx/4xx response or raises a named Upstream error."""
        checked = self.under_base_url(url)
        if checked is None:  # the callers check first; this is the last line of defence
            raise UpstreamError("refusing a request outside the FHIR base: the caller's "
                                "credentials go to that base only; check fhir_base_url")
        url = checked
        # no-cache: HAPI answers a search repeated within a minute from its result cache
        # (reuse_cached_search_results_millis), without what was written since
        headers = {"Accept": accept, "User-Agent": USER_AGENT, "Cache-Control": "no-cache"}
        if authorization:
            headers["Authorization"] = authorization
        path = urlsplit(url).path or "/"
        attempts = self.retries + 1
        for attempt in range(attempts):
            last, retry_after = attempt == attempts - 1, None
            left = remaining()
            if left is not None and left <= 0:
                raise expired_error(f"GET {redact_path(path)}")
            timeout = self.timeout if left is None else min(self.timeout, left)
            try:
                response = self.session.get(url, headers=headers, timeout=timeout,
                                            stream=stream, allow_redirects=False)
            except (requests.Timeout, requests.ConnectionError) as exc:
                # A read timeout (also one inside the body, which requests reports as a
                # ConnectionError) is not retried: it would multiply the wait.
                read_timeout = isinstance(exc, requests.ReadTimeout) or \
                    "Read timed out" in str(exc)
                if read_timeout or (isinstance(exc, requests.Timeout) and last):
                    if left is not None and timeout < self.timeout:
                        raise expired_error(f"GET {redact_path(path)}") from None
                    raise UpstreamTimeout(
                        f"the FHIR server did not answer GET {redact_path(path)} within "
                        f"{self.timeout:g} s; narrow the search or raise fhir_timeout") from None
                if last:
                    raise UpstreamError(
                        f"could not reach the FHIR server for GET {redact_path(path)} "
                        f"({type(exc).__name__}, {attempts} attempts); check fhir_base_url and "
                        "that the server is up") from None
                problem = "connect timeout" if isinstance(exc, requests.Timeout) else \
                    type(exc).__name__
            except requests.RequestException as exc:
                if last:
                    raise UpstreamError(
                        f"could not reach the FHIR server for GET {path} ({type(exc).__name__}, "
                        f"{attempts} attempts); check fhir_base_url and that the server is up"
                    ) from None
                problem = type(exc).__name__
            else:
                if last or response.status_code not in RETRY_STATUSES:
                    raise_for_status(response, path, attempts)
                    return response
                problem = str(response.status_code)
                retry_after = response.headers.get("Retry-After")
                response.close()
            log.warning("FHIR GET %s: %s; retry %d/%d", redact_path(path), problem, attempt + 1,
                        self.retries)
            wait_before_retry(attempt, self.backoff, retry_after, self.retry_after_cap)
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_json(self, url: str, authorization: str | None, expect: str) -> dict[str, Any]:
        """GET a FHIR JSON resource of type `expect`; malformed bodies are UpstreamError."""
        response = self._get(url, authorization)
        path = urlsplit(url).path or "/"
        try:
            body = response.json()
        except ValueError:
            ctype = response.headers.get("Content-Type", "none")
            raise UpstreamError(f"the FHIR server sent a body that is not JSON (content type "
                                f"{ctype}) for GET {path}; check that fhir_base_url is the FHIR "
                                "base (e.g. …/fhir or …/baseR4)") from None
        if not isinstance(body, dict) or body.get("resourceType") != expect:
            got = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
            raise UpstreamError(f"expected a {expect} from GET {path}, got {got}; check that "
                                "fhir_base_url is a FHIR R4 server")
        return body

    def search(self, resource_type: str, params: list[tuple[str, str]],
               authorization: str | None = None, limit: int | None = None) -> FetchResult:
        """All matching resources, following `next` links, up to `limit` (see module doc)."""
        limit = self.max_resources if limit is None else limit
        query = [(k, v) for k, v in params if k != "_count"]
        query.append(("_count", str(self.page_size)))
        first_url = f"{self.base_url}/{quote(resource_type)}?{urlencode(query)}"
        started = time.monotonic()
        try:
            result, pages = self._search_pages(resource_type, first_url, authorization, limit)
        except UpstreamGone:  # HAPI's paging cache expired: the search is re-run once
            log.warning("FHIR %s search: paging cache expired (410); re-running", resource_type)
            try:
                result, pages = self._search_pages(resource_type, first_url, authorization, limit)
            except UpstreamGone:
                raise UpstreamGone(
                    f"the FHIR server's paging cache expired twice (410 Gone) during a "
                    f"{resource_type} search; narrow the search (date, category …) so it needs "
                    "fewer pages, or raise the server's paging cache lifetime") from None
        log.info("FHIR %s search: %d resources in %d page(s), %.2f s", resource_type,
                 len(result.resources), pages, time.monotonic() - started)
        return result

    def _search_pages(self, resource_type: str, url: str, authorization: str | None,
                      limit: int) -> tuple[FetchResult, int]:
        result, seen, skipped, pages = FetchResult([]), set(), 0, 0
        next_url: str | None = url
        while next_url is not None:
            if pages >= self.max_pages:
                result.outcomes.append(Outcome(
                    "warning", "incomplete",
                    f"stopped after {self.max_pages} pages ({len(result.resources)} "
                    f"{resource_type} resources); the server has more: narrow the search "
                    "(date, category …) or raise fhir_max_pages"))
                break
            bundle = self._get_json(next_url, authorization, "Bundle")
            pages += 1
            skipped += self._collect(bundle, resource_type, result, seen)
            if len(result.resources) >= limit:
                more = len(result.resources) > limit or _next_link(bundle) is not None
                del result.resources[limit:], result.full_urls[limit:]
                if more:
                    result.outcomes.append(limit_outcome(limit))
                break
            next_url = self._resolve_next(_next_link(bundle))
        if skipped:
            result.outcomes.append(Outcome("warning", "processing", f"skipped {skipped} "
                                           "search entries without a resource/resourceType"))
        return result, pages

    def _collect(self, bundle: dict[str, Any], resource_type: str, result: FetchResult,
                 seen: set[str]) -> int:
        """Add a page's matches to `result`; returns how many malformed entries were skipped."""
        skipped = 0
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            return 1
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                skipped += 1
                continue
            search = entry.get("search")
            mode = search.get("mode") if isinstance(search, dict) else None
            rtype = resource["resourceType"]
            if rtype == "OperationOutcome" or mode == "outcome":
                result.outcomes.extend(outcome_warnings(resource))
                continue
            if rtype != resource_type:  # _include'd or stray resources are not matches
                log.debug("skipping a %s entry in a %s search", rtype, resource_type)
                continue
            rid = resource.get("id")
            key = f"{rtype}/{rid}"
            if rid is not None and key in seen:  # pages may overlap when data changes
                continue
            seen.add(key)
            full_url = entry.get("fullUrl")
            if not isinstance(full_url, str) or not full_url:
                full_url = f"{self.base_url}/{rtype}/{rid}" if rid else ""
            result.resources.append(resource)
            result.full_urls.append(full_url)
        return skipped

    def _resolve_next(self, link: str | None) -> str | None:
        """Absolute URL of a `next` link; relative ones (incl. HAPI's `?_getpages=`) are
        relative to the FHIR base. Links to another scheme/host are refused."""
        if not link:
            return None
        if link.startswith("?"):
            url = self.base_url + link
        else:
            url = urljoin(self.base_url + "/", link)
        checked = self.under_base_url(url)
        if checked is None:
            raise UpstreamError("refusing to follow a paging link to another server or outside "
                                f"the FHIR base ({urlsplit(url).netloc}, base {self.base_url}): "
                                "the caller's credentials go to that base only; check the "
                                "FHIR server's base URL setting")
        return checked

    def search_many(self, searches: list[tuple[str, list[tuple[str, str]]]],
                    authorization: str | None = None,
                    limit: int | None = None) -> dict[str, FetchResult]:
        """The searches run concurrently (up to 4 at once); the first failure is raised."""
        if len(searches) <= 1:
            return super().search_many(searches, authorization, limit)
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(searches)),
                                thread_name_prefix="fhir-search") as pool:
            futures = [(rtype, submit_in_context(pool, self.search, rtype, params,
                                                 authorization, limit))
                       for rtype, params in searches]
            return {rtype: future.result() for rtype, future in futures}

    def patient_exists(self, patient_id: str, authorization: str | None = None) -> bool:
        """GET Patient/<id>: 200 → True, 404/410 → False; other failures raise."""
        pid = patient_id.removeprefix("Patient/")
        url = f"{self.base_url}/Patient/{quote(pid, safe='')}"
        try:
            self._get_json(url, authorization, "Patient")
        except (UpstreamNotFound, UpstreamGone):
            return False
        return True

    def fetch_attachment(self, url: str, authorization: str | None = None
                         ) -> tuple[str, bytes] | None:
        """(content type, bytes) of an attachment under the FHIR base (`Binary/x` or an
        absolute URL under the base path), or None when it is elsewhere, missing, unreadable
        or over max_attachment_bytes. Never raises."""
        absolute = self.under_base_url(urljoin(self.base_url + "/", url))
        if absolute is None:
            log.warning("not fetching an attachment outside the FHIR base (the caller's "
                        "credentials go to the base only)")
            return None
        try:
            response = self._get(absolute, authorization, accept=f"{FHIR_JSON}, */*;q=0.5",
                                 stream=True)
        except (UpstreamError, BadRequest) as exc:
            log.warning("an attachment was not fetched: %s", type(exc).__name__)
            return None
        cap = self.max_attachment_bytes
        with response:
            ctype = response.headers.get("Content-Type", "application/octet-stream")
            ctype = ctype.split(";")[0].strip()
            is_json = ctype in (FHIR_JSON, "application/json")
            # A Binary resource carries base64 (4/3 larger) plus a little JSON around it.
            body = _read_capped(response, cap * 4 // 3 + 4096 if is_json else cap)
        if body is not None and is_json:
            ctype, body = _binary_content(ctype, body)
        if body is None or len(body) > cap:
            log.warning("an attachment was skipped: unreadable or over max_attachment_bytes=%d",
                        cap)
            return None
        return ctype, body


def _binary_content(ctype: str, body: bytes) -> tuple[str, bytes | None]:
    """(contentType, decoded data) of a Binary resource; other JSON is returned as is."""
    try:
        resource = json.loads(body)
        if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
            return (str(resource.get("contentType") or "application/octet-stream"),
                    base64.b64decode(resource.get("data") or ""))
    except ValueError:  # not JSON, or Binary.data is not base64
        return ctype, None
    return ctype, body


def _read_capped(response: requests.Response, cap: int) -> bytes | None:
    """The body, read in chunks, or None as soon as it exceeds `cap` bytes."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        return None
    body = bytearray()
    for chunk in response.iter_content(chunk_size=65536):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _next_link(bundle: dict[str, Any]) -> str | None:
    links = bundle.get("link") if isinstance(bundle.get("link"), list) else []
    return next((link["url"] for link in links if isinstance(link, dict)
                 and link.get("relation") == "next" and isinstance(link.get("url"), str)), None)
