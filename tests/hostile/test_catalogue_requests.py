"""The catalogue of hostile inputs for single payments: `enqueue_payment` and `POST /payments`.

For every case: a 4xx (or the library's error) that names the field, no state change (ledger rows, queued
messages), and no unmasked phone or name in the answer or the web process's log. Add a row for each new case.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from producers.enqueue import enqueue_payment
from producers.validation import PaymentValidationError
from tests.hostile.conftest import (
    NAME,
    PHONE,
    assert_no_personal_data,
    ledger_state,
    reference,
)
from tests.support import api_key
from worker.local.stack import Stack

DEEP = 5_000  # far deeper than Python's JSON parser recurses
SHALLOWER = 2_500  # still too deep, and within POST /payments' 16 KiB


# ---- enqueue_payment ------------------------------------------------------------------------------------------
ENQUEUE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("amount-2**63", {"amount": 2**63}, "amount"),
    ("amount-text", {"amount": "100"}, "amount"),
    ("amount-bool", {"amount": True}, "amount"),
    ("amount-float", {"amount": 10.5}, "amount"),
    ("phone-garbage", {"phone_number": PHONE + "x"}, "phone_number"),
    ("phone-object", {"phone_number": {"number": PHONE}}, "phone_number"),
    ("channel-2**63", {"channel_id": 2**63}, "channel_id"),
    ("channel-20-digits", {"channel_id": 99999999999999999999}, "channel_id"),
    ("channel-negative", {"channel_id": -5}, "channel_id"),
    ("reference-newline", {"external_reference": "INV\n009"}, "external_reference"),
    ("reference-nul", {"external_reference": "INV\x00009"}, "external_reference"),
    ("reference-bidi", {"external_reference": "INV\u202e009"}, "external_reference"),
    ("reference-slash", {"external_reference": "INV/009"}, "external_reference"),
    ("reference-long", {"external_reference": "R" * 65}, "external_reference"),
    ("reference-phone-shaped-list", {"external_reference": [PHONE]}, "external_reference"),
    ("name-object", {"customer_name": {"first": NAME}}, "customer_name"),
    ("name-long", {"customer_name": NAME * 10}, "customer_name"),
]


@pytest.mark.parametrize(
    ("changes", "field_name"), [c[1:] for c in ENQUEUE_CASES], ids=[c[0] for c in ENQUEUE_CASES]
)
def test_enqueue_payment_refuses_naming_the_field_and_changes_nothing(
    hostile_stack: Stack, caplog: pytest.LogCaptureFixture, changes: dict[str, Any], field_name: str
) -> None:
    before = ledger_state(hostile_stack)
    request = {"amount": 100, "phone_number": PHONE, "external_reference": reference(), "customer_name": NAME}
    with caplog.at_level(logging.DEBUG), pytest.raises(PaymentValidationError) as caught:
        enqueue_payment(**(request | changes))
    assert field_name in {error.field for error in caught.value.errors}
    assert ledger_state(hostile_stack) == before
    assert_no_personal_data(str(caught.value), caplog.text)


# ---- POST /payments -------------------------------------------------------------------------------------------
def payment_body(**changes: Any) -> bytes:
    body = {"amount": 100, "phone_number": PHONE, "external_reference": reference(), "customer_name": NAME}
    return json.dumps(body | changes).encode()


PAYMENT_CASES: list[tuple[str, bytes, int, str]] = [
    ("channel-2**63", payment_body(channel_id=2**63), 422, "channel_id"),
    ("amount-2**63", payment_body(amount=2**63), 422, "amount"),
    ("amount-huge-literal", payment_body()[:-1] + b', "amount": ' + b"9" * 5000 + b"}", 422, "body"),
    ("amount-exponent", payment_body()[:-1] + b', "amount": 1e400}', 422, "amount"),
    ("deep-object", b'{"a":' * SHALLOWER + b"1" + b"}" * SHALLOWER, 422, "body"),
    ("deep-list", b"[" * DEEP + b"]" * DEEP, 422, "body"),
    (
        "deep-inside-a-field",
        payment_body()[:-1] + b', "customer_name": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        422,
        "body",
    ),
    ("nested-value", payment_body(customer_name=[[[[NAME]]]]), 422, "customer_name"),
    ("reference-newline", payment_body(external_reference="INV\n009"), 422, "external_reference"),
    ("reference-nul", payment_body(external_reference="INV\x00009"), 422, "external_reference"),
    ("reference-object", payment_body(external_reference={"$gt": ""}), 422, "external_reference"),
    ("unknown-key-a-phone", payment_body(**{PHONE: NAME}), 422, "(unnamed field)"),
    ("unknown-key-a-formula", payment_body(**{"=HYPERLINK(1)": 1}), 422, "(unnamed field)"),
    ("phone-with-letters", payment_body(phone_number=PHONE + "ext"), 422, "phone_number"),
    ("not-json", b"amount=100&phone_number=" + PHONE.encode(), 422, "body"),
    ("a-list", json.dumps([{"amount": 100, "phone_number": PHONE}]).encode(), 422, "body"),
    ("bad-utf8", b'{"amount": 100, "phone_number": "\xff' + PHONE.encode() + b'"}', 422, "body"),
    ("too-large", payment_body(customer_name=NAME + " " * 20_000), 413, "body"),
]


@pytest.mark.parametrize(
    ("content", "status", "field_name"), [c[1:] for c in PAYMENT_CASES], ids=[c[0] for c in PAYMENT_CASES]
)
def test_post_payments_answers_4xx_naming_the_field_and_changes_nothing(
    hostile_stack: Stack, content: bytes, status: int, field_name: str
) -> None:
    before = ledger_state(hostile_stack)
    log_offset = len(hostile_stack.log_text("web"))
    headers = api_key(hostile_stack) | {"Content-Type": "application/json"}
    with httpx.Client(base_url=hostile_stack.web_url, timeout=10) as client:
        answer = client.post("/payments", content=content, headers=headers)
        # The same keep-alive connection still serves: a 500 used to leave it reset.
        follow_up = client.get("/healthz")
    assert answer.status_code == status, answer.text
    assert field_name in [problem["field"] for problem in answer.json()["errors"]]
    assert follow_up.status_code == 200
    assert ledger_state(hostile_stack) == before
    assert_no_personal_data(answer.text, hostile_stack.log_text("web")[log_offset:])
