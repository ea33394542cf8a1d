"""Settings: one typed object; missing or malformed values fail at start-up naming the variable, never the value."""

from __future__ import annotations

import pytest

from worker.settings import SettingsError, load_settings

GOOD = {
    "upesipay_base_url": "http://127.0.0.1:9000",
    "upesipay_auth_token": "tok_secret_value_123",
    "upesipay_channel_id": 2133,
    "callback_base_url": "http://127.0.0.1:8000",
    "callback_secret": "s" * 32,
}


# The settings without a default: each must be named when missing.
REQUIRED = (
    "UPESIPAY_BASE_URL",
    "UPESIPAY_AUTH_TOKEN",
    "UPESIPAY_CHANNEL_ID",
    "CALLBACK_BASE_URL",
    "CALLBACK_SECRET",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in (*REQUIRED, "REDIS_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(str(tmp_path))  # no stray .env


def test_defaults_are_the_documented_limits() -> None:
    settings = load_settings(**GOOD)
    assert (settings.phone_streak_limit, settings.phone_cooldown_s, settings.phone_max_inflight) == (
        10,
        86400,
        1,
    )
    assert (settings.account_failure_limit, settings.account_window_s) == (50, 21600)
    assert (settings.amount_min, settings.amount_max) == (1, 150_000)
    assert settings.database_url.startswith("sqlite:///")


def test_missing_settings_are_named_each_one() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    for name in REQUIRED:
        assert f"{name}: is required" in message


def test_malformed_settings_name_the_variable_and_never_echo_the_value() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            **{
                **GOOD,
                "upesipay_channel_id": "twenty-one",
                "redis_url": "http://nope-secret-host",
                "callback_secret": "short",
            }
        )
    message = str(caught.value)
    assert "UPESIPAY_CHANNEL_ID" in message and "REDIS_URL" in message and "CALLBACK_SECRET" in message
    assert "twenty-one" not in message and "nope-secret-host" not in message and "short'" not in message


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPESIPAY_BASE_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("UPESIPAY_AUTH_TOKEN", "tok")
    monkeypatch.setenv("UPESIPAY_CHANNEL_ID", "77")
    monkeypatch.setenv("CALLBACK_BASE_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("CALLBACK_SECRET", "x" * 20)
    monkeypatch.setenv("PHONE_STREAK_LIMIT", "4")
    settings = load_settings()
    assert settings.upesipay_channel_id == 77 and settings.phone_streak_limit == 4


def test_secrets_are_hidden_in_repr() -> None:
    settings = load_settings(**GOOD)
    assert "tok_secret_value_123" not in repr(settings)
    assert "s" * 32 not in repr(settings)


def test_backoff_cap_must_stay_below_half_the_visibility_timeout() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**GOOD, visibility_timeout_s=600, send_backoff_cap_s=400)
    assert "SEND_BACKOFF_CAP_S" in str(caught.value)


def test_postgres_urls_use_psycopg() -> None:
    settings = load_settings(**GOOD, database_url="postgresql://u@127.0.0.1/test")
    assert settings.sqlalchemy_url == "postgresql+psycopg://u@127.0.0.1/test"


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("redis://:hunter2pw@127.0.0.1:notaport/0", "port"),
        ("redis://:hunter2pw@127.0.0.1:70000/0", "port"),
        ("redis://:hunter2pw@127.0.0.1:0/0", "port"),
        ("redis://:hunter2pw@:6379/0", "host"),
        ("redis://:hunter2pw@127.0.0.1:6379/zero", "database number"),
        ("unix://:hunter2pw@", "socket"),
        ("http://:hunter2pw@127.0.0.1:6379/0", "redis://"),
    ],
)
def test_a_malformed_redis_url_fails_at_load_naming_redis_url_not_the_password(url: str, rule: str) -> None:
    # Issue 15, item 7: `redis://:pw@127.0.0.1:notaport/0` used to pass and fail at the first connection.
    with pytest.raises(SettingsError) as caught:
        load_settings(**GOOD, redis_url=url)
    message = str(caught.value)
    assert "REDIS_URL" in message and rule in message
    assert "hunter2pw" not in message and url not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@redis:6379/2",
        "rediss://user:pw@cache.example:6380/0",
        "redis://[::1]:6379/0",
        "redis://localhost",
        "unix:///run/redis.sock?db=1",
    ],
)
def test_well_formed_redis_urls_load(url: str) -> None:
    assert load_settings(**GOOD, redis_url=url).redis_url == url
