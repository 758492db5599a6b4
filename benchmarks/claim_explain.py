"""How much finding due messages reads: explain() of the query of new messages and of the
claim's read of the queue, over a collection with history, a future and a lane planned far ahead.

    .venv/bin/python benchmarks/claim_explain.py [N]

Inserts N sent messages, N future ones, N planned in the lane `default` from a minute on, and 5
due ones (planned in that lane) into an embedded SecantusDB (slower than mongod on large
collections: keep N in the thousands) and prints each plan and what it examined.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from poller.settings import Settings
from poller.store import Store
from poller.store.plans import NEW_INDEX, QUEUE_INDEX, queue_query, unplanned_query
from poller.testing.mongo import embedded_mongodb


def main(n: int) -> None:
    with embedded_mongodb() as uri:
        settings = Settings(
            mongodb_uri=uri, mongodb_db="bench", instance_id="bench", mongodb_timeout_seconds=300
        )
        store = Store.connect(settings)
        store.ensure_indexes()
        now = datetime.now(UTC)
        sent = [
            {"scheduledAt": now - timedelta(minutes=i), "isPicked": True, "isSent": True}
            for i in range(n)
        ]
        future = [{"scheduledAt": now + timedelta(minutes=i + 1)} for i in range(n)]
        lane = {"lane": "default", "priority": 0, "isPicked": False, "scheduledAt": now}
        later = [{**lane, "plannedAt": now + timedelta(minutes=i + 1)} for i in range(n)]
        due = [{**lane, "plannedAt": now - timedelta(seconds=i)} for i in range(5)]
        store.messages.collection.insert_many(sent + future + later + due)
        print(f"documents in collection: {3 * n + 5}")
        until = now + timedelta(seconds=30)
        for name, found in (
            (
                "new messages",
                store.messages.collection.find(unplanned_query(until), hint=NEW_INDEX),
            ),
            (
                "the claim's read of the queue",
                store.messages.collection.find(
                    queue_query(until), sort=[("plannedAt", 1)], hint=QUEUE_INDEX, limit=90
                ),
            ),
        ):
            explained = found.explain()
            stats = explained["executionStats"]
            print(f"{name}: plan {explained['queryPlanner']['winningPlan']}")
            print(
                f"  returned {stats['nReturned']}, keys examined {stats['totalKeysExamined']}, "
                f"documents examined {stats['totalDocsExamined']}"
            )
        store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
