"""The ledger: payments, their states, and every transition as one conditional UPDATE.

The database is the source of truth. A transition names the states it may leave (`WHERE id = ? AND state IN
(...)`), so a duplicate task delivery, a duplicate callback or two racing workers change nothing twice: the
loser's UPDATE matches no row and it learns so from the row count.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, UniqueConstraint, event, update
from sqlalchemy import select as table_select
from sqlalchemy.engine import make_url
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from worker import events
from worker.logs import log_state_change


class PaymentState(StrEnum):
    PENDING = "PENDING"  # recorded; a stk_push message is (or should be) queued
    DEFERRED = "DEFERRED"  # the guard said not yet; waits for next_attempt_at in the database
    SENDING = "SENDING"  # claimed by one worker
    AWAITING_CALLBACK = "AWAITING_CALLBACK"  # UpesiPay answered 201
    UNKNOWN = "UNKNOWN"  # the request may or may not have reached UpesiPay: settle, never resend blindly
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"  # UpesiPay refused the request itself; the customer was never prompted


TERMINAL_STATES = frozenset(
    {PaymentState.SUCCEEDED, PaymentState.FAILED, PaymentState.CANCELLED, PaymentState.REJECTED}
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_payment_id() -> str:
    return uuid.uuid4().hex


def new_external_reference() -> str:
    return "STK-" + secrets.token_hex(6).upper()


class Payment(SQLModel, table=True):
    __tablename__ = "payment"
    __table_args__ = (UniqueConstraint("account", "external_reference", name="uq_payment_account_reference"),)

    id: str = Field(default_factory=new_payment_id, primary_key=True, max_length=32)
    account: str = Field(max_length=64, index=True)
    external_reference: str = Field(max_length=64)
    phone: str = Field(
        max_length=12, index=True
    )  # canonical 2547XXXXXXXX; personal data: never logged unmasked
    amount: int
    customer_name: str | None = Field(default=None, max_length=100)
    channel_id: int
    queue: str = Field(default="single", max_length=16)
    batch_id: str | None = Field(default=None, max_length=32, index=True)

    state: PaymentState = Field(default=PaymentState.PENDING, max_length=20, index=True)
    reason: str | None = Field(default=None, max_length=500)  # why it is deferred, rejected, failed
    attempts: int = 0  # sends that consumed a retry (connection failures); guard waits never do
    next_attempt_at: datetime | None = Field(default=None, index=True)
    guard_token: str | None = Field(default=None, max_length=64)

    provider_reference: str | None = Field(default=None, max_length=64, index=True)
    checkout_request_id: str | None = Field(default=None, max_length=100)
    receipt: str | None = Field(default=None, max_length=64)
    result_code: int | None = None
    result_desc: str | None = Field(default=None, max_length=255)
    provider_status_code: int | None = None
    provider_response: str | None = Field(default=None, max_length=2048)  # masked, for the operator

    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    queued_at: datetime | None = None
    sent_at: datetime | None = None
    settled_at: datetime | None = None


class BatchState(StrEnum):
    INGESTING = "INGESTING"  # rows are being read and recorded
    INGESTED = "INGESTED"  # every good row recorded and queued (bad rows in the rejects file)
    ABORTED = "ABORTED"  # --all-or-nothing found a bad row: nothing recorded
    FAILED = "FAILED"  # ingestion stopped on an error (unreadable file, say); `error` says why


class Batch(SQLModel, table=True):
    """One bulk invoice file. Its payments carry `batch_id`; counts by state come from them."""

    __tablename__ = "batch"

    id: str = Field(default_factory=new_payment_id, primary_key=True, max_length=32)
    account: str = Field(max_length=64, index=True)
    source_name: str = Field(max_length=255)  # the file's base name, for operators
    state: BatchState = Field(default=BatchState.INGESTING, max_length=16)
    all_or_nothing: bool = False
    rows_total: int = 0
    rows_recorded: int = 0
    rows_rejected: int = 0  # bad rows, listed in the rejects file
    rows_skipped: int = 0  # already recorded by an earlier run with the same details
    rows_conflicting: int = 0  # reference reused with other details
    amount_requested: int = 0
    error: str | None = Field(default=None, max_length=500)
    rejects_path: str | None = Field(default=None, max_length=1024)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None


def make_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        # Several worker processes share one SQLite file: WAL lets readers run beside the writer, and the
        # busy timeout makes a writer wait for the lock instead of failing.
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # PostgreSQL: a private schema is selected with libpq's own `?options=-csearch_path%3Dname` (the tests do).
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


def get_payment(engine: Engine, payment_id: str) -> Payment | None:
    with session_scope(engine) as session:
        return session.get(Payment, payment_id)


def find_by_reference(engine: Engine, account: str, external_reference: str) -> Payment | None:
    with session_scope(engine) as session:
        statement = select(Payment).where(
            Payment.account == account, Payment.external_reference == external_reference
        )
        return session.exec(statement).first()


def transition(
    engine: Engine,
    payment_id: str,
    from_states: Iterable[PaymentState],
    to_state: PaymentState,
    **fields: Any,
) -> bool:
    """Move one payment from any of `from_states` to `to_state`; True only if this call moved it."""
    allowed = [state.value for state in from_states]
    values = {"state": to_state, "updated_at": utcnow(), **fields}
    if to_state in TERMINAL_STATES and "settled_at" not in fields:
        values["settled_at"] = values["updated_at"]
    statement = (
        update(Payment).where(col(Payment.id) == payment_id, col(Payment.state).in_(allowed)).values(**values)
    )
    committed = None
    with engine.begin() as connection:
        moved = bool(connection.execute(statement).rowcount == 1)
        if moved and to_state in TERMINAL_STATES:
            # The outbox: the merchant's event commits with the change or not at all.
            table = Payment.__table__  # type: ignore[attr-defined]
            row = connection.execute(table_select(table).where(col(Payment.id) == payment_id)).one()
            committed = events.record_for_transition(connection, row, frozenset(allowed))
    if moved:
        log_state_change(payment_id, to_state.value, fields.get("reason"))
    if committed is not None:
        events.announce([committed])
    return moved


def mark(engine: Engine, payment_id: str, **fields: Any) -> None:
    """Set bookkeeping fields that carry no state change (queued_at, for example)."""
    with engine.begin() as connection:
        connection.execute(
            update(Payment).where(col(Payment.id) == payment_id).values(updated_at=utcnow(), **fields)
        )


def count_by_state(engine: Engine, account: str | None = None) -> dict[str, int]:
    from sqlalchemy import func

    with session_scope(engine) as session:
        statement = select(Payment.state, func.count()).group_by(Payment.state)
        if account is not None:
            statement = statement.where(Payment.account == account)
        rows = session.exec(statement).all()
    counts = {state.value: 0 for state in PaymentState}
    for state, count in rows:
        counts[PaymentState(state).value] = int(count)
    return counts
