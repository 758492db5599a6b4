"""`poller import`'s cost, and how well its dry run foretells a paced campaign.

    .venv/bin/python benchmarks/import.py [--rows 10000] [--paced 8]

Against SecantusDB (its own process; about 10-30 ms a write, slower than mongod) and the WAHA
simulator:

1. Imports a CSV of `--rows` recipients with a two-variable template as `poller import` (a
   process of its own): its wall time and peak RSS (the child's ru_maxrss), and the same import
   again (nothing written).
2. A small paced campaign of `--paced` messages (pacing 2-4 s): the dry run's eta, then the
   import, then `poller run` until every message is sent; prints when the last went out
   against the eta.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymongo import MongoClient
from soak import DB, KEY, Replicas, replica_environment

from poller.testing.mongo import mongo_daemon
from poller.testing.waha import WahaSimulator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--paced", type=int, default=8)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="poller-import-"))
    big = folder / "big.csv"
    big.write_text(
        "phone,name,city\n"
        + "".join(f"44770{n:06d},Person {n},Town {n % 97}\n" for n in range(args.rows))
    )
    small = folder / "small.csv"
    small.write_text(
        "phone,name\n" + "".join(f"44771{n:06d},Friend {n}\n" for n in range(args.paced))
    )
    with mongo_daemon() as daemon, WahaSimulator(api_key=KEY) as waha:
        env = replica_environment(daemon, waha)
        env.update(PACING_MIN_SECONDS="2", PACING_MAX_SECONDS="4", POLL_INTERVAL_SECONDS="2")
        env["MONGODB_TIMEOUT_SECONDS"] = "30"  # SecantusDB builds indexes on 10,000 documents
        template = ["--text", "Hi {name} from {city}: our December offers are here."]
        for label in ("first import", "the same again"):
            began = time.monotonic()
            said, peak = run(
                env, folder, "import", big.name, "--campaign", "Big", "--in", "1d", *template
            )
            seconds = time.monotonic() - began
            print(
                f"{label} of {args.rows} rows: {seconds:.1f} s, peak RSS {peak:.1f} MiB; "
                f"{said.strip().splitlines()[-1]}"
            )
        client: MongoClient[dict[str, object]] = MongoClient(daemon.uri, tz_aware=True)
        print(f"messages in MongoDB: {client[DB]['scheduledmessages'].count_documents({})}")

        small_args = ["import", small.name, "--campaign", "Small", "--text", "Hi {name}"]
        dry, _ = run(env, folder, *small_args, "--dry-run")
        print(dry.strip())
        eta = next(line for line in dry.splitlines() if line.strip().startswith("eta "))
        run(env, folder, *small_args)
        replicas = Replicas(folder, env)
        replicas.start()
        deadline = time.monotonic() + 300
        messages = client[DB]["scheduledmessages"]
        while messages.count_documents({"status": "sent"}) < args.paced:
            if time.monotonic() > deadline:
                print("the paced campaign did not finish within 300 s")
                return 1
            time.sleep(0.5)
        replicas.stop()
        times = sorted(d["sentAt"] for d in messages.find({"status": "sent"}))
        print(f"dry run: {eta.strip()}, from its first planned send")
        print(
            f"sent: the first at {times[0]:%H:%M:%S} UTC, the last at {times[-1]:%H:%M:%S} UTC, "
            f"{(times[-1] - times[0]).total_seconds():.1f} s after the first"
        )
    return 0


def run(env: dict[str, str], folder: Path, *args: str) -> tuple[str, float]:
    """`poller <args>` in a process of its own: what it printed, and its peak RSS in MiB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "poller", *args], env=env, cwd=folder, stdout=out, stderr=err
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"poller {' '.join(args)} exited {process.returncode}: {err.read()}")
        return out.read(), usage.ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
