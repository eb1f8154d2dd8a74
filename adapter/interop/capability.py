"""What a FHIR server declares in its CapabilityStatement that matters to this adapter."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adapter.models import RESOURCE_TYPES

#: Search parameters the kit's filter scenarios use, per type.
FILTER_PARAMS: dict[str, tuple[str, ...]] = {
    "Observation": ("date", "code", "category", "status"),
    "Condition": ("onset-date", "code", "category", "clinical-status"),
    "DocumentReference": ("date", "type", "category", "status"),
}
_SMART_OAUTH = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


@dataclass
class ServerProfile:
    """The declared capabilities, plus what the scenarios observed (paging, full text, auth)."""

    fhir_version: str = "unknown"
    software: str = "unknown"
    types: dict[str, list[str]] = field(default_factory=dict)  # type -> search param names
    missing_types: list[str] = field(default_factory=list)
    fulltext_declared: list[str] = field(default_factory=list)  # "_content" / "_text" by type
    declared_auth: str = "none declared"
    paging: str = "not observed"
    fulltext: str = "not observed"
    auth: str = "not observed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self, base_url: str) -> list[str]:
        """The lines printed above the table."""
        lines = [f"FHIR server  {base_url}  (FHIR {self.fhir_version}; {self.software})"]
        for rtype in RESOURCE_TYPES:
            if rtype not in self.types:
                lines.append(f"  {rtype:<18} not declared")
                continue
            params = self.types[rtype]
            wanted = FILTER_PARAMS[rtype] + ("patient",)
            have = ", ".join(p if p in params else f"{p} (missing)" for p in wanted)
            lines.append(f"  {rtype:<18} {len(params)} search params; {have}")
        declared = ", ".join(self.fulltext_declared) or "not declared"
        lines.append(f"Full text    declared: {declared}; observed: {self.fulltext}")
        lines.append(f"Paging       {self.paging}")
        lines.append(f"Auth         declared: {self.declared_auth}; observed: {self.auth}")
        return lines


def read_profile(statement: dict[str, Any]) -> ServerProfile:
    """A `ServerProfile` from a CapabilityStatement (lenient: odd shapes give 'unknown')."""
    profile = ServerProfile()
    profile.fhir_version = str(statement.get("fhirVersion") or "unknown")
    software = statement.get("software")
    if isinstance(software, dict):
        profile.software = " ".join(str(software[k]) for k in ("name", "version") if software.get(k))
    rests = [r for r in statement.get("rest") or [] if isinstance(r, dict)]
    rest = next((r for r in rests if r.get("mode") == "server"), rests[0] if rests else {})
    for resource in rest.get("resource") or []:
        if not isinstance(resource, dict) or resource.get("type") not in RESOURCE_TYPES:
            continue
        names = sorted({str(p.get("name")) for p in resource.get("searchParam") or []
                        if isinstance(p, dict) and p.get("name")})
        profile.types[resource["type"]] = names
        profile.fulltext_declared += [f"{resource['type']}.{n}" for n in names
                                      if n in ("_content", "_text")]
    profile.missing_types = [t for t in RESOURCE_TYPES if t not in profile.types]
    profile.declared_auth = _declared_auth(rest.get("security"))
    return profile


def _declared_auth(security: Any) -> str:
    """The security services and SMART endpoints a server declares, in a few words."""
    if not isinstance(security, dict):
        return "none declared"
    parts = []
    for concept in security.get("service") or []:
        for coding in (concept or {}).get("coding") or []:
            if isinstance(coding, dict) and coding.get("code"):
                parts.append(str(coding["code"]))
        if isinstance(concept, dict) and concept.get("text") and not parts:
            parts.append(str(concept["text"]))
    for ext in security.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == _SMART_OAUTH:
            parts.append("SMART oauth-uris")
    if security.get("cors"):
        parts.append("CORS")
    return ", ".join(parts) or "none declared"
