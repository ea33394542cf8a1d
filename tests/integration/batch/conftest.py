"""A stack for the batch tests: real Redis, the real web app over HTTP, the sandbox, a SQLite ledger, and no
worker or beat, so the messages a batch publishes stay on the broker where a test can count them."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlmodel import col, func, select

from tests.support import running_stack
from worker import runtime
from worker.ledger import Payment, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

HEADER = "external_reference,phone_number,amount,customer_name\n"


@pytest.fixture(scope="package")
def batch_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    # Database 2 of the suite's private Redis, under the stack's own key prefix. The web process keeps uploads
    # and rejects files under its temporary folder: point that into the stack's folder, removed at the end.
    with running_stack(redis_server, 6, workers=0, beat=False, tmpdir_inside=True) as stack:
        yield stack


def queue_length(stack: Stack, queue: str = "bulk") -> int:
    return int(runtime.redis_client().llen(f"{stack.key_prefix}{queue}"))


def payments_with_references(references: list[str]) -> list[Payment]:
    with session_scope(runtime.engine()) as session:
        return list(
            session.exec(select(Payment).where(col(Payment.external_reference).in_(references))).all()
        )


def payment_count() -> int:
    with session_scope(runtime.engine()) as session:
        return int(session.exec(select(func.count()).select_from(Payment)).one())


@pytest.fixture
def prefix() -> str:
    """A reference prefix of this test's own, so tests never see each other's payments."""
    return "B" + secrets.token_hex(4).upper() + "-"


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[..., Path]:
    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    return write
