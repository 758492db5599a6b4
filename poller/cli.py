"""Command line: `poller run`, `poller once`, `poller check`, `poller status`, `poller send`,
`poller import`, `poller demo`.

Exit codes: 0 done, 1 MongoDB unreachable or WAHA refused the key, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import socket
import sys

from dotenv import find_dotenv, load_dotenv
from loguru import logger

from poller import __version__, log, submit
from poller.settings import ConfigError, Settings

CONFIG_HELP = """\
configuration (environment variables, or a .env file in the working directory):
  MONGODB_URI            required; the database name in its path, or MONGODB_DB
  WAHA_URL               WAHA base URL (default http://localhost:3000)
  WAHA_API_KEY           sent as X-Api-Key
  WAHA_SERVERS           several WAHA servers by name (eu1,eu2), each with
                         WAHA_<NAME>_URL and WAHA_<NAME>_API_KEY
  POLL_INTERVAL_SECONDS  seconds between ticks (default 30)
  LOOKBACK_SECONDS       how late a message may be when first seen (default 120)
  LOG_JSON=1             JSON log lines
See README.md for every setting."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poller",
        description="Deliver scheduled WhatsApp messages from MongoDB through WAHA.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"poller {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in (
        ("run", "run as a daemon: a tick every POLL_INTERVAL_SECONDS until SIGTERM or SIGINT"),
        ("once", "tick, and again for what comes due within POLL_INTERVAL_SECONDS (for cron)"),
        ("check", "exit 0 when a poller is alive (its heartbeat is fresh), 1 otherwise"),
        ("status", "show live pollers, the message backlog, the last 24 hours and campaigns"),
        ("demo", "schedule a small campaign on an embedded MongoDB and WAHA simulator, send it"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=CONFIG_HELP if name != "demo" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "check":
            which = sub.add_mutually_exclusive_group()
            which.add_argument("--instance", help="only this poller (POLLER_INSTANCE_ID or its id)")
            which.add_argument("--local", action="store_true", help="only pollers on this host")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
    submit.add_arguments(commands)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from poller.testing.demo import demo

        log.setup()
        return demo()

    try:
        load_dotenv(find_dotenv(usecwd=True))  # the working directory's .env; environment wins
        settings = Settings.from_env()
    except OSError as exc:  # e.g. a .env this user may not read
        print(f"poller: configuration error: cannot read .env: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except ConfigError as exc:
        print(f"poller: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    log.setup(settings.log_level, settings.log_json, settings.secrets)
    for warning in settings.warnings:  # a misspelt name, a WAHA URL ending in /api
        logger.warning(warning)

    if args.command == "send":
        return submit.send(settings, args)
    if args.command == "import":
        return submit.import_campaign(settings, args)
    if args.command in ("check", "status"):
        from poller import status

        if args.command == "check":
            return status.check(settings, socket.gethostname() if args.local else args.instance)
        return status.status(settings, args.json)

    from poller import daemon

    return daemon.run(settings) if args.command == "run" else daemon.once(settings)
