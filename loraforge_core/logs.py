"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

# The id of the call a log line belongs to: from the caller's x-request-id metadata, else new;
# returned in the trailers, kept with a job, and passed to its training process
# (LORAFORGE_REQUEST_ID), so one id finds every line a call caused.
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_ENV = "LORAFORGE_REQUEST_ID"
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
_REQUEST_ID_FORM = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


def request_id_or_new(sent: str | None) -> str:
    """The caller's id when it is usable in logs and headers, else a new one."""
    return sent if sent and _REQUEST_ID_FORM.match(sent) else uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value if isinstance(value, (int, float, bool, str)) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info") -> None:
    """Route the root logger to stderr as JSON lines and quiet the chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_RequestIdFilter())
    if os.environ.get(REQUEST_ID_ENV):  # a training process, started for that call's job
        REQUEST_ID.set(os.environ[REQUEST_ID_ENV])
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn lines become JSON lines too
    for noisy in ("accelerate", "peft", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_hugging_face_libraries()


# Read when each library is imported (diffusers and transformers reset their loggers' level
# then, and tqdm >= 4.66 takes its TQDM_* defaults then: hence the servers quiet them before
# importing anything that imports them): library progress bars would interleave with the JSON
# lines. Through the environment, so that a server does not import diffusers (3 s) only to
# quiet it, and its training processes inherit the same.
QUIET_LIBRARIES_ENV = {
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _quiet_hugging_face_libraries() -> None:
    os.environ.update(QUIET_LIBRARIES_ENV)
    for library in ("diffusers", "transformers"):  # imported already: quiet them now
        if library in sys.modules:
            library_logging = importlib.import_module(f"{library}.utils.logging")
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()
