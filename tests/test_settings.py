"""Settings from the environment: defaults, overrides, and one clear error per bad value."""

from __future__ import annotations

from datetime import time

import pytest

from poller.settings import ConfigError, Settings

BASE = {"MONGODB_URI": "mongodb://app:s3cret@db.example:27017/whatsapp?authSource=admin"}


def test_defaults() -> None:
    settings = Settings.from_env(BASE)
    assert settings.mongodb_db == "whatsapp"
    assert settings.waha_url == "http://localhost:3000"
    assert settings.waha_api_key == ""
    assert (settings.poll_interval_seconds, settings.lookback_seconds) == (30.0, 120.0)
    assert settings.messages_collection == "scheduledmessages"
    assert settings.campaigns_collection == "campaigns"
    assert settings.sessions_collection == "whatsappsessions"
    assert settings.instance_id and not settings.log_json
    assert (settings.pacing_min_seconds, settings.pacing_max_seconds) == (10.0, 25.0)
    assert not settings.typing and settings.daily_cap is None and settings.quiet_hours is None
    assert settings.timezone == "UTC"


def test_overrides() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "MONGODB_DB": "other",
            "WAHA_URL": "https://waha.example/",
            "WAHA_API_KEY": "k",
            "POLL_INTERVAL_SECONDS": "5",
            "LOOKBACK_SECONDS": "300",
            "BATCH_SIZE": "5",
            "MESSAGES_COLLECTION": "msgs",
            "POLLER_INSTANCE_ID": "vps-1",
            "LOG_JSON": "1",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.mongodb_db == "other"
    assert settings.waha_url == "https://waha.example"
    assert (settings.poll_interval_seconds, settings.lookback_seconds, settings.batch_size) == (
        5.0,
        300.0,
        5,
    )
    assert settings.messages_collection == "msgs" and settings.instance_id == "vps-1"
    assert settings.log_json and settings.log_level == "DEBUG"


def test_humanized_sending() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "PACING_MIN_SECONDS": "0",
            "PACING_MAX_SECONDS": "0",
            "TYPING": "1",
            "DAILY_CAP": "80",
            "TIMEZONE": "Europe/Rome",
            "QUIET_HOURS": "22:00 - 7:30",
        }
    )
    assert (settings.pacing_min_seconds, settings.pacing_max_seconds) == (0.0, 0.0)
    assert settings.typing and settings.daily_cap == 80
    assert settings.zone.key == "Europe/Rome"
    assert settings.quiet_hours == (time(22, 0), time(7, 30))


def test_secrets_are_the_key_and_the_password() -> None:
    settings = Settings.from_env({**BASE, "WAHA_API_KEY": "key-1"})
    assert settings.secrets == ["key-1", "s3cret"]
    encoded = Settings.from_env({"MONGODB_URI": "mongodb://app:p%40ss@db/whatsapp"})
    assert encoded.secrets == ["p%40ss", "p@ss"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MONGODB_URI is required"),
        ({"MONGODB_URI": "  "}, "MONGODB_URI is required"),
        ({"MONGODB_URI": "mongodb://h:notaport/db"}, "MONGODB_URI is not a valid"),
        ({**BASE, "WAHA_URL": "localhost:3000"}, "WAHA_URL must be an http"),
        ({**BASE, "WAHA_URL": "http://user:pw@waha"}, "WAHA_URL must be a plain base URL"),
        ({**BASE, "WAHA_URL": "http://waha?x-api-key=k"}, "WAHA_URL must be a plain base URL"),
        ({**BASE, "POLL_INTERVAL_SECONDS": "0"}, "POLL_INTERVAL_SECONDS must be greater than 0"),
        ({**BASE, "WAHA_TIMEOUT_SECONDS": "nan"}, "WAHA_TIMEOUT_SECONDS must be greater than 0"),
        ({**BASE, "MESSAGES_COLLECTION": "a$b"}, "MESSAGES_COLLECTION is not a valid"),
        ({**BASE, "LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of"),
        ({**BASE, "PACING_MIN_SECONDS": "-1"}, "PACING_MIN_SECONDS must be 0 or more"),
        ({**BASE, "PACING_MAX_SECONDS": "soon"}, "PACING_MAX_SECONDS must be a number"),
        ({**BASE, "PACING_MIN_SECONDS": "30"}, r"PACING_MIN_SECONDS \(30\) must not be greater"),
        ({**BASE, "TYPING": "maybe"}, "TYPING must be 1 or 0"),
        ({**BASE, "DAILY_CAP": "0"}, "DAILY_CAP must be a whole number of 1 or more"),
        ({**BASE, "DAILY_CAP": "1.5"}, "DAILY_CAP must be a whole number"),
        ({**BASE, "TIMEZONE": "Mars/Olympus"}, "TIMEZONE must be an IANA time zone"),
        ({**BASE, "QUIET_HOURS": "22-8"}, "QUIET_HOURS must be HH:MM-HH:MM"),
        ({**BASE, "QUIET_HOURS": "22:00-24:00"}, "QUIET_HOURS must be HH:MM-HH:MM"),
        ({**BASE, "QUIET_HOURS": "08:00-08:00"}, "QUIET_HOURS starts and ends at the same time"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Settings.from_env(env)
    assert "s3cret" not in str(raised.value)


def test_srv_uri_is_checked_without_dns() -> None:
    settings = Settings.from_env(
        {"MONGODB_URI": "mongodb+srv://app:pw@cluster0.example.net/whatsapp"}
    )
    assert settings.mongodb_db == "whatsapp" and settings.secrets == ["pw"]


@pytest.mark.parametrize(
    ("key", "position"),
    [
        ("s3cr3t\u200b-key", 7),  # a zero-width space, pasted with the key
        ("\u201cs3cr3t-key\u201d", 1),  # curly quotes from a word processor
        ("s3cr3t\u00a0-key", 7),  # a non-breaking space
        ("s3cr3t\t-key", 7),
        ("  s3cr3t-k\u00e9y", 11),  # counted in the value as set, spaces included
    ],
)
def test_an_api_key_no_header_can_carry_is_named_not_shown(key: str, position: int) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, "WAHA_API_KEY": key})
    message = str(raised.value)
    assert message.startswith("WAHA_API_KEY ") and f"at position {position} " in message
    assert "\n" not in message
    assert "s3cr3t" not in message and key.strip() not in message
