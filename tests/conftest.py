"""Shared fixtures. Servers the tests need are started here, privately, and stopped here.

Redis: a redis-server of the suite's own on a free port (never the machine's shared one, which we did not create
and must not flush). PostgreSQL: a schema of our own in the `test` database, dropped afterwards; skipped on a
laptop without a server, required when CI=true.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from worker.local.embedded_redis import EmbeddedRedis

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    """A clean database on the suite's private Redis (safe to flush: this suite started that server)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI but does not answer")
    pytest.skip(f"{what} does not answer (required only in CI)")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private schema in the `test` database, dropped at the end; the URL selects it via search_path."""
    import secrets

    import psycopg

    base = os.environ.get("STKPUSH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        connection = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        _unavailable("PostgreSQL")
        raise
    schema = f"stkpush_test_{secrets.token_hex(4)}"
    connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        connection.close()


@pytest.fixture
def shared_redis_url() -> str:
    """The machine's shared Redis: used only under a private key prefix, for tests that prove we leave no litter."""
    from worker.local.embedded_redis import redis_answers

    url = os.environ.get("STKPUSH_TEST_SHARED_REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(url):
        _unavailable("the shared Redis")
    return url
