"""Standard FHIR R4 search parameters the adapter passes to the FHIR server as filters."""
from __future__ import annotations

#: Standard R4 search parameters passed to the FHIR server as filters, per resource type.
COMMON_FILTERS = ("_id", "_lastUpdated", "_tag", "_profile", "_security", "identifier",
                  "encounter")
TYPE_FILTERS: dict[str, tuple[str, ...]] = {
    "DocumentReference": ("date", "period", "category", "type", "status", "author",
                          "custodian", "contenttype", "format", "language", "event",
                          "facility", "setting", "relatesto", "security-label"),
    "Observation": ("date", "category", "code", "status", "value-quantity", "value-concept",
                    "value-string", "value-date", "component-code", "combo-code",
                    "data-absent-reason", "method", "performer", "device", "focus",
                    "based-on", "derived-from", "has-member", "part-of", "specimen"),
    "Condition": ("clinical-status", "verification-status", "category", "code", "severity",
                  "onset-date", "abatement-date", "recorded-date", "body-site", "evidence",
                  "stage", "asserter"),
}


def filters_for(resource_type: str) -> tuple[str, ...]:
    return COMMON_FILTERS + TYPE_FILTERS[resource_type]
