"""Keeping patient data out of log lines: a URL path is logged without its query string and
with every segment that could name a patient or a job masked — ids after a resource type
(`/fhir/Patient/123/$rerank` → `/fhir/Patient/*/$rerank`, `/fhir/Condition/abc` →
`/fhir/Condition/*`), job ids (`/fhir/_async/*`: an id is the capability to read the job)
and, under this API's `/fhir`, any segment that is not a known name (`/fhir/*`).

`redact_text` applies the same rule to a whole log line, whoever wrote it (adapter.logs runs
every record of the process through it, a library's too): URLs lose their user info, query
and fragment and have their path masked, bare paths are masked, any `?name=value…` becomes
`?…`, and urllib3's "unparsed data" (an upstream's raw header lines) is withheld."""
from __future__ import annotations

import re

from adapter.models import RESOURCE_TYPES

_KNOWN = frozenset({*RESOURCE_TYPES, "Patient", "Binary", "OperationDefinition", "metadata",
                    "_async", "_history", "_search", "rerank", "$rerank", "healthz", "readyz",
                    "metrics"})
_ID_FOLLOWS = frozenset({*RESOURCE_TYPES, "Patient", "Binary", "_async", "_history"})


def redact_path(path: str) -> str:
    segments = path.split("?", 1)[0].split("/")
    api = len(segments) > 1 and segments[1] == "fhir"
    out: list[str] = []
    for index, segment in enumerate(segments):
        previous = segments[index - 1] if index else ""
        if previous in _ID_FOLLOWS and segment:
            out.append("*")
        elif api and index > 1 and segment and segment not in _KNOWN:
            out.append("*")
        else:
            out.append(segment)
    return "/".join(out)


_URL_OR_PATH = re.compile(
    r"""(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^\s/?#"'<>\\]*)"""
    r"""(?P<upath>[^\s?#"'<>]*)(?P<uquery>\?[^\s#"'<>]*)?(?:\#[^\s"'<>]*)?"""
    r"""|(?<![\w.~%:/\\-])(?P<path>/[^\s?#"'<>]*)(?P<query>\?[^\s#"'<>]*)?""")
_QUERY = re.compile(r"""\?[^\s=&?#"'<>/]+=[^\s"'<>]*""")
_UNPARSED = re.compile(r"unparsed[ _]data\W{0,3}.*")


def _redact_match(match: re.Match[str]) -> str:
    if match.group("scheme"):
        host = match.group("authority").rpartition("@")[2]  # no user:password@
        query = "?…" if match.group("uquery") else ""
        return f"{match.group('scheme')}{host}{redact_path(match.group('upath'))}{query}"
    return redact_path(match.group("path")) + ("?…" if match.group("query") else "")


def redact_text(text: str) -> str:
    """A log line (message or traceback) with URLs, paths and query strings redacted as the
    module docstring says; text without them comes back unchanged."""
    if not text:
        return text
    text = _UNPARSED.sub("unparsed data: [withheld]", text)
    text = _URL_OR_PATH.sub(_redact_match, text)
    return _QUERY.sub("?…", text)
