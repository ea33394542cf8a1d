"""The catalogue of hostile inputs for UpesiPay's callback receiver (signed URLs, the real web process).

For every case: a 400 that names the field, no state change (the payment row, ledger counts, queued messages),
and no unmasked phone or name in the answer or the web process's log. Add a row for each new case.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.hostile.conftest import (
    NAME,
    PHONE,
    assert_no_personal_data,
    ledger_state,
    reference,
)
from tests.support import record_sent
from worker import runtime
from worker.ledger import (
    AttemptOutcome,
    Payment,
    PaymentState,
    SendAttempt,
    get_payment,
    session_scope,
    utcnow,
)
from worker.local.stack import Stack
from worker.signing import callback_url

DEEP = 5_000  # far deeper than Python's JSON parser recurses


# ---- the callback receiver ------------------------------------------------------------------------------------
def awaiting_payment(stack: Stack) -> Payment:
    payment = Payment(
        account=runtime.settings().upesipay_account,
        external_reference=reference(),
        phone="254" + PHONE[1:],
        amount=100,
        customer_name=NAME,
        channel_id=2133,
        state=PaymentState.AWAITING_CALLBACK,
        provider_reference="E8UWT7CLUW",
        checkout_request_id="ws_CO_01122026101500000733445566",
        sent_at=utcnow(),
    )
    return record_sent(payment)


def callback_document(payment: Payment, **changes: Any) -> dict[str, Any]:
    response = {
        "Amount": payment.amount,
        "CheckoutRequestID": payment.checkout_request_id,
        "ExternalReference": payment.external_reference,
        "MerchantRequestID": "3202-70921557-1",
        "MpesaReceiptNumber": "SAE3YULR0Y",
        "Phone": "+254" + PHONE[1:],
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "Status": "Success",
    }
    return {"forward_url": "", "response": response | changes, "status": True}


def as_json(**changes: Any) -> Callable[[Payment], bytes]:
    return lambda payment: json.dumps(callback_document(payment, **changes)).encode()


def raw(content: bytes) -> Callable[[Payment], bytes]:
    return lambda _payment: content


CALLBACK_CASES: list[tuple[str, Callable[[Payment], bytes], str]] = [
    ("result-code-2**63", as_json(ResultCode=2**63), "ResultCode"),
    ("result-code-text", as_json(ResultCode="0"), "ResultCode"),
    ("result-code-float", as_json(ResultCode=0.0), "ResultCode"),
    ("result-code-missing", as_json(ResultCode=None), "ResultCode"),
    (
        "receipt-object",
        as_json(MpesaReceiptNumber={"number": "SAE3YULR0Y", "phone": PHONE}),
        "MpesaReceiptNumber",
    ),
    ("receipt-list", as_json(MpesaReceiptNumber=["SAE3YULR0Y"]), "MpesaReceiptNumber"),
    ("receipt-markup", as_json(MpesaReceiptNumber="<script>x</script>"), "MpesaReceiptNumber"),
    ("receipt-control", as_json(MpesaReceiptNumber="SAE3\nYULR0Y"), "MpesaReceiptNumber"),
    ("receipt-missing-on-success", as_json(MpesaReceiptNumber=None), "MpesaReceiptNumber"),
    ("description-object", as_json(ResultDesc={"text": NAME}), "ResultDesc"),
    ("checkout-made-up", as_json(CheckoutRequestID="ws_CO_MADEUP"), "CheckoutRequestID"),
    ("checkout-object", as_json(CheckoutRequestID={"id": 1}), "CheckoutRequestID"),
    ("amount-text", as_json(Amount="100"), "Amount"),
    ("amount-other", as_json(Amount=1), "Amount"),
    ("phone-number-type", as_json(Phone=254733445566), "Phone"),
    ("phone-other", as_json(Phone="+254733445567"), "Phone"),
    ("reference-other", as_json(ExternalReference="INV-OTHER"), "ExternalReference"),
    ("deep-object", raw(b'{"response":' * DEEP + b"{}" + b"}" * DEEP), "body"),
    (
        "deep-inside-response",
        raw(b'{"response": {"ResultCode": ' + b"[" * DEEP + b"]" * DEEP + b"}}"),
        "body",
    ),
    ("not-json", raw(b"ResultCode=0&Phone=" + PHONE.encode()), "body"),
    ("response-a-list", raw(b'{"response": [0]}'), "response"),
    ("huge-integer-literal", raw(b'{"response": {"ResultCode": ' + b"9" * 5000 + b"}}"), "body"),
]


@pytest.mark.parametrize(
    ("make_body", "field_name"), [c[1:] for c in CALLBACK_CASES], ids=[c[0] for c in CALLBACK_CASES]
)
def test_a_signed_callback_that_is_malformed_answers_4xx_naming_the_field_and_changes_nothing(
    hostile_stack: Stack, make_body: Callable[[Payment], bytes], field_name: str
) -> None:
    payment = awaiting_payment(hostile_stack)
    before = ledger_state(hostile_stack)
    log_offset = len(hostile_stack.log_text("web"))
    url = callback_url(runtime.settings(), payment.id)
    with httpx.Client(timeout=10) as client:
        answer = client.post(url, content=make_body(payment), headers={"Content-Type": "application/json"})
        follow_up = client.get(f"{hostile_stack.web_url}/healthz")
    assert answer.status_code == 400, answer.text
    assert [problem["field"] for problem in answer.json()["errors"]] == [field_name]
    assert follow_up.status_code == 200
    after = get_payment(runtime.engine(), payment.id)
    assert after is not None
    assert (after.state, after.receipt, after.result_code, after.held_callbacks) == (
        PaymentState.AWAITING_CALLBACK,
        None,
        None,
        None,
    )
    assert ledger_state(hostile_stack) == before
    assert_no_personal_data(answer.text, hostile_stack.log_text("web")[log_offset:])


def test_the_catalogue_callback_is_applied_when_nothing_is_wrong_with_it(hostile_stack: Stack) -> None:
    # The control case: the table above fails for what each row changes, not for the base document.
    payment = awaiting_payment(hostile_stack)
    answer = httpx.post(
        callback_url(runtime.settings(), payment.id), json=callback_document(payment), timeout=10
    )
    assert answer.json() == {"status": "applied"}
    after = get_payment(runtime.engine(), payment.id)
    assert after is not None and (after.state, after.receipt) == (PaymentState.SUCCEEDED, "SAE3YULR0Y")


def given_up(payment: Payment, *, checkout_request_id: str | None) -> Payment:
    """The payment as settlement leaves it after SETTLE_GIVE_UP_S without an outcome."""
    with session_scope(runtime.engine()) as session:
        row = session.get(Payment, payment.id)
        assert row is not None
        row.state = PaymentState.FAILED
        row.reason = "unsettled: no outcome from UpesiPay after 10800s (last status QUEUED)"
        row.checkout_request_id = checkout_request_id
        session.add(row)
        attempt = session.get(SendAttempt, row.guard_token)
        assert attempt is not None
        # Settlement's give-up ends the attempt as a failure (and tells the guard).
        attempt.outcome, attempt.outcome_at, attempt.guard_resolved_at = (
            AttemptOutcome.FAILURE,
            utcnow(),
            utcnow(),
        )
        attempt.checkout_request_id = checkout_request_id
        session.add(attempt)
        session.commit()
        session.refresh(row)
        return row


def test_a_late_success_for_a_payment_given_up_without_a_checkout_id_is_held_not_applied(
    hostile_stack: Stack,
) -> None:
    # Nothing in the ledger can confirm its CheckoutRequestID (the send timed out, no 201 was ever recorded):
    # taking the failure back on its word would let a made-up callback mark the payment paid.
    payment = given_up(awaiting_payment(hostile_stack), checkout_request_id=None)
    document = callback_document(payment, CheckoutRequestID="ws_CO_MADEUP", MpesaReceiptNumber="FORGED0001")
    answer = httpx.post(callback_url(runtime.settings(), payment.id), json=document, timeout=10)
    assert (answer.status_code, answer.json()) == (202, {"status": "held"})
    after = get_payment(runtime.engine(), payment.id)
    assert after is not None and (after.state, after.receipt, after.checkout_request_id) == (
        PaymentState.FAILED,
        None,
        None,
    )
    assert after.held_callbacks is not None and "ws_CO_MADEUP" in after.held_callbacks
    assert "reconcile it with UpesiPay" in hostile_stack.log_text("web")


def test_a_late_success_matching_the_recorded_checkout_id_takes_the_assumed_failure_back(
    hostile_stack: Stack,
) -> None:
    payment = given_up(
        awaiting_payment(hostile_stack), checkout_request_id="ws_CO_01122026101500000733445566"
    )
    answer = httpx.post(
        callback_url(runtime.settings(), payment.id), json=callback_document(payment), timeout=10
    )
    assert answer.json() == {"status": "applied"}
    after = get_payment(runtime.engine(), payment.id)
    assert after is not None and (after.state, after.receipt) == (PaymentState.SUCCEEDED, "SAE3YULR0Y")
