# One image for every shipmon process: migrate, worker, beat, the metrics exporter, the sandbox.
FROM python:3.11-slim

# uv from PyPI; the project's exact versions come from uv.lock.
RUN pip install --no-cache-dir uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /app
# Dependencies first, in their own layer, so a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY worker ./worker
COPY migrations ./migrations
RUN uv sync --frozen --no-dev

# State and metrics folders owned by the unprivileged user, so fresh volumes inherit that.
RUN useradd --system --uid 10001 --home-dir /var/lib/shipmon shipmon \
    && mkdir -p /var/lib/shipmon /var/lib/shipmon-metrics \
    && chown shipmon /var/lib/shipmon /var/lib/shipmon-metrics
USER shipmon
ENV SHIPMON_HOME=/var/lib/shipmon

CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
