"""Deployment files, run with the real tools: PM2, systemd-analyze, hadolint, the image steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import environment, message, utcnow, wait_until

from poller.settings import Settings
from poller.store import Store
from poller.testing.waha import WahaSimulator

ROOT = Path(__file__).resolve().parents[1]
POLLER_BIN = Path(sys.executable).parent / "poller"


# -- systemd --------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_units_verify_without_warnings(tmp_path: Path) -> None:
    # The units name /opt/poller; point that at a folder where the console script exists.
    install = tmp_path / "opt-poller"
    (install / ".venv" / "bin").mkdir(parents=True)
    (install / ".venv" / "bin" / "poller").symlink_to(POLLER_BIN)
    units = tmp_path / "units"
    units.mkdir()
    for unit in (ROOT / "systemd").iterdir():
        (units / unit.name).write_text(unit.read_text().replace("/opt/poller", str(install)))
    names = sorted(p.name for p in units.iterdir())
    assert names == ["poller-once.service", "poller-once.timer", "poller.service"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *(f"./{n}" for n in names)],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr


def test_systemd_service_settings() -> None:
    service = (ROOT / "systemd" / "poller.service").read_text()
    for line in (
        "Restart=on-failure",
        "EnvironmentFile=/etc/poller/poller.env",
        "User=poller",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ExecStart=/opt/poller/.venv/bin/poller run",
    ):
        assert f"\n{line}\n" in service
    timeout = int(re.search(r"\nTimeoutStopSec=(\d+)\n", service).group(1))  # type: ignore[union-attr]
    assert timeout > Settings.waha_timeout_seconds, "stop timeout longer than one send"


# -- Docker ---------------------------------------------------------------------------------------


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # pip installs poller and its dependencies into a fresh venv
def test_image_install_steps_and_entry_point(tmp_path: Path) -> None:
    """Without a Docker engine: the image's COPY and pip steps in a fresh venv, then its CMD."""
    text = dockerfile()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^USER \d+$", text, re.M), "a non-root user"
    assert "PYTHONUNBUFFERED=1" in text and "\nSTOPSIGNAL SIGTERM\n" in text
    context = tmp_path / "context"
    context.mkdir()
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            target = context / source
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    joined = text.replace("\\\n", " ")  # continuation lines as Docker reads them
    [run] = re.findall(r"^RUN (.+)$", joined, re.M)
    [install] = [step.strip() for step in run.split("&&") if step.strip().startswith("pip ")]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(install, shell=True, cwd=context, env=env, check=True, timeout=600)

    assert "ENTRYPOINT" not in text, "`docker run IMAGE poller once` replaces CMD as a whole"
    [cmd] = re.findall(r"^CMD (\[.+\])$", text, re.M)
    assert json.loads(cmd) == ["poller", "run"]
    health = re.findall(r"CMD (\[.+\])$", text.split("HEALTHCHECK", 1)[1], re.M)[0]
    for argv in (json.loads(cmd), json.loads(health), ["poller", "once"]):
        result = subprocess.run(
            [*argv, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: poller {argv[1]}" in result.stdout
        assert shutil.which(argv[0], path=env["PATH"]) == str(venv / "bin" / "poller")


# -- PM2 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pm2() -> Iterator[Path]:
    """PM2 from the npm registry, installed once into .venv/pm2."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    prefix = ROOT / ".venv" / "pm2"
    binary = prefix / "node_modules" / ".bin" / "pm2"
    if not binary.exists():
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "pm2@6"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    yield binary


@pytest.mark.slow
@pytest.mark.timeout(600)  # the first run installs PM2 with npm (up to 300 s)
def test_pm2_runs_and_stops_poller_gracefully(
    pm2: Path, settings: Settings, store: Store, waha: WahaSimulator, tmp_path: Path
) -> None:
    home = tmp_path / "pm2-home"
    env = environment(settings, PM2_HOME=str(home), POLLER_BIN=str(POLLER_BIN))
    store.messages.collection.insert_one(message(utcnow()))

    def pm2_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(pm2), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    try:
        started = pm2_cmd("start", "ecosystem.config.js")
        assert started.returncode == 0, started.stderr + started.stdout
        wait_until(lambda: waha.sent, 120, "PM2's poller sends the due message")
        assert len(waha.sent) == 1
        stopped = pm2_cmd("stop", "poller")
        assert stopped.returncode == 0, stopped.stderr
        described = json.loads(pm2_cmd("jlist").stdout)
        assert [app["pm2_env"]["status"] for app in described] == ["stopped"]
    finally:
        pm2_cmd("kill")
    log = (home / "logs" / "poller-error.log").read_text()
    assert "received SIGINT: finishing the message in flight" in log
    assert log.rstrip().endswith("stopped"), log[-500:]
    assert "tick: claimed=1 sent=1" in log
