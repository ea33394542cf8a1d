"""A callback that comes while the payment is still SENDING (UpesiPay has not answered our request yet) can't
be checked against UpesiPay's CheckoutRequestID: it is held, and applied once the 201 is recorded only if that
CheckoutRequestID is UpesiPay's. Over the real stack: the sandbox records the push, sends its callback after
0.2 s, and holds its 201 back for 2 s (its `hang` fault), so every callback here arrives during SENDING."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from producers.enqueue import enqueue_payment
from tests.support import callbacks_sent, new_reference, running_stack, wait_for_state
from worker import runtime
from worker.ledger import Payment, PaymentState, get_payment
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack
from worker.signing import callback_url

PHONE = "0712345680"
SCENARIO = {
    "seed": 15,
    "callback_delay_s": 0.2,
    "default": "success",
    # The stack's read timeout is 3 s: the 201 comes late, not never.
    "faults": {"hang_rate": 1.0, "hang_s": 2.0, "endpoints": ["payments"]},
}
FORGED_CHECKOUT = "ws_CO_01122026000000000712345680"
FORGED_RECEIPT = "FORGED0001"


@pytest.fixture(scope="module")
def slow_201_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    with running_stack(redis_server, 4, scenario=SCENARIO, beat=False) as stack:
        yield stack


def wait_for_sending(payment_id: str, timeout_s: float = 20) -> Payment:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        payment = get_payment(runtime.engine(), payment_id)
        if payment is not None and payment.state == PaymentState.SENDING:
            return payment
        time.sleep(0.02)
    raise AssertionError(f"payment {payment_id} never seen SENDING")


def forged_callback(payment: Payment) -> dict[str, object]:
    # Everything a caller who knows the order can get right; only UpesiPay knows the CheckoutRequestID.
    return {
        "forward_url": "",
        "response": {
            "Amount": payment.amount,
            "CheckoutRequestID": FORGED_CHECKOUT,
            "ExternalReference": payment.external_reference,
            "MerchantRequestID": "1-1",
            "MpesaReceiptNumber": FORGED_RECEIPT,
            "Phone": "+254" + PHONE[1:],
            "ResultCode": 0,
            "ResultDesc": "The service request is processed successfully.",
            "Status": "Success",
        },
        "status": True,
    }


def test_a_made_up_callback_during_sending_is_held_and_never_settles_nor_sticks(
    slow_201_stack: Stack,
) -> None:
    handle = enqueue_payment(amount=25, phone_number=PHONE, external_reference=new_reference("HELD"))
    sending = wait_for_sending(handle.id)

    answer = httpx.post(
        callback_url(runtime.settings(), handle.id), json=forged_callback(sending), timeout=10
    )

    assert (answer.status_code, answer.json()) == (202, {"status": "held"})
    assert get_payment(runtime.engine(), handle.id).state == PaymentState.SENDING  # type: ignore[union-attr]
    settled = wait_for_state(handle.id)
    # UpesiPay's own callback (held too, it came 0.2 s after the push) is the one applied once the 201 is in.
    assert settled.state == PaymentState.SUCCEEDED
    assert settled.checkout_request_id is not None and settled.checkout_request_id != FORGED_CHECKOUT
    assert settled.receipt is not None and settled.receipt != FORGED_RECEIPT
    assert settled.held_callbacks is None
    assert callbacks_sent(slow_201_stack) >= 1
    assert "held callback dropped: CheckoutRequestID does not match" in slow_201_stack.log_text("worker1")


def test_upesipays_own_callback_during_sending_is_applied_once_the_201_is_recorded(
    slow_201_stack: Stack,
) -> None:
    # No beat runs in this stack: nothing but the held callback can settle the payment.
    sent_before = callbacks_sent(slow_201_stack)
    handle = enqueue_payment(amount=30, phone_number=PHONE, external_reference=new_reference("HELD"))
    wait_for_sending(handle.id)
    deadline = time.monotonic() + 10
    while callbacks_sent(slow_201_stack) == sent_before and time.monotonic() < deadline:
        time.sleep(0.05)
    during = get_payment(runtime.engine(), handle.id)
    assert during is not None and during.state == PaymentState.SENDING and during.held_callbacks

    settled = wait_for_state(handle.id)

    assert settled.state == PaymentState.SUCCEEDED
    assert settled.receipt and settled.checkout_request_id and settled.result_code == 0
    assert "settled by a callback held until now" in slow_201_stack.log_text("worker1")
