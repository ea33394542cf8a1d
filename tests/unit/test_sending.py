"""The "What an answer proves" table (docs/ARCHITECTURE.md), row by row:
the real send path (claim, guard on a real Redis, UpesiPay client)
with UpesiPay's answers injected through httpx's transport seam. No broker: the task's publishing is not here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlmodel import col

from worker import runtime
from worker.dispatch import EXPIRED_REASON, _bulk_turns, expire_overdue
from worker.guard import Outcome
from worker.ledger import (
    Payment,
    PaymentState,
    create_schema,
    get_payment,
    mark,
    session_scope,
    transition,
    utcnow,
)
from worker.sending import SendResult, send_payment
from worker.settlement import ASSUMED_FAILURE, settle_from_status
from worker.upesipay import StatusResult, TransactionStatus, UpesiPayClient

Handler = Callable[[httpx.Request], httpx.Response]


class Provider:
    """What UpesiPay answers, swappable per test; counts the pushes that reached it."""

    def __init__(self) -> None:
        self.pushes: list[httpx.Request] = []
        self.handler: Handler = accepted

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.pushes.append(request)
        return self.handler(request)


def accepted(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        201,
        json={"success": True, "status": "QUEUED", "reference": "E8UWT7CLUW", "CheckoutRequestID": "ws_CO_1"},
    )


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> Iterator[Provider]:
    for name, value in {
        "UPESIPAY_BASE_URL": "http://upesipay.test",
        "UPESIPAY_AUTH_TOKEN": "tok_unit_secret",
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": "unit",
        "CALLBACK_BASE_URL": "http://callbacks.test",
        "CALLBACK_SECRET": "unit-callback-secret-0123",
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    create_schema(runtime.engine())
    fake = Provider()
    client = UpesiPayClient("http://upesipay.test", "tok_unit_secret", transport=httpx.MockTransport(fake))
    monkeypatch.setattr(runtime, "upesipay", lambda: client)
    yield fake
    client.close()
    monkeypatch.undo()
    runtime.reset()


def new_payment(reference: str = "INV-1", phone: str = "254712345678") -> Payment:
    payment = Payment(account="unit", external_reference=reference, phone=phone, amount=100, channel_id=2133)
    with session_scope(runtime.engine()) as session:
        session.add(payment)
        session.commit()
    return payment


def reload(payment: Payment) -> Payment:
    stored = get_payment(runtime.engine(), payment.id)
    assert stored is not None
    return stored


def test_201_awaits_the_callback_and_holds_the_reservation(provider: Provider) -> None:
    payment = new_payment()
    assert send_payment(payment.id) == (SendResult.ACCEPTED, None)
    stored = reload(payment)
    assert stored.state == PaymentState.AWAITING_CALLBACK
    assert (stored.provider_reference, stored.checkout_request_id) == ("E8UWT7CLUW", "ws_CO_1")
    assert runtime.guard().phone_snapshot(payment.phone).in_flight == 1
    body = provider.pushes[0].read()
    assert (
        b'"phone_number": "0712345678"' in body
        and b"/callbacks/upesipay/attempts/" + stored.guard_token.encode() in body
    )


def test_a_second_delivery_of_the_same_message_sends_nothing(provider: Provider) -> None:
    payment = new_payment()
    send_payment(payment.id)
    assert send_payment(payment.id) == (SendResult.NOT_CLAIMABLE, None)
    assert len(provider.pushes) == 1


def test_400_is_rejected_without_retry_and_counted_as_a_failure(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(400, json={"error_message": "Invalid request"})
    payment = new_payment()
    assert send_payment(payment.id) == (SendResult.REJECTED, None)
    stored = reload(payment)
    assert stored.state == PaymentState.REJECTED and "Invalid request" in (stored.provider_response or "")
    account = runtime.guard().account_snapshot()
    assert (account.failures_in_window, account.in_flight) == (1, 0)


def test_credentials_refused_pauses_every_send_without_consuming_attempts(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(401, json={"error_message": "Unauthenticated"})
    first, second = new_payment("A"), new_payment("B", phone="254712345679")
    assert send_payment(first.id)[0] == SendResult.PAUSED
    assert send_payment(second.id)[0] == SendResult.PAUSED
    assert len(provider.pushes) == 1  # the second never reached UpesiPay: the pause held it
    for payment in (first, second):
        stored = reload(payment)
        assert stored.state == PaymentState.DEFERRED and stored.attempts == 0 and stored.next_attempt_at
    assert runtime.guard().account_snapshot().in_flight == 0


def test_429_defers_until_retry_after_and_restricts_the_account(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(
        429, headers={"Retry-After": "120"}, json={"error_message": "Account restricted by abuse protection"}
    )
    payment = new_payment()
    assert send_payment(payment.id)[0] == SendResult.DEFERRED
    stored = reload(payment)
    assert stored.state == PaymentState.DEFERRED and stored.attempts == 0
    assert stored.next_attempt_at is not None
    wait = (stored.next_attempt_at - stored.updated_at).total_seconds()
    assert 119 <= wait <= 121
    account = runtime.guard().account_snapshot()
    assert account.restricted_until is not None and account.in_flight == 0


def test_429_naming_the_phone_blocks_only_that_number(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(
        429, headers={"Retry-After": "600"}, json={"error_message": "STK push blocked for this phone number"}
    )
    payment = new_payment()
    send_payment(payment.id)
    assert runtime.guard().phone_snapshot(payment.phone).blocked_until is not None
    assert runtime.guard().account_snapshot().restricted_until is None


def test_connection_failure_goes_back_to_pending_with_backoff_then_fails_after_the_budget(
    provider: Provider,
) -> None:
    from worker.attempts import attempts_of, mark_attempt

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    provider.handler = refuse
    payment = new_payment()
    result, retry = send_payment(payment.id)
    assert result == SendResult.RETRY and retry is not None and 0 < retry.countdown_s <= 300
    stored = reload(payment)
    assert stored.state == PaymentState.PENDING and stored.attempts == 1
    assert runtime.guard().account_snapshot().in_flight == 0  # reservation released: nothing was sent
    # However many attempts an outage takes, the payment keeps waiting within SEND_RETRY_FOR_S
    for _ in range(8):
        assert send_payment(payment.id)[0] == SendResult.RETRY
    assert reload(payment).state == PaymentState.PENDING
    # Once its first attempt is older than the budget, the next not-sent attempt fails it as never sent
    first = attempts_of(runtime.engine(), payment.id)[0]
    budget = runtime.settings().send_retry_for_s
    mark_attempt(runtime.engine(), first.id, created_at=first.created_at - timedelta(seconds=budget + 1))
    assert send_payment(payment.id) == (SendResult.GAVE_UP, None)
    stored = reload(payment)
    assert stored.state == PaymentState.FAILED and (stored.reason or "").startswith("never sent:")


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("timed out", request=r)),
        lambda r: (_ for _ in ()).throw(httpx.RemoteProtocolError("reset", request=r)),
        lambda _r: httpx.Response(502, text="bad gateway"),
    ],
    ids=["read-timeout", "reset-after-sending", "5xx"],
)
def test_an_ambiguous_answer_is_unknown_and_never_resent_blindly(provider: Provider, answer: Handler) -> None:
    provider.handler = answer
    payment = new_payment()
    assert send_payment(payment.id) == (SendResult.UNKNOWN, None)
    assert reload(payment).state == PaymentState.UNKNOWN
    assert runtime.guard().account_snapshot().in_flight == 1  # held until settlement
    assert send_payment(payment.id) == (SendResult.NOT_CLAIMABLE, None)
    assert len(provider.pushes) == 1


def test_guard_refusal_defers_with_its_reason_and_uses_no_attempt(provider: Provider) -> None:
    busy = new_payment("A")
    send_payment(busy.id)  # in flight on the number
    waiting = new_payment("B")
    assert send_payment(waiting.id)[0] == SendResult.DEFERRED
    stored = reload(waiting)
    assert (
        stored.state == PaymentState.DEFERRED
        and stored.reason == "guard: phone_busy"
        and stored.attempts == 0
    )
    assert len(provider.pushes) == 1


def test_redis_down_fails_closed_and_sends_nothing(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    monkeypatch.setattr(runtime, "redis_client", lambda: dead)
    runtime.guard.cache_clear()
    runtime.credentials_pause.cache_clear()
    payment = new_payment()
    assert send_payment(payment.id)[0] in {SendResult.DEFERRED, SendResult.PAUSED}
    assert reload(payment).state == PaymentState.DEFERRED
    assert provider.pushes == []


def test_status_settlement_then_late_success_takes_back_an_assumed_failure(provider: Provider) -> None:
    payment = new_payment()
    send_payment(payment.id)
    monkey_old = reload(payment)
    # Given no outcome for longer than the give-up time
    from datetime import timedelta

    from worker.attempts import get_attempt, mark_attempt

    assert monkey_old.guard_token is not None
    attempt = get_attempt(runtime.engine(), monkey_old.guard_token)
    assert attempt is not None and attempt.sent_at is not None
    # The attempt's own send time decides the age (polls refresh updated_at, never this).
    mark_attempt(runtime.engine(), attempt.id, sent_at=attempt.sent_at - timedelta(hours=4))
    queued = StatusResult(TransactionStatus.QUEUED, "E8UWT7CLUW", None, None, None, "queued", None)
    assert settle_from_status(reload(payment), queued) == "gave-up"
    stored = reload(payment)
    assert stored.state == PaymentState.FAILED and (stored.reason or "").startswith(ASSUMED_FAILURE)
    assert runtime.guard().account_snapshot().failures_in_window == 1
    # When the success finally arrives
    from worker.settlement import finish

    assert finish(stored, PaymentState.SUCCEEDED, receipt="SAE3YULR0Y")
    assert reload(payment).state == PaymentState.SUCCEEDED
    assert runtime.guard().account_snapshot().failures_in_window == 0


def settle_until_resent(payment: Payment, missing: StatusResult, monkeypatch: pytest.MonkeyPatch) -> str:
    """Give the UNKNOWN payment the evidence a resend needs (worker/ambiguous.py): the list trusted (the looser
    setting), the prompt's lifetime over, two lookups a spacing apart; returns the second settlement's result."""
    from sqlalchemy import update

    from worker.attempts import mark_attempt
    from worker.ledger import UnknownLookup
    from worker.settings import get_settings

    monkeypatch.setenv("UNKNOWN_RESEND_ON_LIST_ABSENCE", "true")
    get_settings.cache_clear()
    current = reload(payment)
    assert current.guard_token is not None
    mark_attempt(runtime.engine(), current.guard_token, sent_at=utcnow() - timedelta(hours=1))
    assert settle_from_status(current, missing) == "waiting"  # one lookup is not enough
    with runtime.engine().begin() as connection:
        connection.execute(update(UnknownLookup).values(asked_at=utcnow() - timedelta(minutes=30)))
    return settle_from_status(reload(payment), missing)


def test_unknown_with_no_trace_at_upesipay_is_sent_again(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider.handler = lambda _r: httpx.Response(503, text="unavailable")
    payment = new_payment()
    send_payment(payment.id)
    published: list[str] = []
    monkeypatch.setattr("worker.settlement.publish_payment", lambda pid, **_kw: published.append(pid) or True)
    missing = StatusResult(TransactionStatus.NOT_FOUND, None, None, None, None, "no such request", None)
    assert settle_until_resent(payment, missing, monkeypatch) == "resent"
    assert reload(payment).state == PaymentState.PENDING and published == [payment.id]
    assert runtime.guard().account_snapshot().in_flight == 0


def test_guard_outcome_names_match_the_design() -> None:
    assert {o.value for o in Outcome} == {"success", "failure", "released"}


def test_a_payment_past_its_deadline_expires_and_is_never_sent(provider: Provider) -> None:
    late = new_payment("LATE")
    mark(runtime.engine(), late.id, expires_at=utcnow() - timedelta(seconds=1))
    assert send_payment(late.id)[0] == SendResult.EXPIRED
    stored = reload(late)
    assert stored.state == PaymentState.EXPIRED and stored.reason == EXPIRED_REASON
    assert stored.settled_at is not None
    assert provider.pushes == []
    # A redelivered message finds nothing to do.
    assert send_payment(late.id)[0] == SendResult.NOT_CLAIMABLE
    assert provider.pushes == []


def test_a_payment_within_its_deadline_is_sent(provider: Provider) -> None:
    timely = new_payment("TIMELY")
    mark(runtime.engine(), timely.id, expires_at=utcnow() + timedelta(seconds=60))
    assert send_payment(timely.id)[0] == SendResult.ACCEPTED
    assert len(provider.pushes) == 1


def test_the_dispatcher_expires_waiting_payments_past_their_deadline_only(provider: Provider) -> None:
    engine = runtime.engine()
    overdue, open_ended, future = new_payment("O"), new_payment("N"), new_payment("F")
    for payment in (overdue, open_ended, future):
        transition(
            engine, payment.id, [PaymentState.PENDING], PaymentState.DEFERRED, reason="guard: account_budget"
        )
    mark(engine, overdue.id, expires_at=utcnow() - timedelta(seconds=1))
    mark(engine, future.id, expires_at=utcnow() + timedelta(hours=1))
    assert expire_overdue() == 1
    assert reload(overdue).state == PaymentState.EXPIRED
    assert reload(open_ended).state == PaymentState.DEFERRED
    assert reload(future).state == PaymentState.DEFERRED


def test_batch_rows_are_admitted_in_the_bulk_lane(provider: Provider) -> None:
    row = new_payment("ROW")
    mark(runtime.engine(), row.id, queue="bulk", batch_id="b1")
    single = new_payment("ONE", phone="254712345670")
    assert send_payment(row.id)[0] == SendResult.ACCEPTED
    assert send_payment(single.id)[0] == SendResult.ACCEPTED
    account = runtime.guard().account_snapshot()
    assert (account.in_flight, account.bulk_in_flight) == (2, 1)


def test_the_bulk_lane_is_shared_by_batch_fewest_in_flight_first(provider: Provider) -> None:
    engine = runtime.engine()
    big = [new_payment(f"BIG{i}", phone=f"2547120000{i:02d}") for i in range(8)]
    small = [new_payment(f"SMALL{i}", phone=f"2547130000{i:02d}") for i in range(3)]
    for i, payment in enumerate(big):
        mark(engine, payment.id, queue="bulk", batch_id="big")
        # Two of the big batch's rows are in flight already; the rest wait.
        to = PaymentState.AWAITING_CALLBACK if i < 2 else PaymentState.DEFERRED
        transition(engine, payment.id, [PaymentState.PENDING], to, next_attempt_at=utcnow())
    for payment in small:
        mark(engine, payment.id, queue="bulk", batch_id="small")
        transition(
            engine, payment.id, [PaymentState.PENDING], PaymentState.DEFERRED, next_attempt_at=utcnow()
        )
    waiting = col(Payment.state) == PaymentState.DEFERRED
    turns = _bulk_turns(waiting, 4)
    by_batch = {payment.id: batch for batch, rows in (("big", big), ("small", small)) for payment in rows}
    # The small batch has nothing in flight: it gets turns until it has as many as the big one, then they share.
    assert sorted(by_batch[i] for i in turns) == ["big", "small", "small", "small"]
    assert _bulk_turns(waiting, 0) == []
    # Bulk rows enqueued without a batch take their turns too.
    loose = new_payment("LOOSE", phone="254714000001")
    mark(engine, loose.id, queue="bulk")
    transition(engine, loose.id, [PaymentState.PENDING], PaymentState.DEFERRED, next_attempt_at=utcnow())
    assert loose.id in _bulk_turns(waiting, 20)


# ---- send attempts: each ending changes only its own attempt ----------------------------------------------------

FAILED_STATUS = StatusResult(TransactionStatus.FAILED, "E8UWT7CLUW", None, None, None, "failed", None)


def test_duplicate_settlement_pass_counts_once(provider: Provider) -> None:
    payment = new_payment()
    send_payment(payment.id)
    stale = reload(payment)  # what both passes read
    assert settle_from_status(stale, FAILED_STATUS) == "failed"
    assert settle_from_status(stale, FAILED_STATUS) == "unchanged"
    snapshot = runtime.guard().account_snapshot()
    assert (snapshot.failures_in_window, snapshot.in_flight) == (1, 0)
    assert reload(payment).state == PaymentState.FAILED


def test_racing_settlement_passes_settle_once(provider: Provider) -> None:
    import threading

    payment = new_payment()
    send_payment(payment.id)
    stale = reload(payment)
    start, results = threading.Barrier(2), []

    def settle_pass() -> None:
        start.wait()
        results.append(settle_from_status(stale, FAILED_STATUS))

    passes = [threading.Thread(target=settle_pass) for _ in range(2)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    assert sorted(results) == ["failed", "unchanged"]
    assert runtime.guard().account_snapshot().failures_in_window == 1
    from worker.attempts import attempts_of

    (attempt,) = attempts_of(runtime.engine(), payment.id)
    assert attempt.outcome is not None and attempt.outcome.value == "failure" and attempt.guard_resolved_at


def test_late_callback_and_stale_pass_of_an_earlier_attempt_leave_the_current_one_alone(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from worker.attempts import attempts_of
    from worker.signing import attempt_callback_url
    from worker.web.app import create_app

    # Given attempt 1 whose outcome was unknown, found absent at UpesiPay and sent again as attempt 2
    provider.handler = lambda _r: httpx.Response(503, text="unavailable")
    payment = new_payment()
    send_payment(payment.id)
    first = reload(payment)
    monkeypatch.setattr("worker.settlement.publish_payment", lambda *_a, **_kw: True)
    missing = StatusResult(TransactionStatus.NOT_FOUND, None, None, None, None, "no such request", None)
    assert settle_until_resent(first, missing, monkeypatch) == "resent"
    provider.handler = accepted
    assert send_payment(payment.id) == (SendResult.ACCEPTED, None)
    current = reload(payment)
    assert first.guard_token and current.guard_token and current.guard_token != first.guard_token
    # When attempt 1's callback arrives late, at the URL that names it, and a stale settlement pass of it runs
    body = {
        "response": {
            "Amount": 100,
            "CheckoutRequestID": "ws_CO_OLD",
            "ExternalReference": "INV-1",
            "Phone": "+254712345678",
            "ResultCode": 1032,
            "ResultDesc": "cancelled",
        }
    }
    url = attempt_callback_url(runtime.settings(), first.guard_token).replace("http://callbacks.test", "")
    answer = TestClient(create_app()).post(url, json=body)
    # UpesiPay's answer to attempt 1 was never recorded, so nothing can tell its callback from a forged one: it is
    # not applied (issue 15), and it touches attempt 2 even less
    assert answer.status_code == 409
    assert settle_from_status(first, FAILED_STATUS) == "unchanged"
    # Then attempt 2 is still the one in flight, untouched, and the guard counted nothing
    after = reload(payment)
    assert (after.state, after.guard_token) == (PaymentState.AWAITING_CALLBACK, current.guard_token)
    one, two = attempts_of(runtime.engine(), payment.id)
    assert (one.number, one.outcome and one.outcome.value) == (1, "released")
    assert (two.number, two.outcome) == (2, None)
    snapshot = runtime.guard().account_snapshot()
    assert (snapshot.failures_in_window, snapshot.in_flight) == (0, 1)
    # And attempt 2's own callback settles it
    body["response"]["CheckoutRequestID"] = "ws_CO_1"
    url = attempt_callback_url(runtime.settings(), current.guard_token).replace("http://callbacks.test", "")
    answer = TestClient(create_app()).post(url, json=body)
    assert answer.status_code == 200 and answer.json()["status"] == "applied"
    assert reload(payment).state == PaymentState.CANCELLED
    assert runtime.guard().account_snapshot().failures_in_window == 1


def test_verify_reports_and_repairs_only_a_reservation_whose_attempt_ended(provider: Provider) -> None:
    from datetime import timedelta

    from worker import reconcile
    from worker.attempts import end_attempt, mark_attempt
    from worker.ledger import AttemptOutcome, utcnow

    # Given a send whose attempt the ledger ended (released, and noted as told) while the guard kept its
    # reservation: a rebuild that read the attempt while it was still open
    payment = new_payment()
    send_payment(payment.id)
    token = reload(payment).guard_token
    assert token is not None
    assert reconcile.verify_guard().count == 0
    ended = end_attempt(
        runtime.engine(),
        token,
        AttemptOutcome.RELEASED,
        payment_from=[PaymentState.AWAITING_CALLBACK],
        payment_to=PaymentState.PENDING,
        guard_told=True,
        guard_token=None,
    )
    assert ended.attempt_ended and ended.payment_moved
    assert reconcile.verify_guard().count == 0  # within the settling time: it may be on its way
    mark_attempt(runtime.engine(), token, outcome_at=utcnow() - timedelta(seconds=10))
    # When beat verifies
    drift = reconcile.verify_guard(repair=True)
    # Then it names the leak, releases it, and the guard agrees with the ledger afterwards
    assert drift.repaired == 1 and any(token in item for item in drift.items)
    snapshot = runtime.guard().account_snapshot()
    assert (snapshot.in_flight, snapshot.failures_in_window) == (0, 0)
    assert reconcile.verify_guard().count == 0
