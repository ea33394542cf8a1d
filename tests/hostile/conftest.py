"""A stack for the hostile-input tests: real Redis (database 3 of the suite's private server), the web app and
the sandbox as their own processes, a SQLite ledger, and no worker or beat, so the messages a request publishes
stay on the broker where a test can count them. Processes' temporary folders (uploads, rejects) live inside the
stack's folder, removed with it."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlmodel import col, func, select

from tests.support import running_stack
from worker import runtime
from worker.ledger import Batch, Payment, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

# Personal data the hostile inputs carry: none of it may come back in an answer, a file we write, or a log.
PHONE = "0733445566"
PHONE_DIGITS = "733445566"  # in every form: 0733..., 254733..., +254 733 ...
NAME = "Wanjiru Kamau"
# The same digits with any separators (spaces, dashes, percent-escapes) between the groups.
PHONE_ANYWHERE = re.compile(r"733(?:[ -]|%20|%2D)?445(?:[ -]|%20|%2D)?566")


@pytest.fixture(scope="package")
def hostile_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    with running_stack(redis_server, 3, workers=0, beat=False, tmpdir_inside=True) as stack:
        yield stack


@dataclass(frozen=True)
class LedgerState:
    payments: int
    batches: int
    single_queue: int
    bulk_queue: int


def ledger_state(stack: Stack) -> LedgerState:
    client = runtime.redis_client()
    with session_scope(runtime.engine()) as session:
        payments = int(session.exec(select(func.count()).select_from(Payment)).one())
        batches = int(session.exec(select(func.count()).select_from(Batch)).one())
    return LedgerState(
        payments,
        batches,
        int(client.llen(f"{stack.key_prefix}single")),
        int(client.llen(f"{stack.key_prefix}bulk")),
    )


def payments_of_batch(batch_id: str) -> list[Payment]:
    with session_scope(runtime.engine()) as session:
        return list(session.exec(select(Payment).where(col(Payment.batch_id) == batch_id)).all())


def assert_no_personal_data(*texts: str) -> None:
    for text in texts:
        assert not PHONE_ANYWHERE.search(text), f"an unmasked phone number leaked: {text[:400]!r}"
        assert NAME not in text and NAME.split()[0] not in text, f"a name leaked: {text[:400]!r}"


def reference() -> str:
    return "H-" + secrets.token_hex(5).upper()
