# One image for every shipmon process: migrate, worker, beat, the metrics exporter, the sandbox.
# Two stages: the first resolves uv.lock into /opt/venv; the second carries that environment and
# the code, without uv or its cache. Needs BuildKit (Docker Engine 23+, `docker compose` v2).
# Both stages start from the same image: the environment's interpreter is the base image's.

FROM python:3.11-slim AS build
# A pinned uv, the release that writes this uv.lock, copied from its official image.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
# The base image's Python, never a downloaded one: the run stage has the same one at the same
# path. Copies, not hard links, out of the cache mount, which is another file system.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /app
# Dependencies first, in their own layer, so a code change does not reinstall them. uv's cache
# lives in a build cache mount, so no layer keeps it.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
COPY worker ./worker
COPY migrations ./migrations
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev \
    && python -m compileall -q worker migrations

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHIPMON_HOME=/var/lib/shipmon

# State and metrics folders owned by the unprivileged user, so fresh volumes inherit that.
RUN useradd --system --uid 10001 --home-dir /var/lib/shipmon shipmon \
    && mkdir -p /var/lib/shipmon /var/lib/shipmon-metrics \
    && chown shipmon /var/lib/shipmon /var/lib/shipmon-metrics
# The project is installed editable from /app (migrations/ sits beside worker/), so both move
# together; root owns them (compiled already) and the unprivileged user only reads them.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER shipmon

# For the default command, a worker named celery@<container>; docker-compose.yml gives every
# service a check of its own.
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
    CMD celery -A worker inspect ping --destination "celery@$HOSTNAME" --timeout 10 || exit 1

CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
