"""Structured logs: one JSON object per line, with the task, shipment and account it concerns.

Context travels in `extra` (`log.info("...", extra={"order_code": code, "shipment_id": id})`);
every such field becomes a key of the line. Inside a Celery task the task's id and name are
added by themselves.
"""

from __future__ import annotations

import json
import logging
import logging.config
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


# Libraries that log a line per HTTP request at INFO: one per carrier lookup would drown the
# lines that matter. uvicorn's access log stays: the API's requests are worth a line each.
QUIET_LIBRARIES = ("httpx", "httpcore", "aiohttp.access")
# Loggers that bring handlers of their own, printing plain text: they go through the root's.
OWN_HANDLERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def logging_config(level: str | int) -> dict[str, Any]:
    """Every record to stderr as one JSON line, from `level` up, as a `dictConfig` mapping.

    What this process applies, and what uvicorn applies in each of its worker processes (so
    it holds only names and strings: uvicorn pickles it for them).
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            **{name: {"level": "WARNING"} for name in QUIET_LIBRARIES},
            **{name: {"handlers": [], "propagate": True} for name in OWN_HANDLERS},
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }


def configure_logging(level: str | int) -> None:
    """Send every log record of this process, warnings included, to stderr as JSON lines.

    `level` is a name (SHIPMON_LOG_LEVEL) or a number, as Celery passes its `--loglevel`.
    """
    logging.config.dictConfig(logging_config(level))
    # Warnings (Celery's among them) become records too, so they are JSON like the rest.
    logging.captureWarnings(True)
