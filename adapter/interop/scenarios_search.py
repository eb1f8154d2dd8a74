"""Scenarios about reading and searching: the CapabilityStatement, the test patient, type
search, the server's paging, page sizes, filters, `_content` and unknown patients.

Each function takes the `InteropContext` and returns a note (pass), or raises
`ScenarioSkipped` / `ScenarioFailed` with the reason.
"""
from __future__ import annotations

import uuid
import requests

from adapter.interop.capability import read_profile
from adapter.interop.context import InteropContext, ScenarioFailed, ScenarioSkipped, resource_ids
from adapter.interop.loader import LoadError, delete_test_patient, diagnostics, load_test_patient
from adapter.interop.testdata import BASE64_MARKER, FILTER_CASES
from adapter.models import RESOURCE_TYPES

#: A question per type and the code its best BM25 match must carry (None: the base64 note).
TYPE_QUERIES = {"Observation": ("hemoglobin a1c", "4548-4"),
                "Condition": ("asthma", "195967001"),
                "DocumentReference": ("wheezing at night", None)}
SMALL_PAGE = 5
BIG_PAGE = 5000


def capability(ctx: InteropContext) -> str:
    """GET [base]/metadata: an R4 CapabilityStatement declaring the three types."""
    try:
        response = ctx.call.get("metadata", auth=False)
    except requests.RequestException as exc:
        raise ScenarioFailed(f"GET metadata failed ({type(exc).__name__}); check the URL "
                             "and that the server is up") from None
    if response.status_code in (401, 403) and ctx.authorization:
        response = ctx.call.get("metadata")
    if response.status_code != 200:
        raise ScenarioFailed(f"GET metadata answered {response.status_code}: {diagnostics(response)}")
    try:
        statement = response.json()
    except ValueError:
        raise ScenarioFailed("GET metadata is not JSON; the URL must be the FHIR base "
                             "(…/fhir, …/baseR4)") from None
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        raise ScenarioFailed("GET metadata did not answer a CapabilityStatement")
    ctx.profile = read_profile(statement)
    if not ctx.profile.fhir_version.startswith("4."):
        ctx.finding("not-r4", f"the server declares FHIR {ctx.profile.fhir_version}; the "
                    "adapter speaks R4 (4.0.x)")
    if ctx.profile.missing_types:
        raise ScenarioFailed(f"the CapabilityStatement does not declare "
                             f"{', '.join(ctx.profile.missing_types)}")
    return f"FHIR {ctx.profile.fhir_version}; {', '.join(RESOURCE_TYPES)} declared"


def load_patient(ctx: InteropContext) -> str:
    """Create the Binary and the transaction Bundle of the synthetic test patient."""
    try:
        ctx.patient = load_test_patient(ctx.call)
    except requests.RequestException as exc:
        ctx.load_problem = (f"the test patient could not be loaded: {type(exc).__name__} "
                            "(check the URL and that the server is up)")
        raise ScenarioFailed(ctx.load_problem) from None
    except (LoadError, ValueError) as exc:
        ctx.load_problem = f"the test patient could not be loaded: {exc}"
        if "401" in str(exc) or "403" in str(exc):
            ctx.load_problem += " (give --token or --token-env)"
        raise ScenarioFailed(ctx.load_problem) from None
    p = ctx.patient
    counts = ", ".join(f"{p.count(t)} {t}" for t in RESOURCE_TYPES)
    return f"Patient + {counts} in one transaction; the Binary before it"


def _type_search(ctx: InteropContext, rtype: str) -> str:
    patient = ctx.need_patient()
    query, best_code = TYPE_QUERIES[rtype]
    answer = ctx.adapter_get(f"/fhir/{rtype}", [("patient", patient.patient_id),
                                                ("_content", query), ("_count", "200")])
    if answer.status != 200:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()})")
    matches = answer.matches()
    want = set(patient.ids[rtype])
    got = resource_ids(matches)
    if answer.body.get("total") != len(want) or set(got) != want:
        raise ScenarioFailed(f"expected all {len(want)} {rtype} of the test patient, got "
                             f"total={answer.body.get('total')} and {len(set(got) & want)} of ours")
    if any(not e["fullUrl"].startswith(ctx.base_url) for e in matches):
        raise ScenarioFailed("an entry's fullUrl is not on the FHIR server's base")
    scores = [e["search"]["score"] for e in matches]
    if any(not 0 <= s <= 1 for s in scores) or scores != sorted(scores, reverse=True):
        raise ScenarioFailed("search.score is not in [0, 1] in descending order")
    top = matches[0]["resource"]
    codes = [c.get("code") for c in (top.get("code") or {}).get("coding") or []]
    if (best_code not in codes) if best_code else (top.get("id") != patient.marker_id(BASE64_MARKER)):
        raise ScenarioFailed(f"the best match for {query!r} is not the expected {rtype}")
    return f"{len(want)} {rtype} ranked; best match for {query!r} as expected"


def search_observation(ctx: InteropContext) -> str:
    return _type_search(ctx, "Observation")


def search_condition(ctx: InteropContext) -> str:
    return _type_search(ctx, "Condition")


def search_documentreference(ctx: InteropContext) -> str:
    return _type_search(ctx, "DocumentReference")


def _paging_style(link: str | None) -> str:
    if not link:
        return "no next link"
    if "_getpages" in link:
        return "HAPI _getpages next links"
    if "_offset" in link:
        return "_offset next links"
    return "opaque next links"


def paging_next_links(ctx: InteropContext) -> str:
    """The adapter asks for small pages and must follow the server's own next links."""
    patient = ctx.need_patient()
    want = patient.count("Observation")
    response = ctx.call.get("Observation", params={"patient": patient.patient_id,
                                                   "_count": str(SMALL_PAGE)})
    if response.status_code != 200:
        raise ScenarioFailed(f"Observation?patient=&_count={SMALL_PAGE} answered "
                             f"{response.status_code}: {diagnostics(response)}")
    bundle = response.json()
    first = len(bundle.get("entry") or [])
    nxt = next((lk.get("url") for lk in bundle.get("link") or [] if lk.get("relation") == "next"), None)
    style = _paging_style(nxt)
    ctx.profile.paging = f"{style}; first page {first} entries for _count={SMALL_PAGE}"
    if first > SMALL_PAGE:
        ctx.finding("count-ignored", f"asked _count={SMALL_PAGE}, the server sent {first} "
                    "entries: it pages by its own size (the adapter follows next links anyway)")
    answer = ctx.adapter_get("/fhir/Observation", [("patient", patient.patient_id),
                                                   ("_content", "blood"), ("_count", "200")],
                             fhir_page_size=SMALL_PAGE)
    if answer.status != 200:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()}); "
                             f"server paging: {style}")
    got = answer.body.get("total")
    if got != want:
        why = (f"; the server's first page has {first} of {want} and no next link"
               if nxt is None and first < want else "")
        raise ScenarioFailed(f"the adapter saw {got} of {want} Observations{why}")
    return f"{want} Observations over {-(-want // max(first, 1))} pages ({style})"


def page_size_above_max(ctx: InteropContext) -> str:
    """The adapter asks for more per page than the server serves: it still gets everything."""
    patient = ctx.need_patient()
    want = patient.count("Observation")
    response = ctx.call.get("Observation", params={"patient": patient.patient_id,
                                                   "_count": str(BIG_PAGE)})
    if response.status_code in (400, 422):
        ctx.finding("count-above-max-refused", f"_count={BIG_PAGE} is refused "
                    f"({response.status_code}: {diagnostics(response)}); keep fhir_page_size "
                    "at or below the server's maximum")
        raise ScenarioSkipped(f"the server refuses _count={BIG_PAGE}; set fhir_page_size "
                              "to its maximum page size")
    served = len(response.json().get("entry") or []) if response.status_code == 200 else 0
    answer = ctx.adapter_get("/fhir/Observation", [("patient", patient.patient_id),
                                                   ("_content", "weight"), ("_count", "200")],
                             fhir_page_size=BIG_PAGE)
    if answer.status != 200 or answer.body.get("total") != want:
        raise ScenarioFailed(f"with fhir_page_size={BIG_PAGE} the adapter answered "
                             f"{answer.status}, total {answer.body.get('total')} of {want}")
    capped = f"the server capped the page at {served}" if served < want else \
        f"the server sent all {served} in one page"
    return f"_count={BIG_PAGE}: {capped}; the adapter got all {want}"


def _filters(ctx: InteropContext, rtype: str) -> str:
    patient = ctx.need_patient()
    checked, refused, wrong = [], [], []
    for param, value, keep in FILTER_CASES[rtype]:
        want = {patient.ids[rtype][i] for i in patient.record.expected(rtype, keep)}
        answer = ctx.adapter_get(f"/fhir/{rtype}", [("patient", patient.patient_id),
                                                    ("_content", "note"), ("_count", "200"),
                                                    (param, value)])
        if answer.status == 400 and "FHIR server refused" in answer.issue():
            refused.append(param)
            ctx.finding("filter-refused", f"{rtype}?{param}= is refused by the server (400); "
                        "the adapter answers 400 naming it, so callers should not send it")
            continue
        got = set(resource_ids(answer.matches())) if answer.status == 200 else set()
        if answer.status != 200:
            wrong.append(f"{param}: {answer.status} ({answer.issue()})")
        elif got != want:
            wrong.append(f"{param}={value}: {len(got)} resources, expected {len(want)}")
        else:
            checked.append(f"{param} {len(want)}/{patient.count(rtype)}")
    if wrong:
        raise ScenarioFailed("; ".join(wrong))
    if not checked:
        raise ScenarioSkipped(f"the server refuses every filter tried ({', '.join(refused)})")
    note = ", ".join(checked)
    return note + (f"; refused by the server: {', '.join(refused)}" if refused else "")


def filters_observation(ctx: InteropContext) -> str:
    return _filters(ctx, "Observation")


def filters_condition(ctx: InteropContext) -> str:
    return _filters(ctx, "Condition")


def filters_documentreference(ctx: InteropContext) -> str:
    return _filters(ctx, "DocumentReference")


def content_delegation(ctx: InteropContext) -> str:
    """Does the server do `_content` full text itself? Noted; the adapter ranks either way."""
    patient = ctx.need_patient()
    response = ctx.call.get("Condition", params={"patient": patient.patient_id,
                                                 "_content": "asthma", "_count": "200"})
    if response.status_code in (400, 403, 422, 501):
        ctx.profile.fulltext = f"_content refused ({response.status_code})"
        ctx.finding("no-fulltext", f"_content is refused ({response.status_code}: "
                    f"{diagnostics(response)}); the adapter never sends it upstream")
        raise ScenarioSkipped("the server has no full-text search (_content refused); "
                              "nothing to delegate")
    if response.status_code != 200:
        raise ScenarioFailed(f"Condition?_content= answered {response.status_code}: "
                             f"{diagnostics(response)}")
    found = len(response.json().get("entry") or [])
    if found >= patient.count("Condition"):
        ctx.profile.fulltext = "_content ignored (every Condition returned)"
        ctx.finding("content-ignored", "the server accepts _content but ignores it (all "
                    f"{found} Conditions returned); the adapter ranks by meaning itself")
        raise ScenarioSkipped("the server ignores _content; nothing to delegate")
    ctx.profile.fulltext = f"_content supported ({found} of {patient.count('Condition')} matched)"
    return (f"the server's _content full text matched {found} of {patient.count('Condition')} "
            "Conditions; the adapter keeps ranking itself and does not delegate `_content`")


def unknown_patient_404(ctx: InteropContext) -> str:
    missing = f"interop-missing-{uuid.uuid4().hex[:10]}"
    answer = ctx.adapter_get("/fhir/Condition", [("patient", missing), ("_content", "asthma")])
    code = (answer.body.get("issue") or [{}])[0].get("code")
    if answer.status != 404 or code != "not-found":
        raise ScenarioFailed(f"expected 404 not-found, got {answer.status} ({answer.issue()})")
    return "404 not-found OperationOutcome naming `patient`"


def cleanup(ctx: InteropContext, keep: bool) -> str:
    """Delete the test patient (unless --keep) and check it is gone."""
    if ctx.patient is None:
        raise ScenarioSkipped("nothing was loaded")
    if keep:
        raise ScenarioSkipped(f"--keep: left Patient/{ctx.patient.patient_id} and "
                              f"{ctx.patient.total + 1} other resources on the server")
    problems = delete_test_patient(ctx.call, ctx.patient)
    if problems:
        raise ScenarioFailed("cleanup incomplete: " + "; ".join(problems[:3]) +
                             (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    return f"deleted {ctx.patient.total + 2} resources; the test Patient reads 404/410"

