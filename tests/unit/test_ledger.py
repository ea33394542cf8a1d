"""Ledger transitions are single conditional UPDATEs: the same contract on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from worker.ledger import (
    Payment,
    PaymentState,
    count_by_state,
    create_schema,
    get_payment,
    make_engine,
    session_scope,
    transition,
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url").replace("postgresql://", "postgresql+psycopg://", 1)
    engine = make_engine(url)
    create_schema(engine)
    yield engine
    if request.param == "postgres":
        with engine.begin() as connection:
            for table in ("webhook_delivery", "event", "send_attempt", "guard_block", "payment"):
                connection.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608  (fixed names)
    engine.dispose()


def add(engine: Engine, reference: str = "INV-1", account: str = "acct") -> Payment:
    payment = Payment(
        account=account, external_reference=reference, phone="254712345678", amount=10, channel_id=1
    )
    with session_scope(engine) as session:
        session.add(payment)
        session.commit()
    return payment


def test_a_transition_moves_only_from_the_named_states(engine: Engine) -> None:
    payment = add(engine)
    assert transition(engine, payment.id, [PaymentState.PENDING], PaymentState.SENDING, guard_token="t1")
    assert not transition(engine, payment.id, [PaymentState.PENDING], PaymentState.SENDING, guard_token="t2")
    stored = get_payment(engine, payment.id)
    assert stored is not None and stored.state == PaymentState.SENDING and stored.guard_token == "t1"


def test_terminal_transitions_stamp_settled_at(engine: Engine) -> None:
    payment = add(engine)
    transition(engine, payment.id, [PaymentState.PENDING], PaymentState.REJECTED, reason="bad")
    stored = get_payment(engine, payment.id)
    assert stored is not None and stored.settled_at is not None and stored.reason == "bad"


def test_external_reference_is_unique_per_account(engine: Engine) -> None:
    add(engine, "INV-9", "acct-a")
    add(engine, "INV-9", "acct-b")
    with pytest.raises(IntegrityError):
        add(engine, "INV-9", "acct-a")


def test_racing_claims_let_exactly_one_win(engine: Engine) -> None:
    payment = add(engine)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        wins.append(transition(engine, payment.id, [PaymentState.PENDING], PaymentState.SENDING))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1 and len(wins) == 8


def test_counts_by_state_cover_every_state(engine: Engine) -> None:
    add(engine, "A")
    second = add(engine, "B")
    transition(engine, second.id, [PaymentState.PENDING], PaymentState.DEFERRED)
    counts = count_by_state(engine, "acct")
    assert (
        counts["PENDING"] == 1 and counts["DEFERRED"] == 1 and set(counts) == {s.value for s in PaymentState}
    )
