"""poller: delivers scheduled WhatsApp messages from MongoDB through a WAHA server."""

__version__ = "0.1.0"
