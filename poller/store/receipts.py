"""Delivery receipts on the messages WAHA sent: `ack`, `deliveredAt`, `readAt`, `deliveryError`.
They never change a message's status: it stays `sent`."""

from __future__ import annotations

from datetime import datetime

from pymongo import ASCENDING
from pymongo.collection import Collection

from poller.stats import DELIVERED, READ
from poller.store.base import Doc, create_index

RECEIPT_INDEX = [("wahaMessageId", ASCENDING)]
# An ack of -1: WAHA's ERROR (the others: 0 PENDING, 1 SERVER, 2 DEVICE, 3 READ, 4 PLAYED).
ACK_ERROR = -1
DELIVERY_ERROR = "WhatsApp reported that it could not deliver the message (ack -1, ERROR)."


class Receipts:
    def __init__(self, collection: Collection[Doc]) -> None:
        self.collection = collection

    def ensure_indexes(self) -> None:
        create_index(self.collection, RECEIPT_INDEX, "poller_receipt", sparse=True)

    def acknowledge(self, waha_message_id: str, ack: int, at: datetime) -> Doc | None:
        """Record a delivery receipt on the message WAHA knows as `waha_message_id`: `ack`
        only ever rises; `deliveredAt` and `readAt` are the first times it reached 2 and 3; an
        ack of -1 notes `deliveryError` (its status stays `sent`). Any order, any repeat, the
        same result. The message (its `campaignId`), or None when no message has that id."""
        fields: Doc = {"ack": {"$max": ["$ack", ack]}}
        if ack >= DELIVERED:
            fields["deliveredAt"] = {"$ifNull": ["$deliveredAt", at]}
        if ack >= READ:
            fields["readAt"] = {"$ifNull": ["$readAt", at]}
        if ack == ACK_ERROR:
            fields["deliveryError"] = {"$ifNull": ["$deliveryError", DELIVERY_ERROR]}
        return self.collection.find_one_and_update(
            {"wahaMessageId": waha_message_id},
            [{"$set": fields}],
            {"campaignId": 1},
            hint=RECEIPT_INDEX,
        )
