"""FHIR R4 DocumentReference / Observation / Condition → one readable text per resource.

Design: the text is always built by walking the raw JSON dict, so the same code serves valid
resources and odd upstream data (unknown fields, R5-isms, wrong types, missing `code`). The
`fhir.resources.R4B` models validate each resource; a resource they reject is still flattened,
and `flatten_documents` reports it as flattened "leniently". Nothing here raises on odd data.

Text layout (a reranker reads the start first; long attachment text goes last):

    Observation: Blood pressure systolic & diastolic
    Code: Blood pressure systolic & diastolic; Blood pressure panel … (LOINC 85354-9)
    Status: final
    Component: Systolic blood pressure (LOINC 8480-6) = 107 mmHg (mm[Hg]); interpretation: Normal
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Callable

from adapter.fhir.attachments import attachment_to_text, html_to_text
from adapter.fhir.datatypes import (AttachmentLoader, annotation_text, as_list, choice_text,
                                    concept_short, concept_text, generic_text, period_text,
                                    range_text, reference_text, scalar_text)
from adapter.lru import LRU
from adapter.models import RESOURCE_TYPES, Document, Outcome

if TYPE_CHECKING:
    from adapter.caches import Caches

log = logging.getLogger(__name__)

# Top-level keys never rendered: identity, plumbing, the patient (the same for every document).
_IGNORED = {"resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
            "extension", "modifierExtension", "identifier", "masterIdentifier", "subject",
            "patient", "basedOn", "partOf", "instantiatesCanonical", "instantiatesUri",
            "securityLabel", "hash"}


class _Lines:
    """Collects "Label: value" lines, dropping empty values."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tail: list[str] = []  # long attachment text: after every labelled line
        self.used: set[str] = set()

    def add(self, label: str, value: str, *keys: str) -> None:
        self.used.update(keys)
        if value:
            self.lines.append(f"{label}: {value}")


def _reference_range_text(ranges: Any) -> str:
    out = []
    for rr in ranges if isinstance(ranges, list) else [ranges]:
        if not isinstance(rr, dict):
            out.append(scalar_text(rr))
            continue
        parts = [range_text(rr), concept_text(rr.get("type"), with_code=False),
                 concept_text(rr.get("appliesTo"), with_code=False),
                 f"age {range_text(rr.get('age'))}" if rr.get("age") else "", scalar_text(rr.get("text"))]
        out.append(", ".join(p for p in parts if p))
    return "; ".join(p for p in out if p)


def _observation_lines(res: dict[str, Any], out: _Lines, loader: AttachmentLoader | None) -> None:
    out.add("Value", choice_text(res, "value", loader))
    out.add("Data absent", concept_text(res.get("dataAbsentReason"), with_code=False), "dataAbsentReason")
    out.add("Interpretation", concept_text(res.get("interpretation"), with_code=False), "interpretation")
    out.add("Reference range", _reference_range_text(res.get("referenceRange")), "referenceRange")
    for comp in as_list(res.get("component")):
        if not isinstance(comp, dict):
            continue
        name = concept_text(comp.get("code")) or "component"
        value = choice_text(comp, "value", loader) or concept_text(comp.get("dataAbsentReason"), False)
        extras = [f"interpretation: {concept_text(comp.get('interpretation'), with_code=False)}"
                  if comp.get("interpretation") else "",
                  f"reference range: {_reference_range_text(comp.get('referenceRange'))}"
                  if comp.get("referenceRange") else ""]
        out.add("Component", "; ".join(p for p in [f"{name} = {value}" if value else name, *extras] if p))
    out.used.add("component")
    out.add("Effective", choice_text(res, "effective"))
    out.add("Issued", scalar_text(res.get("issued")), "issued")
    for key, label in (("specimen", "Specimen"), ("device", "Device"), ("performer", "Performer"),
                       ("hasMember", "Has member"), ("derivedFrom", "Derived from"), ("focus", "Focus")):
        out.add(label, reference_text(res.get(key)), key)


def _condition_lines(res: dict[str, Any], out: _Lines, loader: AttachmentLoader | None) -> None:
    out.add("Clinical status", concept_text(res.get("clinicalStatus"), with_code=False), "clinicalStatus")
    out.add("Verification status", concept_text(res.get("verificationStatus"), with_code=False),
            "verificationStatus")
    out.add("Severity", concept_text(res.get("severity")), "severity")
    out.add("Onset", choice_text(res, "onset"))
    out.add("Abatement", choice_text(res, "abatement"))
    out.add("Recorded", scalar_text(res.get("recordedDate")), "recordedDate")
    for stage in as_list(res.get("stage")):
        if isinstance(stage, dict):
            parts = [concept_text(stage.get("summary")), concept_text(stage.get("type"), False),
                     reference_text(stage.get("assessment"))]
            out.add("Stage", "; ".join(p for p in parts if p))
    out.used.add("stage")
    for evidence in as_list(res.get("evidence")):
        if isinstance(evidence, dict):
            parts = [concept_text(evidence.get("code")), reference_text(evidence.get("detail")),
                     concept_text(evidence.get("concept")),  # R5: evidence is a CodeableReference
                     reference_text(evidence.get("reference"))]
            out.add("Evidence", "; ".join(p for p in parts if p))
    out.used.add("evidence")
    for key, label in (("recorder", "Recorder"), ("asserter", "Asserter"), ("encounter", "Encounter")):
        out.add(label, reference_text(res.get(key)), key)


def _document_lines(res: dict[str, Any], out: _Lines, loader: AttachmentLoader | None) -> None:
    out.add("Document status", scalar_text(res.get("docStatus")), "docStatus")
    out.add("Date", scalar_text(res.get("date")), "date")
    out.add("Description", scalar_text(res.get("description")), "description")
    out.add("Author", reference_text(res.get("author")), "author")
    out.add("Authenticator", reference_text(res.get("authenticator")), "authenticator")
    out.add("Custodian", reference_text(res.get("custodian")), "custodian")
    for rel in as_list(res.get("relatesTo")):
        if isinstance(rel, dict):
            out.add("Relates to", " ".join(p for p in (scalar_text(rel.get("code")),
                                                        reference_text(rel.get("target"))) if p))
    out.used.add("relatesTo")
    # R4 keeps these under `context`; R5 moved them to the top level.
    context = res.get("context") if isinstance(res.get("context"), dict) else {}
    for key, label in (("event", "Event"), ("facilityType", "Facility type"),
                       ("practiceSetting", "Practice setting")):
        out.add(label, concept_text(context.get(key) or res.get(key)), key)
    out.add("Period", period_text(context.get("period") or res.get("period")), "period")
    out.add("Encounter", reference_text(context.get("encounter")), "context")
    texts = []
    for content in as_list(res.get("content")):
        if not isinstance(content, dict):
            continue
        attachment = content.get("attachment") if isinstance(content.get("attachment"), dict) else {}
        out.add("Attachment", scalar_text(attachment.get("title")))
        texts.append(attachment_to_text(attachment, loader))
    out.used.add("content")
    out.tail.extend(t for t in texts if t)


_BUILDERS = {"Observation": _observation_lines, "Condition": _condition_lines,
             "DocumentReference": _document_lines}


def _main_concept(res: dict[str, Any]) -> Any:
    if res.get("resourceType") == "DocumentReference":
        return res.get("type") or res.get("description") or res.get("category")
    return res.get("code")


def _label(key: str) -> str:
    """camelCase field name → "Camel case" label for fields we have no renderer for."""
    words = "".join(" " + c.lower() if c.isupper() else c for c in key).strip()
    return words[:1].upper() + words[1:]


def _flatten(res: dict[str, Any], loader: AttachmentLoader | None) -> str:
    rtype = scalar_text(res.get("resourceType")) or "Resource"
    main = concept_short(_main_concept(res))
    out = _Lines()
    out.add("Code" if rtype != "DocumentReference" else "Type", concept_text(_main_concept(res)),
            "code", "type")
    out.add("Status", scalar_text(res.get("status")), "status")
    out.add("Category", concept_text(res.get("category"), with_code=False), "category")
    out.add("Body site", concept_text(res.get("bodySite")), "bodySite")
    out.add("Method", concept_text(res.get("method")), "method")
    builder = _BUILDERS.get(rtype)
    if builder:
        builder(res, out, loader)
    out.add("Note", annotation_text(res.get("note")), "note")
    handled = out.used | _IGNORED
    for key, value in res.items():
        if key in handled or key.startswith(("value", "effective", "onset", "abatement", "_")):
            continue
        out.add(_label(key), generic_text(value))  # unknown / R5-only / unhandled fields
    body = [line for line in out.lines + out.tail if not line.startswith("Status: ")]
    if not body:  # nothing but the status: the narrative is all we have
        narrative = res.get("text") if isinstance(res.get("text"), dict) else {}
        div = narrative.get("div") if isinstance(narrative.get("div"), str) else ""
        out.add("Narrative", html_to_text(div).replace("\n", "; ") if div else "")
    return "\n".join([f"{rtype}: {main}" if main else rtype, *out.lines, *out.tail])


def validation_problems(resource: dict[str, Any]) -> list[str]:
    """Where the FHIR R4B model rejects `resource` (dotted field paths, no values); [] if valid."""
    from fhir.resources.R4B import get_fhir_model_class  # heavy import, done on first use

    try:
        model = get_fhir_model_class(str(resource.get("resourceType")))
    except (KeyError, ValueError, AttributeError):
        return ["resourceType"]
    try:
        model.model_validate(resource)
    except Exception as exc:  # noqa: BLE001 - pydantic ValidationError and model-level errors
        errors = getattr(exc, "errors", None)
        if callable(errors):
            try:
                return [".".join(str(p) for p in e.get("loc", ())) or "(resource)" for e in errors()]
            except Exception:  # noqa: BLE001
                pass
        return [type(exc).__name__]
    return []


def _safe_flatten(resource: Any, loader: AttachmentLoader | None) -> str:
    if not isinstance(resource, dict):
        log.warning("flatten: a %s was given where a resource was expected", type(resource).__name__)
        return ""
    try:
        return _flatten(resource, loader)
    except Exception as exc:  # noqa: BLE001 - never fail a search on one odd resource
        log.warning("flatten of a %s failed (%s); using a generic walk",
                    str(resource.get("resourceType"))[:40], type(exc).__name__)
        try:
            return f"{scalar_text(resource.get('resourceType'))}\n{generic_text(resource)}".strip()
        except Exception:  # noqa: BLE001
            return scalar_text(resource.get("resourceType"))


def flatten_resource(resource: dict, attachment_loader: Callable[[str], tuple[str, bytes] | None]
                     | None = None) -> str:
    """One resource → one readable text (first line: type and main code). Never raises."""
    return _safe_flatten(resource, attachment_loader)


# Caching (a runtime's `Caches.flattened` / `Caches.problems`, passed in by the pipeline):
# flattened text, and R4B problems, per resource *version*: a FHIR server gives a changed
# resource a new meta.versionId / meta.lastUpdated, so (url, version) names one content.
# Resources without either are keyed by a digest of their content. Size: doc_cache_size.
# Text that needed an attachment fetched by URL depends on who fetched it (the caller's
# credentials may open a Binary another caller may not read, or fail where theirs would
# not): it is cached under (version, caller identity), never shared across callers, and
# not at all when an attachment could not be loaded (the next search tries again).


def version_key(resource: dict, full_url: str) -> tuple | None:
    """What identifies this resource version for the caches: its `meta.versionId` /
    `meta.lastUpdated` when the server gives them, else a digest of its content (files and
    servers without meta: the same content always flattens to the same text). None when the
    resource cannot be serialised (not a JSON document)."""
    meta = resource.get("meta")
    version = updated = None
    if isinstance(meta, dict):
        version, updated = meta.get("versionId"), meta.get("lastUpdated")
    if (version or updated) and isinstance(version, (str, type(None))) \
            and isinstance(updated, (str, type(None))):
        return (full_url, resource.get("resourceType"), resource.get("id"), version, updated)
    try:  # no usable meta (absent, or malformed such as a list): the content is the version
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
    except (TypeError, ValueError):
        return None
    digest = hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16)
    return (full_url, "content", digest.hexdigest())


def _cached(cache: LRU | None, key: tuple | None, compute: Callable[[], Any]) -> Any:
    if cache is None or not key:
        return compute()
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.put(key, value)
    return value


def attachment_urls(resource: Any) -> list[str]:
    """URLs of the attachments (without inline data) anywhere in a resource, in order."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if key.endswith(("attachment", "Attachment")) and isinstance(node.get("url"), str) \
                    and node["url"].strip() and not node.get("data"):
                found.append(node["url"])
            for child_key, child in node.items():
                walk(child, child_key)
        elif isinstance(node, list):
            for item in node:
                walk(item, key)

    walk(resource, "")
    return found


def cached_text(resource: dict, full_url: str, caller: str, cache: LRU[str] | None
                ) -> str | None:
    """The text of this resource version that `caller` may see, from `cache`, or None."""
    if cache is None or not isinstance(resource, dict):
        return None
    key = version_key(resource, full_url)
    if key is None:
        return None
    return cache.get(key) or cache.get(key + ("caller", caller))


def _flatten_cached(resource: dict, full_url: str, loader: AttachmentLoader | None,
                    caller: str, cache: LRU[str] | None) -> str:
    """The resource's text from the cache when this caller may see it, else flattened now.

    Text that fetched nothing is shared by every caller (the key is the version); text that
    asked the loader for a URL is kept under (version, caller) only."""
    key = version_key(resource, full_url) if cache is not None else None
    if key is None or cache is None:
        return _safe_flatten(resource, loader)
    if loader is None:
        key = key + ("no-loader",)
    shared = cache.get(key)
    if shared is not None:
        return shared
    own_key = key + ("caller", caller)
    own = cache.get(own_key)
    if own is not None:
        return own
    fetched: list[bool] = []

    def recording(url: str) -> tuple[str, bytes] | None:
        try:
            loaded = loader(url)  # type: ignore[misc]
        except Exception:
            fetched.append(False)
            raise
        fetched.append(loaded is not None)
        return loaded

    text = _safe_flatten(resource, recording if loader is not None else None)
    if all(fetched):  # an attachment that failed (deadline, 403, down) is tried again next time
        cache.put(own_key if fetched else key, text)
    return text


def validation_outcome(documents: list[Document], cache: LRU[list[str]] | None = None
                       ) -> Outcome | None:
    """One information Outcome listing the documents whose resource the R4B models reject
    (they were flattened leniently), or None. Costs ~4x a flatten, so the pipeline runs it
    on the reranked candidates only (problems cached per version in `cache` when given).
    Names type and id only, never content."""
    lenient: list[str] = []
    for doc in documents:
        key = version_key(doc.resource, doc.full_url) if cache is not None else None
        problems = _cached(cache, key,
                           lambda doc=doc: validation_problems(doc.resource))
        if problems:
            lenient.append(doc.id)
            log.debug("%s is not valid FHIR R4B at %s; flattened leniently", doc.id,
                      ", ".join(sorted(set(problems))[:10]))
    if not lenient:
        return None
    shown = ", ".join(lenient[:10]) + (f" and {len(lenient) - 10} more" if len(lenient) > 10 else "")
    return Outcome("information", "informational",
                   f"{len(lenient)} resource(s) did not validate as FHIR R4 and were read "
                   f"leniently: {shown}")


def flatten_documents(resources: list[dict], full_urls: list[str] | None = None,
                      attachment_loader: Callable[[str], tuple[str, bytes] | None] | None = None,
                      *, validate: bool = True, caller: str = "anonymous",
                      caches: "Caches | None" = None
                      ) -> tuple[list[Document], list[Outcome]]:
    """Resources → Documents for the ranked types, plus warnings for what was skipped.

    Other resource types, resources without an id and repeated ids are skipped with a warning
    Outcome. With `validate`, resources the R4B models reject are listed in one information
    Outcome (see `validation_outcome`). Diagnostics name type and id only, never content.
    `caller` (adapter.identity.caller_identity) scopes text built from fetched attachments.
    `caches` (a runtime's `Caches`) keeps text and problems per resource version; without it
    nothing is cached.
    """
    documents: list[Document] = []
    outcomes: list[Outcome] = []
    seen: set[str] = set()
    for index, resource in enumerate(resources):
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        rid = scalar_text(resource.get("id")) if isinstance(resource, dict) else ""
        if rtype not in RESOURCE_TYPES:
            kind = rtype[:64] if isinstance(rtype, str) and rtype else "an entry without a resourceType"
            name = f"{kind}/{rid[:64]}" if isinstance(rtype, str) and rtype and rid else kind
            outcomes.append(Outcome("warning", "not-supported",
                                    f"Skipped {name}: only {', '.join(RESOURCE_TYPES)} are ranked"))
            continue
        if not rid:
            article = "an" if rtype[0] in "AEIOU" else "a"
            outcomes.append(Outcome("warning", "incomplete", f"Skipped {article} {rtype} without an id"))
            continue
        doc_id = f"{rtype}/{rid}"
        if doc_id in seen:
            outcomes.append(Outcome("warning", "duplicate", f"Skipped a repeated {doc_id}"))
            continue
        seen.add(doc_id)
        full_url = full_urls[index] if full_urls and index < len(full_urls) else ""
        text = _flatten_cached(resource, full_url, attachment_loader, caller,
                               caches.flattened if caches is not None else None)
        documents.append(Document(doc_id, rtype, text, resource, full_url or ""))
    if validate:
        lenient = validation_outcome(documents,
                                     caches.problems if caches is not None else None)
        if lenient:
            outcomes.append(lenient)
    return documents, outcomes
