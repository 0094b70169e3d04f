"""The Celery application: `celery -A worker worker` and `celery -A worker beat` find it here.

Delivery is at-least-once and nothing is lost: tasks are acknowledged only after they finish,
a task whose worker died is given to another, each worker takes one task at a time, and no
task waits in Redis longer than a minute (PostgreSQL holds every schedule).

Importing this module touches no server: the settings are read, and the servers resolved
(embedded ones started), only when Celery first reads its configuration, that is when a worker
or beat starts or a task is sent. So the CLI, the tests and a backend's tooling may import the
tasks for free.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from celery.signals import setup_logging
from kombu.entity import Queue

from worker.core.config import get_settings
from worker.core.logs import configure_logging
from worker.core.servers import resolve

# Hard time limits; the broker's visibility timeout must exceed the longest of them, or a
# running task would be handed to a second worker.
POLL_TIME_LIMIT = 120
TASK_TIME_LIMIT = 300
VISIBILITY_TIMEOUT = 3600

# Queues: polls and deliveries apart, so a burst of polls never delays a webhook.
POLL_QUEUE = "shipmon.polls"
NOTIFY_QUEUE = "shipmon.notify"
# Celery's own default, so a backend that sends `shipmon.register_orders` by name with
# send_task, knowing nothing of our routes, reaches a worker.
DEFAULT_QUEUE = "celery"


@setup_logging.connect
def _json_logs(loglevel: int | str | None = None, **_: object) -> None:
    """One JSON object per log line, with the task's id and name, at Celery's `--loglevel`."""
    configure_logging(loglevel or get_settings().log_level)


def create_app() -> Celery:
    """The application, configured but for where its servers are: that waits for first use."""
    app = Celery("shipmon", include=["worker.runtime.tasks"])
    app.add_defaults(_server_configuration)
    app.conf.update(
        result_expires=timedelta(days=1),
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        broker_connection_retry_on_startup=True,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(DEFAULT_QUEUE), Queue(POLL_QUEUE), Queue(NOTIFY_QUEUE)],
        task_routes={
            "shipmon.poll": {"queue": POLL_QUEUE},
            "shipmon.deliver": {"queue": NOTIFY_QUEUE},
            "shipmon.sweep_deliveries": {"queue": NOTIFY_QUEUE},
        },
        beat_schedule={
            "dispatch": {"task": "shipmon.dispatch", "schedule": 2.0},
            "prices": {"task": "shipmon.update_prices", "schedule": 60.0},
            "learn": {"task": "shipmon.relearn", "schedule": 600.0},
            "deliveries": {"task": "shipmon.sweep_deliveries", "schedule": 5.0},
            "stalled": {"task": "shipmon.detect_stalled", "schedule": 900.0},
            "purge": {"task": "shipmon.purge_finished", "schedule": 3600.0},
            "metrics": {"task": "shipmon.refresh_metrics", "schedule": 30.0},
        },
        # Beat ticks expire if no worker runs them in time: a backlog of stale ticks would
        # only dispatch the same shipments again.
        beat_max_loop_interval=5,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def _server_configuration() -> dict[str, str]:
    """Where the broker, the results and beat's schedule are: resolved on first use, once."""
    settings = get_settings()
    servers = resolve(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    return {
        "broker_url": servers.broker_url,
        # Results only for intake, whose callers may want to know what was refused.
        "result_backend": servers.redis_url,
        "beat_schedule_filename": str(settings.home / "celerybeat-schedule"),
    }


app = create_app()
