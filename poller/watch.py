"""Waking `poller run` early: at the next due message, and for messages the web app writes
between two ticks (a MongoDB change stream, where the deployment offers one)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pymongo.errors import OperationFailure, PyMongoError

from poller.store import Store

# New messages, and messages the web app rescheduled; `at` is when they are due. The poller's
# own writes never match: it inserts no message and changes no scheduledAt, and a replacement
# counts only while the message is not picked.
CHANGES: list[dict[str, Any]] = [
    {
        "$match": {
            "$or": [
                {
                    "operationType": {"$in": ["insert", "replace"]},
                    "fullDocument.isPicked": {"$ne": True},
                },
                {
                    "operationType": "update",
                    "updateDescription.updatedFields.scheduledAt": {"$exists": True},
                },
            ]
        }
    },
    {
        "$project": {
            "at": {
                "$ifNull": [
                    "$fullDocument.scheduledAt",
                    "$updateDescription.updatedFields.scheduledAt",
                ]
            }
        }
    },
]
# What MongoDB answers where change streams cannot be opened at all: unauthorized, command not
# supported, unknown pipeline stage, not a replica set. Any other failure is tried again.
NO_CHANGE_STREAMS = {13, 115, 40324, 40573}
# The longest a read of the stream waits for a change: how soon the watcher sees `stop`.
AWAIT_SECONDS = 1.0
# After a failure, the watcher opens the stream again this much later (resuming where it was).
RETRY_SECONDS = 1.0


class Watcher(threading.Thread):
    """Rings the alarm at the due time of each message inserted or rescheduled.

    Without change streams (a standalone mongod, a user without the privilege) it logs why,
    once, and ends: messages written between two ticks are then seen by the next tick. After any
    other failure (MongoDB unreachable, a failover) it opens the stream again a second later,
    resuming where it stopped.
    """

    def __init__(self, store: Store, ring: Callable[[datetime], None], stop: threading.Event):
        super().__init__(name="watcher", daemon=True)
        self.store = store
        self.ring = ring
        self.stop = stop
        self.watching = threading.Event()  # set while the change stream is open
        self.opened = False  # it was open once: a log line said so
        # A read waits for a change less than the operation timeout, or it would time out.
        self.await_ms = int(
            1000 * min(AWAIT_SECONDS, store.timings.mongodb_timeout.total_seconds() / 2)
        )

    def run(self) -> None:
        token: Any = None
        while not self.stop.is_set():
            try:
                token = self._watch(token)
            except OperationFailure as exc:
                if exc.code in NO_CHANGE_STREAMS:
                    logger.info(
                        "no change stream (error {}: {}): messages written between two ticks "
                        "are seen by the next tick",
                        exc.code,
                        (exc.details or {}).get("errmsg", exc),
                    )
                    return
                token = None  # whatever it was (history lost, a failover): start from now
                logger.debug("change stream stopped: {}", exc)
            except PyMongoError as exc:
                logger.debug("change stream stopped: {}", exc)
            except Exception:
                token = None
                logger.exception("change stream failed unexpectedly; opening it again")
            self.watching.clear()
            self.stop.wait(RETRY_SECONDS)

    def _watch(self, token: Any) -> Any:
        """Ring for each change until stopped; the resume token of the last change read."""
        with self.store.messages.collection.watch(
            CHANGES, resume_after=token, max_await_time_ms=self.await_ms
        ) as stream:
            if token is None:  # what was written before this moment, a tick reads
                self.ring(datetime.now(UTC))
            if not self.opened:
                logger.info("watching {} for new messages", self.store.messages.collection.name)
                self.opened = True
            self.watching.set()
            while not self.stop.is_set() and stream.alive:
                change = stream.try_next()
                token = stream.resume_token
                if change is not None:
                    at = change.get("at")
                    self.ring(at if isinstance(at, datetime) else datetime.now(UTC))
        return token
