"""Where `celery -A worker worker` and `celery -A worker beat` find the application."""

from worker.runtime.celery import app

__all__ = ["app"]
