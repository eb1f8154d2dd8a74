"""Log lines as JSON (`log_format = json`): every line one object, access lines with the
request id the response carries, the route template, the status and the duration."""
from __future__ import annotations

import json
import logging

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.logs import JsonFormatter, configure_logging

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def test_access_lines_carry_the_request_id_the_response_names(caplog):
    client = create_app(load_settings({"reranker": "none", "log_format": "json"},
                                      env={})).test_client()
    with caplog.at_level(logging.INFO, logger="adapter.access"):
        ok = client.get(f"/fhir/Condition?patient={BIG}&_content=asthma")
        bad = client.get(f"/fhir/Condition?patient={BIG}&_content=asthma&_count=lots")
    assert ok.status_code == 200 and bad.status_code == 400
    ids = [ok.headers["X-Request-ID"], bad.headers["X-Request-ID"]]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.name == "adapter.access"]
    assert [line["request_id"] for line in lines] == ids
    assert [line["status"] for line in lines] == [200, 400]
    assert {line["route"] for line in lines} == {"/fhir/<resource_type>"}
    assert all(line["path"] == "/fhir/Condition" and line["method"] == "GET"
               and line["duration_ms"] >= 0 and line["level"] == "INFO" for line in lines)
    assert not any(BIG in json.dumps(line) or "asthma" in json.dumps(line) for line in lines)


def test_a_callers_request_id_is_not_echoed_or_logged(caplog):
    client = create_app(load_settings({"reranker": "none"}, env={})).test_client()
    with caplog.at_level(logging.INFO, logger="adapter.access"):
        resp = client.get("/fhir/metadata", headers={"X-Request-ID": f"patient-{BIG}"})
    assert resp.headers["X-Request-ID"] != f"patient-{BIG}"
    assert not any(BIG in JsonFormatter().format(r) for r in caplog.records)


def test_json_lines_hold_exceptions_and_lines_logged_during_a_request():
    record = logging.LogRecord("adapter.x", logging.ERROR, __file__, 1, "failed: %s", ("io",),
                               None)
    try:
        raise OSError("disk")
    except OSError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed: io" and line["level"] == "ERROR"
    assert line["exc_type"] == "OSError" and "Traceback" in line["exc"]
    assert line["ts"].endswith("Z") and "request_id" not in line

    app = create_app(load_settings({"reranker": "none"}, env={}))
    with app.test_request_context("/fhir/metadata"):
        from flask import g

        g.request_id = "abc123"
        plain = logging.LogRecord("adapter.y", logging.WARNING, __file__, 1, "w", (), None)
        assert json.loads(JsonFormatter().format(plain))["request_id"] == "abc123"


def test_log_format_is_checked_and_configures_the_root_logger():
    with pytest.raises(ValueError, match="log_format"):
        load_settings({"log_format": "xml"}, env={})
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("INFO", "yaml")
    root = logging.getLogger()
    saved, level = [(h, h.formatter) for h in root.handlers], root.level
    try:
        configure_logging("INFO", "json")
        assert root.handlers and all(isinstance(h.formatter, JsonFormatter)
                                     for h in root.handlers)
        configure_logging("INFO", "text")
        assert not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        for handler, formatter in saved:
            handler.setFormatter(formatter)
        root.setLevel(level)
        logging.captureWarnings(False)
