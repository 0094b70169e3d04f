"""Running shipmon: the Celery application, its tasks, and the one-machine supervisor."""
