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

from sqlalchemy import Connection, Engine, Index, UniqueConstraint, event, false, update
from sqlalchemy import select as table_select
from sqlalchemy.dialects import postgresql, sqlite
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
    EXPIRED = "EXPIRED"  # its deadline (expires_at) passed before it could be sent; never sent


TERMINAL_STATES = frozenset(
    {
        PaymentState.SUCCEEDED,
        PaymentState.FAILED,
        PaymentState.CANCELLED,
        PaymentState.REJECTED,
        PaymentState.EXPIRED,
    }
)
# The states a payment waits in before it is sent: a deadline or a batch pause applies to these.
WAITING_STATES = (PaymentState.PENDING, PaymentState.DEFERRED)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_payment_id() -> str:
    return uuid.uuid4().hex


def new_external_reference() -> str:
    return "STK-" + secrets.token_hex(6).upper()


class Payment(SQLModel, table=True):
    __tablename__ = "payment"
    __table_args__ = (
        UniqueConstraint("account", "external_reference", name="uq_payment_account_reference"),
        # A batch's rows by state: the bulk lane's turns and a batch's brake count these on every batch send.
        Index("ix_payment_batch_state", "batch_id", "state"),
        # The bulk order (worker/bulk_order.py): a batch's next rows by score come off this index; only a tie is sorted.
        Index("ix_payment_batch_order", "batch_id", "state", "score"),
    )

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
    # The id of the current send attempt (worker.attempts): the guard token, and the attempt every transition
    # caused by a send must still be current for. Kept while the payment is in flight and once it ended.
    guard_token: str | None = Field(default=None, max_length=64)
    # Not sent by then: EXPIRED instead (a customer who left the checkout must not be prompted). None: no deadline.
    expires_at: datetime | None = None

    provider_reference: str | None = Field(default=None, max_length=64, index=True)
    checkout_request_id: str | None = Field(default=None, max_length=100)
    receipt: str | None = Field(default=None, max_length=64)
    result_code: int | None = None
    result_desc: str | None = Field(default=None, max_length=255)
    provider_status_code: int | None = None
    provider_response: str | None = Field(default=None, max_length=2048)  # masked, for the operator
    # Callbacks that came before UpesiPay's 201 was recorded, as a JSON list; applied (or dropped) once the
    # CheckoutRequestID is known. See worker.provider_callback.
    held_callbacks: str | None = Field(default=None, max_length=4096)
    # Batch rows: the number's expected chance to pay, from its history on this account when the row was recorded
    # (worker/scoring.py; docs/batches.md "Release order"). The bulk lane's order under BULK_ORDER=score.
    score: float | None = None

    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    queued_at: datetime | None = None
    sent_at: datetime | None = None
    settled_at: datetime | None = None


class AttemptOutcome(StrEnum):
    """How one send attempt ended, in the guard's terms (worker.attempts maps each to a guard call)."""

    SUCCESS = "success"  # the customer paid: the number's streak resets
    FAILURE = (
        "failure"  # failed, cancelled, rejected, or assumed failed: counted in the window and the streak
    )
    RELEASED = (
        "released"  # nothing reached the customer (not sent, rate limited, provably unknown to UpesiPay)
    )
    REFUSED = "refused"  # the guard (or a pause) said not yet: nothing was reserved, nothing is owed
    REVERTED = "reverted"  # a late success took back an assumed failure: neither a failure nor a reset


class SendAttempt(SQLModel, table=True):
    """One push attempt of a payment. Its id is the guard token; the ledger owes the guard its outcome until
    `guard_resolved_at` says the guard was told (worker.reconcile pays what is owed)."""

    __tablename__ = "send_attempt"

    id: str = Field(primary_key=True, max_length=64)
    payment_id: str = Field(max_length=32, index=True, foreign_key="payment.id")
    account: str = Field(max_length=64, index=True)
    number: int  # 1 for the payment's first attempt
    lane: str = Field(default="single", max_length=16)  # the payment's queue when it was claimed
    # Set once, at the claim: the age settlement and the give-up rule use when nothing was recorded as sent.
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = None  # UpesiPay answered (201, or an ambiguous answer)
    provider_reference: str | None = Field(default=None, max_length=64)
    checkout_request_id: str | None = Field(default=None, max_length=100)
    outcome: AttemptOutcome | None = Field(default=None, max_length=16, index=True)
    outcome_at: datetime | None = Field(default=None, index=True)
    guard_resolved_at: datetime | None = Field(default=None, index=True)
    # The send provably never reached UpesiPay (connection refused, DNS, a 502/503 page): SEND_RETRY_FOR_S runs
    # from the first of a payment's trailing run of these (worker/retry.py).
    not_sent: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class GuardBlockKind(StrEnum):
    ACCOUNT = "account"  # the provider restricted the whole account
    PHONE = "phone"  # the provider blocked one number for this account


class GuardBlock(SQLModel, table=True):
    """A restriction or block the provider announced, kept so that a guard rebuilt from the ledger has it."""

    __tablename__ = "guard_block"

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(max_length=64, index=True)
    kind: GuardBlockKind = Field(max_length=16)
    phone: str | None = Field(default=None, max_length=12)  # personal data: never logged unmasked
    until: datetime = Field(index=True)
    reason: str = Field(max_length=120)  # masked, as the guard stores it
    created_at: datetime = Field(default_factory=utcnow)


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
    # Paused by its own outcomes (worker/batch_brake.py): its waiting rows are held until an operator resumes it.
    paused_at: datetime | None = None
    pause_reason: str | None = Field(default=None, max_length=500)
    # Outcomes before this are not held against the batch again after a resume.
    resumed_at: datetime | None = None
    # Opt-in re-prompts (worker/reprompts.py): a row whose prompt was cancelled or not answered gets up to
    # reprompt_max further prompts, each at least reprompt_after_s after the previous one ended. 0: never twice.
    reprompt_max: int = 0
    reprompt_after_s: int | None = None


class PhoneRelease(SQLModel, table=True):
    """An operator freed a number held at its streak limit (`stkpush guard release`): its streak starts afresh
    from then. Kept so that a guard rebuilt from the ledger keeps the release (worker/guard_ledger.py)."""

    __tablename__ = "phone_release"

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(max_length=64, index=True)
    phone: str = Field(max_length=12)  # canonical; personal data: never logged unmasked
    released_at: datetime = Field(default_factory=utcnow)
    released_by: str = Field(max_length=64)


class ExternalFailure(SQLModel, table=True):
    """A failed push the account made without stkpush (payment buttons, the dashboard), read from UpesiPay's
    transactions list. It fills the provider's failure window, so the guard counts it (worker/other_channels.py);
    the ledger keeps it so the count survives Redis."""

    __tablename__ = "external_failure"

    account: str = Field(primary_key=True, max_length=64)
    provider_reference: str = Field(primary_key=True, max_length=64)
    failed_at: datetime = Field(index=True)
    seen_at: datetime = Field(default_factory=utcnow)
    guard_told_at: datetime | None = None  # None: the guard has not confirmed counting it yet


class PaymentReopen(SQLModel, table=True):
    """An operator (or the API) re-opened a FAILED payment that never reached UpesiPay (`stkpush retry`,
    worker/retry.py): FAILED -> PENDING, its send budget starting afresh from `reopened_at`."""

    __tablename__ = "payment_reopen"

    id: int | None = Field(default=None, primary_key=True)
    payment_id: str = Field(max_length=32, index=True, foreign_key="payment.id")
    reopened_at: datetime = Field(default_factory=utcnow)
    reopened_by: str = Field(max_length=64)
    previous_reason: str | None = Field(default=None, max_length=500)


class UnknownLookup(SQLModel, table=True):
    """One lookup about an UNKNOWN (ambiguous) send attempt: what UpesiPay said (worker/ambiguous.py). Resending
    needs enough spaced "no such request" answers; kept here so a crash between lookups keeps the evidence, and
    the unique (attempt, slot) key counts each spaced lookup once however many workers ask."""

    __tablename__ = "unknown_lookup"
    __table_args__ = (UniqueConstraint("attempt_id", "slot", name="uq_unknown_lookup_attempt_slot"),)

    id: int | None = Field(default=None, primary_key=True)
    attempt_id: str = Field(max_length=64, index=True, foreign_key="send_attempt.id")
    slot: int  # which spaced lookup this is (0, 1, ...): at most one answer counts per slot
    source: str = Field(max_length=16)  # "status" (by provider reference) or "list" (by external reference)
    answer: str = Field(max_length=16)  # a TransactionStatus value
    asked_at: datetime = Field(default_factory=utcnow)


class Account(SQLModel, table=True):
    """An UpesiPay account of a merchant (worker/accounts.py): its channels, its own limits (None: the settings'),
    and its token, encrypted under ACCOUNT_TOKEN_KEY (worker/secrets_box.py). The environment's account
    (UPESIPAY_ACCOUNT) is not stored here: it stays configured by the settings."""

    __tablename__ = "account"

    name: str = Field(primary_key=True, max_length=64)
    channel_ids: str = Field(max_length=255)  # comma-separated; the first is the default channel
    token_ciphertext: str = Field(max_length=2048)  # Fernet; never decrypted outside worker.accounts
    phone_streak_limit: int | None = None
    account_failure_limit: int | None = None
    interactive_reserve: int | None = None
    bulk_max_inflight: int | None = None
    disabled: bool = False  # nothing is enqueued or sent for it; its rows wait
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    token_updated_at: datetime = Field(default_factory=utcnow)
    # SHA-256 of the account's own API key (`stkpush account add` shows the key once): the key itself is never
    # stored. A key found here acts for this account only (worker/web/access.py).
    api_key_hash: str | None = Field(default=None, max_length=64, unique=True, index=True)


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
    *,
    attempt_id: str | None = None,
    **fields: Any,
) -> bool:
    """Move one payment from any of `from_states` to `to_state`; True only if this call moved it.

    With `attempt_id`, only while that attempt is still the payment's current one (its guard_token)."""
    allowed = [state.value for state in from_states]
    values = {"state": to_state, "updated_at": utcnow(), **fields}
    if to_state in TERMINAL_STATES and "settled_at" not in fields:
        values["settled_at"] = values["updated_at"]
    statement = update(Payment).where(col(Payment.id) == payment_id, col(Payment.state).in_(allowed))
    if attempt_id is not None:
        statement = statement.where(col(Payment.guard_token) == attempt_id)
    statement = statement.values(**values)
    committed = None
    with engine.begin() as connection:
        moved = bool(connection.execute(statement).rowcount == 1)
        if moved:
            committed = record_event(connection, payment_id, to_state, allowed)
    if moved:
        log_state_change(payment_id, to_state.value, fields.get("reason"))
    announce_event(committed)
    return moved


def record_event(
    connection: Connection, payment_id: str, to_state: PaymentState, from_states: Iterable[str]
) -> events.CommittedEvent | None:
    """The outbox, inside the transaction of a change that just moved the payment to `to_state`: the merchant's
    event commits with the change or not at all. Every writer of a terminal state calls it (transition, the
    attempt endings in worker/attempts.py)."""
    if to_state not in TERMINAL_STATES:
        return None
    table = Payment.__table__  # type: ignore[attr-defined]
    row = connection.execute(table_select(table).where(col(Payment.id) == payment_id)).one()
    return events.record_for_transition(connection, row, frozenset(from_states))


def announce_event(committed: events.CommittedEvent | None) -> None:
    """After the commit: wake what listens (webhook release, `?wait=`); a missed wake-up is caught by beat."""
    if committed is not None:
        events.announce([committed])


def insert_ignoring_conflicts(
    connection: Connection, table: Any, index_elements: list[str] | None = None
) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on the connection's dialect: a row another writer recorded first is
    skipped, not an error (batch re-runs, a list read twice). `index_elements` names the unique key."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=index_elements)
    if connection.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=index_elements)
    raise AssertionError("the settings accept only SQLite and PostgreSQL")  # pragma: no cover


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
