"""The HTTP server under a slow loris: its threads, its memory, and /healthz while it lasts.

    .venv/bin/python benchmarks/slowloris.py [--sockets 100] [--drip 1]

Serves Metrics.serve (always healthy) from this process, with poller/web.py's limits as they
are, and opens `--sockets` connections to it: half send the start of a request and fall silent,
half go on sending one more byte of it every `--drip` seconds. Asks /healthz on a new
connection every 0.2 s until the server has closed them all. Prints the process's threads
(peak), its peak RSS (VmHWM: the server and these clients, one process), when the server had
closed the silent and the dripping sockets, and /healthz's latency meanwhile. Exits 1 when a
socket is still open 30 s after the request deadline, or /healthz once failed.
"""

from __future__ import annotations

import argparse
import select
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

from poller import web
from poller.metrics import Metrics
from poller.testing.mongo import free_port

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: poller\r\nX-Slow: "  # never ends: no blank line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--drip", type=float, default=1.0, help="seconds between two bytes")
    args = parser.parse_args()
    port = free_port()
    threads_before = _status("Threads")
    server = Metrics().serve("127.0.0.1", port, lambda: True)
    # A new connection for each ask, as a health probe makes it.
    probe = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
    probe.get(f"http://127.0.0.1:{port}/healthz")
    threads_serving, rss_serving = _status("Threads"), _status("VmHWM")
    started = time.monotonic()
    silent = [_open(port) for _ in range(args.sockets // 2)]
    dripping = [_open(port) for _ in range(args.sockets - args.sockets // 2)]
    closed: dict[socket.socket, float] = {}
    latencies: list[float] = []
    failures, peak, dripped, asked = 0, threads_serving, started, 0.0
    give_up = started + web.REQUEST_SECONDS + 30
    try:
        while len(closed) < args.sockets and time.monotonic() < give_up:
            now = time.monotonic()
            if now - dripped >= args.drip:
                dripped = now
                for sock in dripping:
                    if sock not in closed:
                        try:
                            sock.send(b"a")
                        except OSError:
                            closed[sock] = now - started
            still = [s for s in silent + dripping if s not in closed]
            for sock in select.select(still, [], [], 0.05)[0]:
                try:
                    ended = sock.recv(4096) == b""
                except OSError:
                    ended = True
                if ended:
                    closed[sock] = time.monotonic() - started
            if time.monotonic() - asked >= 0.2:
                asked = time.monotonic()
                try:
                    ok = probe.get(f"http://127.0.0.1:{port}/healthz").status_code
                except httpx.HTTPError:
                    ok = 0
                latencies.append(time.monotonic() - asked)
                failures += ok != 200
            peak = max(peak, _status("Threads"))
    finally:
        for sock in silent + dripping:
            sock.close()
        server.shutdown()
        probe.close()

    def last(group: list[socket.socket]) -> str:
        times = [closed[s] for s in group if s in closed]
        if len(times) < len(group):
            return f"{len(group) - len(times)} still open when given up"
        return f"the last closed by the server after {max(times):.1f} s"

    print(
        f"server limits: {web.THREADS} threads, {web.CONNECTION_LIMIT} connections, idle "
        f"{web.IDLE_SECONDS} s, request {web.REQUEST_SECONDS} s, checked every "
        f"{web.CLEANUP_SECONDS} s"
    )
    print(
        f"slow sockets: {len(silent)} silent, {len(dripping)} dripping a byte every {args.drip:g} s"
    )
    print(
        f"threads: {threads_before} before serving, {threads_serving} serving, "
        f"{peak} at the peak of the attack"
    )
    before, after = rss_serving / 1024, _status("VmHWM") / 1024
    print(f"peak RSS (VmHWM): {before:.1f} MiB before the attack, {after:.1f} MiB after it")
    print(f"silent sockets: {last(silent)}")
    print(f"dripping sockets: {last(dripping)}")
    ms = sorted(1000 * t for t in latencies)
    print(
        f"/healthz during the attack: {len(ms)} asked, {failures} failed, median "
        f"{statistics.median(ms):.1f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, "
        f"max {ms[-1]:.1f} ms"
    )
    return 1 if failures or len(closed) < args.sockets else 0


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(PARTIAL)
    return sock


def _status(field: str) -> int:
    """A figure of this process from /proc/self/status (Threads; VmHWM in KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


if __name__ == "__main__":
    sys.exit(main())
