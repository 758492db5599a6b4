"""poller: delivers scheduled WhatsApp messages from MongoDB through a WAHA server."""

__version__ = "0.1.0"


def run_once(env: dict[str, str] | None = None) -> dict[str, int | bool]:
    """One tick, for serverless handlers and scripts; see poller.daemon.run_once."""
    from poller.daemon import run_once as tick_once

    return tick_once(env)
