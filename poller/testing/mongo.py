"""MongoDB-compatible servers (SecantusDB) for the demo, the tests and the soak benchmark."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

# The folder above the package: a source checkout when it holds pyproject.toml (an editable
# install, or `python -m poller` in a clone); site-packages after a plain `pip install .`.
CHECKOUT = Path(__file__).resolve().parents[2]


def install_hint(extra: str, checkout: Path = CHECKOUT) -> str:
    """How to install poller's `extra` (demo, test) for the Python that runs this: in a source
    checkout, its make target or an editable install; otherwise the installed package's extra."""
    python = sys.executable
    if (checkout / "pyproject.toml").is_file():
        editable = f"{python} -m pip install -e '.[{extra}]'"
        return f"run `make {extra}` in {checkout} (or `{editable}` there)"
    return f"{python} -m pip install 'poller[{extra}]'"


@contextmanager
def embedded_mongodb() -> Iterator[str]:
    """Start SecantusDB in this process, in a throw-away folder; yield its URI."""
    try:
        from secantus import SecantusDBServer
    except ImportError:
        raise SystemExit(
            f"poller: the embedded MongoDB server is not installed: {install_hint('demo')}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="poller-mongo-") as folder:
        server = SecantusDBServer(storage_path=folder)
        server.start()
        try:
            yield str(server.uri)
        finally:
            server.stop()


class MongoDaemon:
    """SecantusDB as a process of its own (`secantusd-py`), on a fixed port and folder, so that it
    can be killed and restarted with its data, and with the test commands (`configureFailPoint`)."""

    def __init__(self, folder: Path, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: a self-signed certificate for 127.0.0.1 and its key; clients trust it as CA."""
        binary = Path(sys.executable).parent / "secantusd-py"
        if not binary.exists():
            raise SystemExit(f"poller: secantusd-py is not installed: {install_hint('test')}")
        self.command = [str(binary), "--storage-path", str(folder), "--enable-test-commands"]
        # Every commit reaches the disk, as journaled majority writes do on mongod: a killed
        # server keeps what it acknowledged.
        self.command += ["--sync-on-commit", "--log-level", "WARNING", "--port", str(free_port())]
        self.uri = f"mongodb://127.0.0.1:{self.command[-1]}/?directConnection=true"
        if tls:
            self.command += ["--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])]
            self.uri += f"&tls=true&tlsCAFile={tls[0]}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MongoDaemon:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri, serverSelectionTimeoutMS=500)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.admin.command("ping")
                    return self
                except PyMongoError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"{self.command[0]} did not start") from None
        finally:
            client.close()

    def kill(self) -> None:
        """Stop at once, as a crash or a power cut would (SIGKILL)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def fail(self, commands: list[str], times: int, **data: Any) -> None:
        """Make the next `times` of these commands fail (`configureFailPoint` `failCommand`)."""
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri)
        try:
            client.admin.command(
                "configureFailPoint",
                "failCommand",
                mode={"times": times},
                data={"failCommands": commands, **data},
            )
        finally:
            client.close()


@contextmanager
def mongo_daemon(tls: tuple[Path, Path] | None = None) -> Iterator[MongoDaemon]:
    folder = Path(tempfile.mkdtemp(prefix="poller-mongod-"))
    daemon = MongoDaemon(folder, tls)
    try:
        yield daemon.start()
    finally:
        daemon.kill()
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
