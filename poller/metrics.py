"""Optional metrics (HEALTH_PORT): /metrics in Prometheus text format and /healthz."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric

from poller import web
from poller.counts import TickCounts
from poller.events import ACKS, EVENTS_PATH, Receiver
from poller.refusals import Refusals

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

OUTCOMES = ("sent", "retried", "failed", "expired", "unknown", "cancelled")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "poller_messages",
            "Messages by outcome: sent, retried, failed, expired, unknown, cancelled.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(outcome)  # every series exists from the start, at 0
        self.tick_seconds = Histogram(
            "poller_tick_seconds", "How long one tick took.", registry=self.registry
        )
        self.due = Gauge(
            "poller_messages_due",
            "Messages due and not yet sent, at the end of the last tick (-1: not counted).",
            registry=self.registry,
        )
        # Per WAHA server: each send's answer, whether it was up, its breaker, its sessions.
        self.sends = Counter(
            "poller_waha_sends",
            "Answers of each WAHA server to sends: sent, retry, failed, unknown, rejected_key.",
            ["server", "outcome"],
            registry=self.registry,
        )
        self.server_up = Gauge(
            "poller_waha_up",
            "1 when the WAHA server listed its sessions in the last tick, else 0.",
            ["server"],
            registry=self.registry,
        )
        self.breaker_open = Gauge(
            "poller_waha_breaker_open",
            "1 while the WAHA server's breaker is open (nothing is sent through it).",
            ["server"],
            registry=self.registry,
        )
        self.sessions_working = Gauge(
            "poller_waha_sessions_working",
            "WhatsApp sessions WORKING on the WAHA server, as it last listed them.",
            ["server"],
            registry=self.registry,
        )
        self.lateness = Histogram(
            "poller_send_lateness_seconds",
            "How late each message was sent against its planned time (sentAt - plannedAt).",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.pacing_delay = Histogram(
            "poller_send_pacing_delay_seconds",
            "How long pacing, a daily cap or quiet hours held each message sent back "
            "(plannedAt - scheduledAt).",
            buckets=(1, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
            registry=self.registry,
        )

    def record(self, counts: TickCounts, seconds: float, due: int) -> None:
        for outcome in OUTCOMES:
            self.messages.labels(outcome).inc(getattr(counts, outcome))
        self.tick_seconds.observe(seconds)
        self.due.set(due)
        for late in counts.lateness:
            self.lateness.observe(late)
        for held in counts.pacing_delay:
            self.pacing_delay.observe(held)
        for server, outcomes in counts.by_server.items():
            for outcome, n in outcomes.items():
                self.sends.labels(server, outcome).inc(n)
        for state in counts.servers:
            name, sessions = state["name"], state["sessions"]
            self.server_up.labels(name).set(1 if sessions is not None else 0)
            self.breaker_open.labels(name).set(1 if state["breaker"] == "open" else 0)
            if sessions is not None:
                working = sum(1 for s in sessions if s["status"] == "WORKING")
                self.sessions_working.labels(name).set(working)

    def serve(
        self,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        receiver: Receiver | None = None,
        dashboard: WsgiApp | None = None,
    ) -> web.Server:
        """Serve /metrics and /healthz, WAHA's events at EVENTS_PATH (and below it, the
        secret) when a `receiver` is
        given, and every other path through the `dashboard` when one is given, from a daemon
        thread (poller.web: bounded threads and timeouts); `shutdown()` the result to stop."""
        metrics_app = make_wsgi_app(self.registry)
        if receiver is not None:
            self.registry.register(_EventCounts(receiver))

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = str(environ.get("PATH_INFO") or "")
            if receiver is not None and (path + "/").startswith(EVENTS_PATH + "/"):
                answer = receiver.handle(environ)  # EVENTS_PATH, or EVENTS_PATH/<secret>
                start_response(answer.status, [("Content-Type", "application/json")])
                return [json.dumps(answer.body).encode()]
            if environ.get("PATH_INFO") == "/healthz":
                ok = healthy()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable",
                    [("Content-Type", "application/json")],
                )
                return [b'{"status":"ok"}' if ok else b'{"status":"down"}']
            if dashboard is not None and environ.get("PATH_INFO") != "/metrics":
                return dashboard(environ, start_response)
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        # waitress refuses a longer body before reading it; the receiver and the dashboard keep
        # their own checks. The dashboard's API takes large bodies on its routes only.
        max_body = max(receiver.max_bytes if receiver is not None else 0, web.BODY_BYTES)
        large = web.API_BODY_BYTES if dashboard is not None else 0
        return web.serve(app, host, port, max_body, large)


class _EventCounts:
    """poller_acks_total{ack}, poller_optouts_total and poller_webhook_refused_total{reason},
    read from the receiver at each scrape."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def collect(self) -> Iterable[Metric]:
        acks = CounterMetricFamily(
            "poller_acks",
            "Delivery receipts from WAHA by ack (unknown: no such message).",
            labels=["ack"],
        )
        for label in ACKS:
            acks.add_metric([label], self.receiver.acks[label])
        yield acks
        yield CounterMetricFamily(
            "poller_optouts",
            "Chats that opted out (an inbound opt-out keyword).",
            value=self.receiver.optouts,
        )
        refused = CounterMetricFamily(
            "poller_webhook_refused",
            "WAHA's event posts refused, by reason: " + ", ".join(Refusals.REASONS) + ".",
            labels=["reason"],
        )
        for reason in Refusals.REASONS:
            refused.add_metric([reason], self.receiver.refusals.totals[reason])
        yield refused
