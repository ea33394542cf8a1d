"""A batch stops itself before it burns the budget: each trigger, holding, resuming and the claim's throttle, over
the real send path (ledger on SQLite, guard on the suite's Redis) with UpesiPay's answers injected (httpx seam)."""

from __future__ import annotations

import httpx
import pytest

from producers.batch import batch_status
from tests.unit import test_sending
from tests.unit.test_sending import Provider, new_payment, reload
from worker import batch_brake, runtime
from worker.ledger import Batch, Payment, PaymentState, mark, session_scope, transition
from worker.sending import SendResult, send_payment
from worker.settings import get_settings
from worker.settlement import finish

WRONG_CHANNEL = "Invalid request"
# The send path's fixture (settings, ledger, guard, UpesiPay behind httpx's MockTransport), shared as is.
provider = test_sending.provider


def rejected(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(400, json={"error_message": WRONG_CHANNEL})


def new_batch() -> str:
    batch = Batch(account="unit", source_name="invoices.csv")
    with session_scope(runtime.engine()) as session:
        session.add(batch)
        session.commit()
    return batch.id


def batch_row(batch_id: str, n: int) -> Payment:
    payment = new_payment(f"{batch_id[:6]}-{n}", phone=f"2547140{n:05d}")
    mark(runtime.engine(), payment.id, queue="bulk", batch_id=batch_id)
    return reload(payment)


def test_k_rejections_with_the_same_error_pause_the_batch_after_k_pushes(provider: Provider) -> None:
    provider.handler = rejected
    batch_id = new_batch()
    rows = [batch_row(batch_id, n) for n in range(8)]
    results = [send_payment(row.id)[0] for row in rows]
    k = runtime.settings().batch_pause_rejections
    # The pause held the waiting rows at once: their messages find nothing to claim.
    assert results == [SendResult.REJECTED] * k + [SendResult.NOT_CLAIMABLE] * (8 - k)
    assert len(provider.pushes) == k
    for row in rows[k:]:
        held = reload(row)
        assert held.state == PaymentState.DEFERRED and held.next_attempt_at is None
        assert (held.reason or "").startswith(batch_brake.HELD_PREFIX)
    status = batch_status(batch_id)
    assert status is not None and status["paused"]
    assert f"{k} rejections in a row with the same error" in status["pause_reason"]
    # Single payments go on.
    provider.handler = lambda _request: httpx.Response(
        201, json={"success": True, "status": "QUEUED", "reference": "R1", "CheckoutRequestID": "ws_CO_9"}
    )
    single = new_payment("SINGLE-ON", phone="254715000001")
    assert send_payment(single.id)[0] == SendResult.ACCEPTED


def test_rejections_with_different_errors_do_not_pause(provider: Provider) -> None:
    details = iter(f"error {n}" for n in range(10))
    provider.handler = lambda _request: httpx.Response(400, json={"error_message": next(details)})
    batch_id = new_batch()
    for n in range(6):
        assert send_payment(batch_row(batch_id, n).id)[0] == SendResult.REJECTED
    status = batch_status(batch_id)
    assert status is not None and not status["paused"]


def test_a_resumed_batch_releases_its_held_rows_and_forgets_the_old_run(provider: Provider) -> None:
    provider.handler = rejected
    batch_id = new_batch()
    rows = [batch_row(batch_id, n) for n in range(7)]
    for row in rows:
        send_payment(row.id)
    assert batch_brake.resume(batch_id) == 2
    assert batch_brake.resume(batch_id) is None  # not paused any more
    for row in rows[5:]:
        released = reload(row)
        assert released.state == PaymentState.DEFERRED and released.next_attempt_at is not None
        assert released.reason == "batch resumed"
    # The old rejections no longer count: one more is not a run of K.
    transition(runtime.engine(), rows[5].id, [PaymentState.DEFERRED], PaymentState.PENDING)
    assert send_payment(rows[5].id)[0] == SendResult.REJECTED
    status = batch_status(batch_id)
    assert status is not None and not status["paused"] and status["resumed_at"] is not None


def test_a_batch_row_waits_while_k_of_its_sends_are_unanswered_or_rejected_in_a_row(
    provider: Provider,
) -> None:
    provider.handler = rejected
    batch_id = new_batch()
    k = runtime.settings().batch_pause_rejections
    rows = [batch_row(batch_id, n) for n in range(k + 1)]
    # k - 2 rejections in a row, and two sends of the batch in the middle of their HTTP call.
    for row in rows[: k - 2]:
        assert send_payment(row.id)[0] == SendResult.REJECTED
    for row in rows[k - 2 : k]:
        transition(runtime.engine(), row.id, [PaymentState.PENDING], PaymentState.SENDING)
    assert send_payment(rows[k].id)[0] == SendResult.HELD
    waiting = reload(rows[k])
    assert waiting.state == PaymentState.DEFERRED and waiting.next_attempt_at is not None
    assert len(provider.pushes) == k - 2


def _accept_then_settle(rows: list[Payment], state: PaymentState, provider: Provider) -> None:
    provider.handler = lambda _request: httpx.Response(
        201, json={"success": True, "status": "QUEUED", "reference": "R", "CheckoutRequestID": "ws"}
    )
    for row in rows:
        assert send_payment(row.id)[0] == SendResult.ACCEPTED
        finish(reload(row), state, result_code=1037 if state != PaymentState.SUCCEEDED else 0)


def test_a_failure_rate_far_above_the_accounts_norm_pauses_the_batch(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_PAUSE_OUTCOMES", "4")
    get_settings.cache_clear()
    singles = [new_payment(f"OK-{n}", phone=f"2547160{n:05d}") for n in range(4)]
    _accept_then_settle(singles, PaymentState.SUCCEEDED, provider)
    batch_id = new_batch()
    rows = [batch_row(batch_id, n) for n in range(6)]
    _accept_then_settle(rows[:4], PaymentState.FAILED, provider)
    status = batch_status(batch_id)
    assert status is not None and status["paused"]
    assert "100% of its last 4 outcomes failed (account norm 0%" in status["pause_reason"]
    assert reload(rows[4]).state == PaymentState.DEFERRED
    # A row that comes back to PENDING while the batch is paused (a retry, say) is held by its claim.
    transition(runtime.engine(), rows[4].id, [PaymentState.DEFERRED], PaymentState.PENDING)
    assert send_payment(rows[4].id)[0] == SendResult.HELD
    assert (reload(rows[4]).reason or "").startswith(batch_brake.HELD_PREFIX)


def test_a_failure_rate_near_the_accounts_norm_does_not_pause(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_PAUSE_OUTCOMES", "4")
    get_settings.cache_clear()
    # The account's other traffic fails half the time: 3 of 4 failing is within the norm plus the margin (0.8).
    singles = [new_payment(f"MIX-{n}", phone=f"2547170{n:05d}") for n in range(4)]
    _accept_then_settle(singles[:2], PaymentState.SUCCEEDED, provider)
    _accept_then_settle(singles[2:], PaymentState.FAILED, provider)
    batch_id = new_batch()
    rows = [batch_row(batch_id, n) for n in range(4)]
    _accept_then_settle(rows[:1], PaymentState.SUCCEEDED, provider)
    _accept_then_settle(rows[1:], PaymentState.FAILED, provider)
    status = batch_status(batch_id)
    assert status is not None and not status["paused"]


def test_a_bulk_message_sends_the_row_of_the_batch_with_the_fewest_sends_in_flight(
    provider: Provider,
) -> None:
    provider.handler = lambda _request: httpx.Response(
        201, json={"success": True, "status": "QUEUED", "reference": "R", "CheckoutRequestID": "ws"}
    )
    big, small = new_batch(), new_batch()
    big_rows = [batch_row(big, n) for n in range(4)]
    small_rows = [batch_row(small, 10 + n) for n in range(2)]
    assert send_payment(big_rows[0].id)[0] == SendResult.ACCEPTED  # big: one in flight, small: none
    # big's next message is small's turn: small's oldest row goes out, big's row keeps waiting for a message.
    assert send_payment(big_rows[1].id)[0] == SendResult.ACCEPTED
    assert reload(small_rows[0]).state == PaymentState.AWAITING_CALLBACK
    # It waits PENDING for another message, or (BULK_ORDER=score, the default) DEFERRED due at once: the message it
    # had was spent, so the dispatcher or the next message takes it (worker/bulk_turns.py).
    assert reload(big_rows[1]).state in {PaymentState.PENDING, PaymentState.DEFERRED}
    # small's own message finds its row gone: it is small's turn still (one each), so small's next row goes.
    assert send_payment(small_rows[0].id)[0] == SendResult.ACCEPTED
    assert reload(small_rows[1]).state == PaymentState.AWAITING_CALLBACK
    # big's next messages send big's rows; small1's message, its row gone and small done, sends big's waiting row.
    assert send_payment(big_rows[2].id)[0] == SendResult.ACCEPTED
    assert send_payment(big_rows[3].id)[0] == SendResult.ACCEPTED
    assert send_payment(small_rows[1].id)[0] == SendResult.ACCEPTED
    assert {reload(row).state for row in big_rows + small_rows} == {PaymentState.AWAITING_CALLBACK}
    assert len(provider.pushes) == 6
