"""Per-process resources built once from the settings: database engine, Redis client, guard, UpesiPay client.

Celery's prefork pool forks after import, so everything here is built lazily, on first use in the child.
"""

from __future__ import annotations

from functools import lru_cache

import redis
from sqlalchemy import Engine

from worker.guard import Guard, GuardLimits
from worker.ledger import make_engine
from worker.pause import CredentialsPause
from worker.settings import Settings, get_settings
from worker.upesipay import UpesiPayClient


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


@lru_cache(maxsize=1)
def guard() -> Guard:
    current = settings()
    return Guard(redis_client(), current.upesipay_account, GuardLimits.from_settings(current))


@lru_cache(maxsize=1)
def credentials_pause() -> CredentialsPause:
    return CredentialsPause(redis_client(), settings().upesipay_account)


@lru_cache(maxsize=1)
def upesipay() -> UpesiPayClient:
    return UpesiPayClient.from_settings(settings())


def reset() -> None:
    """Forget every cached resource and the settings (tests and the demo switch environments with this)."""
    for cached in (engine, redis_client, guard, credentials_pause, upesipay):
        cached.cache_clear()
    get_settings.cache_clear()
