"""How much the claim query reads: explain() of it over a collection with history and future.

    .venv/bin/python benchmarks/claim_explain.py [N]

Inserts N sent and N future messages plus 5 due ones into an embedded SecantusDB (slower than
mongod on large collections: keep N in the thousands) and prints the plan and what it examined.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from poller.settings import Settings
from poller.store import Store
from poller.store.messages import CLAIM_INDEX
from poller.testing.mongo import embedded_mongodb


def main(n: int) -> None:
    with embedded_mongodb() as uri:
        store = Store.connect(Settings(mongodb_uri=uri, mongodb_db="bench", instance_id="bench"))
        store.ensure_indexes()
        now = datetime.now(UTC)
        sent = [
            {"scheduledAt": now - timedelta(minutes=i), "isPicked": True, "isSent": True}
            for i in range(n)
        ]
        future = [{"scheduledAt": now + timedelta(minutes=i + 1)} for i in range(n)]
        due = [{"scheduledAt": now - timedelta(seconds=i)} for i in range(5)]
        store.messages.collection.insert_many(sent + future + due)
        query = store.messages.collection.find(
            store.messages.claimable(now), hint=CLAIM_INDEX, sort=[("scheduledAt", 1)]
        )
        explained = query.explain()
        stats = explained["executionStats"]
        print(f"documents in collection: {2 * n + 5}")
        print(f"plan: {explained['queryPlanner']['winningPlan']}")
        print(
            f"returned {stats['nReturned']}, keys examined {stats['totalKeysExamined']}, "
            f"documents examined {stats['totalDocsExamined']}"
        )
        store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
