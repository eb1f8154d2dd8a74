"""The kit's report: a table for people, JUnit XML for CI systems, JSON for everything else."""
from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.interop.capability import ServerProfile
from adapter.interop.context import FAIL, PASS, SKIP, Finding, ScenarioResult

SUITE = "fhir-rerank interop"
REASON_WIDTH = 78


@dataclass
class InteropReport:
    base_url: str
    profile: ServerProfile
    results: list[ScenarioResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    patient_id: str | None = None
    kept: bool = False

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results)
                for status in (PASS, FAIL, SKIP)}

    @property
    def ok(self) -> bool:
        return not any(r.status == FAIL for r in self.results)

    def by_name(self) -> dict[str, ScenarioResult]:
        return {r.name: r for r in self.results}

    def to_json(self) -> dict[str, Any]:
        return {"suite": SUITE, "fhir_base_url": self.base_url, "ok": self.ok,
                "counts": self.counts(), "server": self.profile.to_json(),
                "test_patient": {"id": self.patient_id, "kept": self.kept},
                "scenarios": [r.to_json() for r in self.results],
                "findings": [f.__dict__ for f in self.findings]}


def progress_line(index: int, total: int, result: ScenarioResult) -> str:
    """One stderr line per scenario as it finishes."""
    return f"[{index:>2}/{total}] {result.name:<26} {result.status:<7} ({result.seconds:.2f} s)"


def render_table(report: InteropReport) -> str:
    """The profile, the scenario table, the findings and a one-line summary."""
    lines = report.profile.summary_lines(report.base_url) + [""]
    name_w = max(len("Scenario"), *(len(r.name) for r in report.results))
    lines.append(f"{'Scenario':<{name_w}}  {'Result':<7}  {'Time':>6}  Reason")
    lines.append(f"{'-' * name_w}  {'-' * 7}  {'-' * 6}  {'-' * 40}")
    indent = " " * (name_w + 19)
    for r in report.results:
        wrapped = textwrap.wrap(r.reason, REASON_WIDTH) or [""]
        lines.append(f"{r.name:<{name_w}}  {r.status:<7}  {r.seconds:>5.2f}s  {wrapped[0]}")
        lines += [indent + more for more in wrapped[1:]]
    if report.findings:
        lines += ["", "Findings (the server differs from HAPI; the adapter handles it):"]
        for f in report.findings:
            wrapped = textwrap.wrap(f"{f.code} [{f.scenario}]: {f.text}", REASON_WIDTH + 20)
            lines += ["  " + wrapped[0]] + ["    " + w for w in wrapped[1:]]
    c = report.counts()
    verdict = "OK" if report.ok else "FAILED"
    lines += ["", f"{verdict}: {len(report.results)} scenarios, {c[PASS]} passed, "
              f"{c[FAIL]} failed, {c[SKIP]} skipped"]
    return "\n".join(lines) + "\n"


def junit_xml(report: InteropReport) -> str:
    """One <testsuite>; failures and skips carry the reason as their message."""
    c = report.counts()
    total_time = sum(r.seconds for r in report.results)
    suites = ET.Element("testsuites", name=SUITE, tests=str(len(report.results)),
                        failures=str(c[FAIL]), errors="0", skipped=str(c[SKIP]),
                        time=f"{total_time:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=SUITE, tests=str(len(report.results)),
                          failures=str(c[FAIL]), errors="0", skipped=str(c[SKIP]),
                          time=f"{total_time:.3f}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="fhir_base_url", value=report.base_url)
    ET.SubElement(props, "property", name="fhir_version", value=report.profile.fhir_version)
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname="interop", name=r.name,
                             time=f"{r.seconds:.3f}")
        if r.status == FAIL:
            ET.SubElement(case, "failure", message=r.reason, type="InteropFailure").text = r.reason
        elif r.status == SKIP:
            ET.SubElement(case, "skipped", message=r.reason)
        else:
            ET.SubElement(case, "system-out").text = r.reason
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_outputs(report: InteropReport, junit: str | None, json_path: str | None) -> None:
    if junit:
        Path(junit).write_text(junit_xml(report), encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
