"""Per-process resources built once from the settings: database engine, Redis client, and per account the guard,
the credentials pause and the UpesiPay client.

Celery's prefork pool forks after import, so everything here is built lazily, on first use in the child. An
account's configuration (worker.accounts) is re-read from the ledger after ACCOUNT_CACHE_S, so `stkpush account
set` (a new token, new limits, a disable) reaches every worker within that; the environment's account never
touches the database.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Hashable
from functools import lru_cache
from typing import Generic, TypeVar

import redis
from sqlalchemy import Engine

from worker.accounts import AccountConfig, UnknownAccount, account_names, load_account
from worker.guard import Guard
from worker.ledger import make_engine
from worker.pause import CredentialsPause
from worker.settings import Settings, get_settings
from worker.upesipay import UpesiPayClient

T = TypeVar("T")


def settings() -> Settings:
    return get_settings()


@lru_cache(maxsize=1)
def engine() -> Engine:
    return make_engine(settings().sqlalchemy_url)


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    # Short timeouts: the guard fails closed when Redis is slow or gone, it never hangs a send.
    return redis.Redis.from_url(
        settings().redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
    )


def guard_redis() -> redis.Redis:
    """The guard's Redis: REDIS_URL's unless GUARD_REDIS_URL points elsewhere (a Redis Cluster, say)."""
    url = settings().guard_redis_url
    return _separate_guard_redis(url) if url else redis_client()


@lru_cache(maxsize=1)
def _separate_guard_redis(url: str) -> redis.Redis:
    if "+cluster://" in url:
        from redis.cluster import RedisCluster

        # Every script of one account touches keys of one hash tag, hence one slot: legal on a cluster.
        cluster: redis.Redis = RedisCluster.from_url(  # type: ignore[assignment]
            url.replace("+cluster://", "://", 1), socket_connect_timeout=2, socket_timeout=5
        )
        return cluster
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)


_accounts_lock = threading.Lock()
_accounts: dict[str, tuple[float, AccountConfig]] = {}


def account(name: str | None = None) -> AccountConfig:
    """The configuration of account `name` (None: the environment's); UnknownAccount when there is none."""
    current = settings()
    if name is None or name == current.upesipay_account:
        return _environment_account()
    now = time.monotonic()
    with _accounts_lock:
        cached = _accounts.get(name)
    if cached is not None and now - cached[0] < current.account_cache_s:
        return cached[1]
    loaded = load_account(engine(), current, name)
    if loaded is None:
        raise UnknownAccount(name)
    with _accounts_lock:
        _accounts[name] = (now, loaded)
    return loaded


@lru_cache(maxsize=1)
def _environment_account() -> AccountConfig:
    from worker.accounts import environment_account

    return environment_account(settings())


def accounts(*, include_disabled: bool = False) -> list[str]:
    """Every enabled account's name (or every stored one's), the environment's first: what beat's per-account
    passes walk."""
    return account_names(engine(), settings(), enabled_only=not include_disabled)


class PerAccount(Generic[T]):
    """One resource per account, rebuilt when what it is built from changes (a new token, new limits)."""

    def __init__(self, build: Callable[[AccountConfig], T], key: Callable[[AccountConfig], Hashable]) -> None:
        self._build, self._key = build, key
        self._lock = threading.Lock()
        self._built: dict[str, tuple[Hashable, T]] = {}

    def __call__(self, name: str | None = None) -> T:
        config = account(name)
        key = self._key(config)
        with self._lock:
            held = self._built.get(config.name)
            if held is None or held[0] != key:
                held = (key, self._build(config))
                self._built[config.name] = held
            return held[1]

    def cache_clear(self) -> None:
        with self._lock:
            self._built.clear()


def _fingerprint(config: AccountConfig) -> str:
    # A digest, so the cache key never holds the token itself.
    return hashlib.sha256(config.token.get_secret_value().encode()).hexdigest()


guard: PerAccount[Guard] = PerAccount(
    lambda config: Guard(guard_redis(), config.name, config.guard_limits(settings())),
    lambda config: config.guard_limits(settings()),
)
credentials_pause: PerAccount[CredentialsPause] = PerAccount(
    lambda config: CredentialsPause(guard_redis(), config.name), lambda config: config.name
)
upesipay: PerAccount[UpesiPayClient] = PerAccount(
    lambda config: UpesiPayClient.from_settings(settings(), config.token.get_secret_value()), _fingerprint
)


def reset() -> None:
    """Forget every cached resource and the settings (tests and the demo switch environments with this)."""
    for cached in (
        engine,
        redis_client,
        _separate_guard_redis,
        _environment_account,
        guard,
        credentials_pause,
        upesipay,
    ):
        cached.cache_clear()
    with _accounts_lock:
        _accounts.clear()
    get_settings.cache_clear()


def _environment(name: str | None) -> bool:
    return name is None or name == settings().upesipay_account


# Callers that hold a payment's account use these: the environment's account goes through the zero-argument
# call, which is what a test replaces (monkeypatch.setattr(runtime, "upesipay", ...)).
def guard_of(name: str | None) -> Guard:
    return guard() if _environment(name) else guard(name)


def settings_of(name: str | None) -> Settings:
    """The settings with account `name`'s own limits (an unknown account: the deployment's)."""
    try:
        return account(name).with_limits(settings())
    except UnknownAccount:
        return settings()


def credentials_pause_of(name: str | None) -> CredentialsPause:
    return credentials_pause() if _environment(name) else credentials_pause(name)


def upesipay_of(name: str | None) -> UpesiPayClient:
    return upesipay() if _environment(name) else upesipay(name)
