"""`fhir-rerank interop`: checks a live FHIR server end to end with this adapter.

Why: an integration engineer pointing the adapter at their sandbox (HAPI in most cases) needs
one command that says, scenario by scenario, whether the two work together and why not.

    capability.py  reads the CapabilityStatement into a `ServerProfile`
    testdata.py    builds the synthetic test patient (a transaction Bundle, in code)
    loader.py      loads it, maps its ids, deletes it again
    context.py     what the scenarios share: the server, the token, in-process adapters
    scenarios*.py  the scenarios, each answering pass / fail / skipped with a reason
    report.py      the table, JUnit XML and JSON
    runner.py      runs them in order and decides the exit code

Every scenario runs the adapter in-process (`create_app` + Flask's test client) against the
server; nothing needs model weights (reranker `none`), and the model scenarios use a tiny
random Qwen3 checkpoint when one can be built.
"""
from __future__ import annotations

from adapter.interop.runner import InteropOptions, run_interop, scenario_names

__all__ = ["InteropOptions", "run_interop", "scenario_names"]
