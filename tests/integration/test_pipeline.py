"""End to end over real parts: enqueue_payment -> Redis -> a `celery worker` process -> the sandbox over HTTP ->
its callback over HTTP to the web app -> the ledger."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from producers import PaymentConflictError, PaymentValidationError, enqueue_payment
from tests.integration.conftest import (
    PHONE_CANCELLED,
    PHONE_INSUFFICIENT,
    PHONE_NO_CALLBACK,
    PHONE_REJECTED,
    PHONE_SUCCESS,
    PHONE_WRONG_PIN,
)
from tests.support import pushes_for, record_sent
from worker import runtime
from worker.ledger import Payment, PaymentState, count_by_state, get_payment
from worker.local.stack import Stack


def reference() -> str:
    return "IT-" + secrets.token_hex(5).upper()


def test_payment_reaches_succeeded_with_its_receipt(
    stack: Stack, wait_for_state: Callable[..., Payment]
) -> None:
    handle = enqueue_payment(amount=150, phone_number=PHONE_SUCCESS, external_reference=reference())
    assert handle.queued and handle.created and handle.state == PaymentState.PENDING
    payment = wait_for_state(handle.id)
    assert payment.state == PaymentState.SUCCEEDED
    assert payment.receipt and len(payment.receipt) == 10
    assert payment.result_code == 0 and payment.provider_reference and payment.checkout_request_id
    assert pushes_for(stack, handle.external_reference) == 1
    assert runtime.guard().phone_snapshot("254700100001").in_flight == 0


@pytest.mark.parametrize(
    ("phone", "state", "code"),
    [
        (PHONE_CANCELLED, PaymentState.CANCELLED, 1032),
        (PHONE_INSUFFICIENT, PaymentState.FAILED, 1),
        (PHONE_WRONG_PIN, PaymentState.FAILED, 2001),
    ],
)
def test_customer_outcomes_end_in_their_state(
    stack: Stack, wait_for_state: Callable[..., Payment], phone: str, state: PaymentState, code: int
) -> None:
    handle = enqueue_payment(amount=20, phone_number=phone, external_reference=reference())
    payment = wait_for_state(handle.id)
    assert (payment.state, payment.result_code, payment.receipt) == (state, code, None)
    assert pushes_for(stack, handle.external_reference) == 1


def test_rejected_request_ends_rejected_with_the_providers_error(
    stack: Stack, wait_for_state: Callable[..., Payment]
) -> None:
    handle = enqueue_payment(amount=30, phone_number=PHONE_REJECTED, external_reference=reference())
    payment = wait_for_state(handle.id)
    assert payment.state == PaymentState.REJECTED
    assert payment.provider_status_code == 400 and payment.provider_response
    assert payment.checkout_request_id is None


def test_a_lost_callback_is_settled_by_transaction_status(
    stack: Stack, wait_for_state: Callable[..., Payment]
) -> None:
    handle = enqueue_payment(amount=40, phone_number=PHONE_NO_CALLBACK, external_reference=reference())
    payment = wait_for_state(handle.id, timeout_s=45)
    assert payment.state == PaymentState.FAILED
    assert payment.result_desc == "settled by transaction-status"


def test_redelivered_task_messages_send_nothing_twice(
    stack: Stack, wait_for_state: Callable[..., Payment]
) -> None:
    from worker.celery_app import app

    handle = enqueue_payment(amount=50, phone_number="0700100099", external_reference=reference())
    for _ in range(3):  # the same message delivered again, as Redis does after a visibility timeout
        app.send_task("stkpush.stk_push", args=[handle.id], queue="single")
    payment = wait_for_state(handle.id)
    assert payment.state == PaymentState.SUCCEEDED
    deadline = time.monotonic() + 10
    skipped = 0
    while time.monotonic() < deadline and skipped < 3:
        skipped = stack.log_text("worker1").count(f"payment {handle.id} not claimable")
        time.sleep(0.2)
    assert skipped == 3, "every duplicate delivery must have run and found nothing to claim"
    assert pushes_for(stack, handle.external_reference) == 1


def test_same_request_twice_returns_the_same_payment_and_other_details_conflict(stack: Stack) -> None:
    ref = reference()
    first = enqueue_payment(
        amount=60, phone_number=PHONE_SUCCESS, external_reference=ref, customer_name="Amina"
    )
    again = enqueue_payment(
        amount=60, phone_number="+254700100001", external_reference=ref, customer_name="Amina"
    )
    assert (again.id, again.created) == (first.id, False)
    with pytest.raises(PaymentConflictError) as caught:
        enqueue_payment(amount=61, phone_number=PHONE_SUCCESS, external_reference=ref, customer_name="Amina")
    assert caught.value.fields == ["amount"]


def _queue_length(stack: Stack) -> int:
    client = runtime.redis_client()
    return int(client.llen(f"{stack.key_prefix}single"))


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -10}, "amount"),
        ({"amount": 10.5}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": "100"}, "amount"),
        ({"amount": 150_001}, "amount"),
        ({"phone_number": "0202123456"}, "phone_number"),
        ({"phone_number": "+255712345678"}, "phone_number"),
        ({"phone_number": 712345678}, "phone_number"),
        ({"external_reference": "bad ref/1"}, "external_reference"),
        ({"customer_name": "x" * 101}, "customer_name"),
        ({"channel_id": 0}, "channel_id"),
    ],
)
def test_bad_input_records_nothing_and_queues_nothing(
    stack: Stack, fields: dict[str, Any], bad_field: str
) -> None:
    before_rows, before_queue = sum(count_by_state(runtime.engine()).values()), _queue_length(stack)
    request: dict[str, Any] = {"amount": 10, "phone_number": PHONE_SUCCESS, "external_reference": reference()}
    request.update(fields)
    with pytest.raises(PaymentValidationError) as caught:
        enqueue_payment(**request)
    assert [error.field for error in caught.value.errors] == [bad_field]
    assert sum(count_by_state(runtime.engine()).values()) == before_rows
    assert _queue_length(stack) == before_queue


# ---- the callback endpoint, case by case -------------------------------------------------------------------


def awaiting_payment(stack: Stack) -> Payment:
    """A payment waiting for its callback, written straight to the ledger (no push, so no real callback), with
    the send attempt a real send would have opened."""
    from worker.ledger import new_payment_id, utcnow

    payment_id = new_payment_id()
    token = f"{payment_id}.test"
    payment = Payment(
        id=payment_id,
        guard_token=token,
        account=stack.account,
        external_reference=reference(),
        phone="254700100077",
        amount=99,
        channel_id=2133,
        state=PaymentState.AWAITING_CALLBACK,
        provider_reference="ABCDEFGHIJ",
        checkout_request_id="ws_CO_" + secrets.token_hex(8),
        sent_at=utcnow(),
    )
    return record_sent(payment, token)


def callback_body(payment: Payment, **overrides: Any) -> dict[str, Any]:
    response = {
        "Amount": payment.amount,
        "CheckoutRequestID": payment.checkout_request_id,
        "ExternalReference": payment.external_reference,
        "MerchantRequestID": "3202-70921557-1",
        "MpesaReceiptNumber": "SAE3YULR0Y",
        "Phone": "+" + payment.phone,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "Status": "Success",
    }
    response.update(overrides)
    return {"forward_url": "", "response": response, "status": True}


def post_callback(stack: Stack, payment_id: str, body: Any, signature: str | None = None) -> httpx.Response:
    from worker.signing import callback_url

    url = callback_url(runtime.settings(), payment_id)
    if signature is not None:
        url = url.rsplit("/", 1)[0] + "/" + signature
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
    return httpx.post(url, json=body, timeout=10)


def state_of(payment: Payment) -> PaymentState:
    stored = get_payment(runtime.engine(), payment.id)
    assert stored is not None
    return stored.state


def test_forged_signature_is_refused_and_changes_nothing(stack: Stack) -> None:
    payment = awaiting_payment(stack)
    answer = post_callback(stack, payment.id, callback_body(payment), signature="0" * 64)
    assert answer.status_code == 403
    assert state_of(payment) == PaymentState.AWAITING_CALLBACK
    assert "SAE3YULR0Y" not in stack.log_text("web")


def test_callback_for_an_unknown_payment_is_refused(stack: Stack) -> None:
    payment = awaiting_payment(stack)
    unknown_id = secrets.token_hex(16)
    answer = post_callback(stack, unknown_id, callback_body(payment))
    assert answer.status_code == 404
    assert state_of(payment) == PaymentState.AWAITING_CALLBACK


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"Amount": 1}, "Amount"),
        ({"Phone": "+254700100078"}, "Phone"),
        ({"ExternalReference": "SOMEONE-ELSE"}, "ExternalReference"),
        ({"CheckoutRequestID": "ws_CO_forged"}, "CheckoutRequestID"),
        ({"ResultCode": "0"}, "ResultCode"),
    ],
)
def test_callback_contradicting_the_ledger_is_refused_and_changes_nothing(
    stack: Stack, override: dict[str, Any], field: str
) -> None:
    payment = awaiting_payment(stack)
    answer = post_callback(stack, payment.id, callback_body(payment, **override))
    assert answer.status_code == 400 and field in answer.json()["error"]
    assert state_of(payment) == PaymentState.AWAITING_CALLBACK


@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", b'{"response": "x"}', b"\xff\xfe", b'{"status": true}'], ids=str
)
def test_malformed_callback_body_is_refused(stack: Stack, body: bytes) -> None:
    payment = awaiting_payment(stack)
    answer = post_callback(stack, payment.id, body)
    assert answer.status_code == 400
    assert state_of(payment) == PaymentState.AWAITING_CALLBACK


def test_duplicate_callback_answers_200_and_changes_nothing(stack: Stack) -> None:
    payment = awaiting_payment(stack)
    first = post_callback(stack, payment.id, callback_body(payment))
    assert (first.status_code, first.json()["status"]) == (200, "applied")
    settled = get_payment(runtime.engine(), payment.id)
    again = post_callback(stack, payment.id, callback_body(payment, ResultCode=1032, MpesaReceiptNumber=""))
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    after = get_payment(runtime.engine(), payment.id)
    assert settled is not None and after is not None
    assert (after.state, after.receipt, after.updated_at) == (
        PaymentState.SUCCEEDED,
        "SAE3YULR0Y",
        settled.updated_at,
    )


def test_payment_api_needs_a_key_and_masks_the_phone(stack: Stack) -> None:
    payment = awaiting_payment(stack)
    url = f"{stack.web_url}/payments/{payment.external_reference}"
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": "wrong"}, timeout=5).status_code == 401
    answer = httpx.get(url, headers={"X-API-Key": stack.env["API_KEYS"]}, timeout=5)
    assert answer.status_code == 200
    assert answer.json()["phone"] == "2547****077" and answer.json()["state"] == "AWAITING_CALLBACK"


def test_healthz_reports_database_and_redis(stack: Stack) -> None:
    answer = httpx.get(f"{stack.web_url}/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json()["database"] == "ok" and answer.json()["redis"] == "ok"
