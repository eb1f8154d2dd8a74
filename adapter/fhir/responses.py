"""Upstream answers → named errors and warnings: the status of a failed GET as the error
from adapter.errors that names it and the fix, an OperationOutcome's issues as text, and
Retry-After. Messages name the URL path, never the query (it may carry patient ids)."""
from __future__ import annotations

from typing import Any

import requests

from adapter.errors import (BadRequest, UpstreamAuthError, UpstreamError, UpstreamGone,
                            UpstreamNotFound, UpstreamThrottled)
from adapter.models import Outcome


def raise_for_status(response: requests.Response, path: str, attempts: int) -> None:
    """Raise the named Upstream error for a non-2xx status (after retries)."""
    status = response.status_code
    if status < 300:
        return
    if status in (400, 422):
        detail = outcome_diagnostics(response) or "no diagnostics given"
        raise BadRequest(f"the FHIR server refused GET {path} ({status}): {detail}; change or "
                         "remove the search parameter it names")
    if status in (401, 403):
        headers = {k: v for k, v in response.headers.items() if k.lower() == "www-authenticate"}
        what = "missing or expired credentials" if status == 401 else "access refused"
        raise UpstreamAuthError(f"the FHIR server answered {status} ({what}) for GET {path}; "
                                "send a valid Authorization header", status=status, headers=headers)
    if status == 404:
        raise UpstreamNotFound(f"the FHIR server answered 404 for GET {path}; check the "
                               "resource type, id and fhir_base_url")
    if status == 410:
        raise UpstreamGone(f"the FHIR server answered 410 Gone for GET {path}")
    if status == 429:
        headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        raise UpstreamThrottled(f"the FHIR server is throttling requests (429 for GET {path} "
                                f"after {attempts} attempts); try again later", headers=headers)
    if status >= 500:
        raise UpstreamError(f"the FHIR server answered {status} for GET {path} after {attempts} "
                            "attempts; it may be down or overloaded, try again later")
    raise UpstreamError(f"the FHIR server answered {status} for GET {path}; check "
                        "fhir_base_url (it must be the final FHIR base, without redirects)")


def issue_texts(outcome: Any) -> list[tuple[str, str]]:
    """(code, text) of each issue of an OperationOutcome (empty for anything else)."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    issues = outcome.get("issue") if isinstance(outcome.get("issue"), list) else []
    found = []
    for issue in (i for i in issues if isinstance(i, dict)):
        details = issue.get("details")
        text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict)
                                            else "")
        found.append((str(issue.get("code") or "informational"), str(text or "(no text)")))
    return found


def outcome_warnings(resource: dict[str, Any]) -> list[Outcome]:
    """An upstream OperationOutcome entry as warning Outcomes (one per issue)."""
    return [Outcome("warning", code, "FHIR server: " + text)
            for code, text in issue_texts(resource)] or \
        [Outcome("warning", "informational", "the FHIR server sent an OperationOutcome entry")]


def outcome_diagnostics(response: requests.Response) -> str:
    """The diagnostics of an OperationOutcome error body, joined; '' when there are none."""
    try:
        return "; ".join(text for _, text in issue_texts(response.json()))
    except ValueError:
        return ""


