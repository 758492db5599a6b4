"""An embedded MongoDB-compatible server (SecantusDB) for the demo and the tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def embedded_mongodb() -> Iterator[str]:
    """Start SecantusDB in this process, in a throw-away folder; yield its URI."""
    try:
        from secantus import SecantusDBServer
    except ImportError:
        raise SystemExit(
            "poller: the embedded MongoDB server is not installed: pip install 'poller[demo]'"
        ) from None
    with tempfile.TemporaryDirectory(prefix="poller-mongo-") as folder:
        server = SecantusDBServer(storage_path=folder)
        server.start()
        try:
            yield str(server.uri)
        finally:
            server.stop()
