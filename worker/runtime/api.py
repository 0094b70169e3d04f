"""The HTTP API as `shipmon api` serves it: the application, with Celery to start deliveries."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from kombu.exceptions import KombuError
from redis import RedisError

from worker.api.app import create_app
from worker.core.config import get_settings
from worker.runtime.celery import app as celery

log = logging.getLogger(__name__)


def deliver_now(event_ids: list[int]) -> None:
    """Send the events to the notify workers at once, as a poll does after its commit. If the
    broker does not take the task, the delivery sweep sends them within seconds instead."""
    try:
        # The task is not registered in this process, so Celery would not know its results are
        # ignored: it would subscribe to each one's result channel, two more round trips to
        # Redis (and a leftover subscription) for every batch of pushes.
        celery.send_task("shipmon.deliver", args=[event_ids], retry=False, ignore_result=True)
    except (KombuError, RedisError, OSError):
        log.warning("could not queue %d events for delivery; the sweep sends them", len(event_ids))


def from_environment() -> FastAPI:
    """The app for uvicorn's `--factory`: every worker process builds its own from SHIPMON_*."""
    return create_app(get_settings(), deliver=deliver_now)
