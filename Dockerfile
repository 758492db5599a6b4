# poller in a container: `docker build -t poller .`, then
#   docker run -d --name poller --env-file poller.env --restart unless-stopped --stop-timeout 45 poller
#   docker run --rm --env-file poller.env poller poller once      (one tick, e.g. from cron)
# Slim Debian-based Python: pymongo and httpx need nothing compiled.
FROM python:3.12-slim

# Log lines leave at once (docker logs); no .pyc files or pip cache in the image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY poller ./poller
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin poller

# Never run as root: poller needs no privileges.
USER 10001

# `docker stop` sends this; poller finishes the message in flight. Give it time to with
# `docker run --stop-timeout 45` (the default 10 s can cut a slow send short).
STOPSIGNAL SIGTERM

# Healthy while the poller on this host (this container) writes its heartbeat to MongoDB.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["poller", "check", "--local"]

# Exec form: poller is PID 1 and receives the stop signal itself.
CMD ["poller", "run"]
