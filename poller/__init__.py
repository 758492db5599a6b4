"""poller: delivers scheduled WhatsApp messages from MongoDB through a WAHA server."""

__version__ = "0.1.0"


def run_once(env: dict[str, str] | None = None) -> dict[str, int | bool]:
    """One tick, for serverless handlers and scripts; see poller.daemon.run_once."""
    from poller.daemon import run_once as tick_once

    return tick_once(env)


def schedule(
    to: str,
    text: str | None = None,
    at: object = None,
    *,
    within: str | None = None,
    session: str = "default",
    priority: float | None = None,
    image: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Schedule one message, as the web app would write it: to a phone number or chat id, at a
    datetime (or an ISO 8601 text; naive ones in TIMEZONE), or `within` ("10m") from now, or
    now. Settings from `env` or os.environ (MONGODB_URI, ...). Returns the message's id.

    Raises poller.scheduling.Invalid (a ValueError) naming every field that is wrong, ConfigError
    for bad settings, PyMongoError when MongoDB is unreachable.
    """
    from datetime import UTC, datetime, timedelta

    from poller import scheduling
    from poller.settings import Settings
    from poller.store import Store

    settings = Settings.from_env(env)
    request = scheduling.Request(to, text, at, within, session, priority, image)
    lookback = timedelta(seconds=settings.lookback_seconds)
    doc = scheduling.document(request, datetime.now(UTC), settings.zone, lookback)
    store = Store.connect(settings)
    try:
        [message_id] = scheduling.add(store, [doc])
    finally:
        store.close()
    return str(message_id)
