"""Structured logs: one JSON object per line, with the task, shipment and account it concerns.

Context travels in `extra` (`log.info("...", extra={"order_code": code, "shipment_id": id})`);
every such field becomes a key of the line. Inside a Celery task the task's id and name are
added by themselves.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# What every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _current_task() -> tuple[str, str] | None:
    """The id and name of the Celery task this thread runs, if any."""
    # Only a process that runs tasks has imported Celery; others need not pay for the import.
    if "celery" not in sys.modules:
        return None
    from celery import current_task

    if not current_task or current_task.request.id is None:
        return None
    return str(current_task.request.id), str(current_task.name)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON: time, level, logger, message, then context."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task = _current_task()
        if task is not None:
            line["task_id"], line["task_name"] = task
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str) -> None:
    """Send every log record of this process to stderr as JSON lines, from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
