"""JSON log lines: one object per record, so a log pipeline can filter by request id or code."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import onnxruntime as ort

LEVELS = ("debug", "info", "warning", "error")
ORT_WARNING, ORT_FATAL = 2, 4  # onnxruntime's logger severities
# Attributes the access log attaches to its records (server.interceptors).
FIELDS = ("method", "code", "ms", "request_id", "client")
# The call being served (server.interceptors sets it). "-" outside any call.
request_id: ContextVar[str] = ContextVar("request_id", default="-")
_make_record = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every record made on behalf of a call carries its id: a warning or a traceback as well as
    the access line, whichever logger and handler (the logging cookbook's way to add context)."""
    record = _make_record(*args, **kwargs)
    if (rid := request_id.get()) != "-":
        record.request_id = rid
    return record


logging.setLogRecordFactory(_record_with_request_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            if name in record.__dict__:
                line[name] = record.__dict__[name]
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str) -> None:
    """Log JSON lines to stderr at level (one of LEVELS)."""
    root = logging.getLogger()
    # Like logging.basicConfig: logging set up already (an embedding program, a test harness
    # running main in-process) is left alone.
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # ONNX Runtime writes coloured plain-text lines of its own to stderr, at every model load on
    # a host without CUDA's libraries among others; discountd logs what matters itself (the
    # provider really active), and ONNX Runtime's own lines show at debug only.
    ort.set_default_logger_severity(ORT_WARNING if level == "debug" else ORT_FATAL)
    # Alembic's context logs two lines at every schema check ("Will assume non-transactional
    # DDL." on SQLite, though discountd runs no DDL): debug only, too.
    if level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
