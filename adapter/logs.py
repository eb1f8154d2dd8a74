"""Log lines as text (the default) or as one JSON object a line (`log_format = json`).

A JSON line has `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message` and
`process`; an access line (logger `adapter.access`) adds `request_id`, `method`, `route` (the
URL rule, e.g. `/fhir/<resource_type>`), `path` (ids masked, no query string), `status` and
`duration_ms`. An exception adds `exc_type` and `exc` (its traceback, as the text format
prints it). Nothing else of a request is logged in either format: see adapter/logsafe.py.

`configure_logging(level, log_format)` sets the root logger up for a CLI command; the
production server (gunicorn's loggers, `JsonGunicornLogger`) and Celery workers
(`celery_log_format`) use the same formatter.

Every record of the process, whichever logger made it (ours, urllib3's, gunicorn's, celery's),
is redacted when it is made (`install_redaction`, a log-record factory, so no handler added
later can miss it): the message is formatted once and passed through
`adapter.logsafe.redact_text`, and so are its traceback and stack. `--log-level DEBUG` is
refused unless `log_phi_at_debug = true` (`check_log_level`): debug lines name patient ids,
job ids and file names that no pattern can tell from other words.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from adapter.logsafe import redact_text

__all__ = ["JsonFormatter", "TEXT_FORMAT", "LOG_FORMATS", "check_log_level", "configure_logging",
           "formatter_for", "install_redaction", "use_format"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
#: attributes of an access record copied into its JSON line (set by adapter.api.observe)
REQUEST_FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms")


class JsonFormatter(logging.Formatter):
    """One JSON object a line; see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if "request_id" not in line:  # any line logged while serving a request names it
            request_id = _current_request_id()
            if request_id:
                line["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["exc"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def _current_request_id() -> str | None:
    try:
        from flask import g, has_request_context
    except ImportError:  # pragma: no cover - flask is a dependency
        return None
    return g.get("request_id") if has_request_context() else None


def formatter_for(log_format: str, text_format: str = TEXT_FORMAT,
                  datefmt: str | None = None) -> logging.Formatter:
    """The formatter for `log_format` ("text" or "json")."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(text_format, datefmt)


def use_format(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of `logger` the formatter for `log_format` (json only: text keeps
    each handler's own)."""
    if log_format != "json":
        return
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


def _redact_record(record: logging.LogRecord) -> None:
    """Format the record's message now, redacted (`adapter.logsafe.redact_text`), and its
    traceback and stack too; a message whose arguments do not format is withheld (logging
    would otherwise print them in its "Logging error" report)."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a library's bad format string
        message = f"(a {record.name} line whose arguments did not format; withheld)"
    record.msg, record.args = redact_text(message), ()
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)


def install_redaction() -> None:
    """Redact every log record this process makes from now on, whichever logger makes it
    (a log-record factory, installed once; forked children inherit it)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "fhir_rerank_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    factory.fhir_rerank_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _level_number(level: str | int) -> int | None:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).strip().upper())
    if isinstance(number, int):
        return number
    return int(level) if str(level).strip().isdigit() else None


def check_log_level(level: str | int, log_phi_at_debug: bool) -> None:
    """Refuse a level below INFO (DEBUG) unless `log_phi_at_debug` says such logs may hold
    patient data."""
    number = _level_number(level)
    if number is not None and number < logging.INFO and not log_phi_at_debug:
        raise ValueError(
            f"--log-level {level} would write patient data to the log (patient ids, job ids, "
            "file names, upstream URLs: debug lines are not redacted for them); use "
            "--log-level INFO, or set log_phi_at_debug = true "
            "(FHIR_RERANK_LOG_PHI_AT_DEBUG=true) where such logs are allowed")


def configure_logging(level: str | int = "INFO", log_format: str = "text") -> None:
    """Root logger to stderr at `level` in `log_format`, every record redacted
    (`install_redaction`); Python warnings become log lines in JSON mode, so every line of
    the output is one JSON object."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    install_redaction()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    root.setLevel(level if isinstance(level, int) else level.upper())
    for handler in root.handlers:
        handler.setFormatter(formatter_for(log_format))
    logging.captureWarnings(log_format == "json")
