"""The catalogue of hostile inputs, one table per entry point: `enqueue_payment`, `POST /payments`,
`POST /batches`, the callback receiver and `stkpush batch` files. For every case: a 4xx (or the library's
error) that names the field, no state change (ledger rows, queued messages), and no unmasked phone or name in
the answer, the files we write or the logs of the real processes. Add a row whenever a new case is found.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
    payments_of_batch,
    reference,
)
from worker import runtime
from worker.ledger import Payment, PaymentState, get_payment, session_scope
from worker.local.stack import Stack
from worker.signing import callback_url

DEEP = 5_000  # far deeper than Python's JSON parser recurses
SHALLOWER = 2_500  # still too deep, and within POST /payments' 16 KiB


def key(stack: Stack) -> dict[str, str]:
    return {"X-API-Key": stack.env["API_KEYS"]}


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
    headers = key(hostile_stack) | {"Content-Type": "application/json"}
    with httpx.Client(base_url=hostile_stack.web_url, timeout=10) as client:
        answer = client.post("/payments", content=content, headers=headers)
        # The same keep-alive connection still serves: a 500 used to leave it reset.
        follow_up = client.get("/healthz")
    assert answer.status_code == status, answer.text
    assert field_name in [problem["field"] for problem in answer.json()["errors"]]
    assert follow_up.status_code == 200
    assert ledger_state(hostile_stack) == before
    assert_no_personal_data(answer.text, hostile_stack.log_text("web")[log_offset:])


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
    )
    with session_scope(runtime.engine()) as session:
        session.add(payment)
        session.commit()
    return payment


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


# ---- batch files: POST /batches and `stkpush batch` -----------------------------------------------------------
@dataclass(frozen=True)
class BatchCase:
    name: str
    file_format: str  # csv or jsonl
    make_content: Callable[[], str]
    state: str  # the batch's end state
    rejects: set[tuple[int, str]]  # (line, field)
    good_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def jsonl(*rows: Any) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def good(**changes: Any) -> dict[str, Any]:
    return {
        "external_reference": reference(),
        "phone_number": PHONE,
        "amount": 10,
        "customer_name": NAME,
    } | changes


HEADER = "external_reference,phone_number,amount,customer_name"
BATCH_CASES = [
    BatchCase(
        "csv-without-header",
        "csv",
        lambda: f"{reference()},{PHONE},100,{NAME}\n{reference()},{PHONE},200,{NAME}\n",
        "FAILED",
        {(1, "header")},
    ),
    BatchCase(
        "csv-channel-id-overflow",
        "csv",
        lambda: (
            f"{HEADER},channel_id\n{reference()},{PHONE},100,{NAME},99999999999999999999\n"
            f"{reference()},{PHONE},100,{NAME},2133\n"
        ),
        "INGESTED",
        {(2, "channel_id")},
        good_rows=1,
    ),
    BatchCase(
        "csv-formula-header-cell",
        "csv",
        lambda: f"{HEADER},=cmd|' /C calc'!A0\n{reference()},{PHONE},100,{NAME},x\n",
        "FAILED",
        {(1, "column 5")},
    ),
    BatchCase(
        "csv-phone-as-header-cell",
        "csv",
        lambda: f"external_reference,phone_number,amount,{PHONE}\n{reference()},{PHONE},100,x\n",
        "FAILED",
        {(1, "column 4")},
    ),
    BatchCase(
        "csv-control-bytes-in-header-cell",
        "csv",
        lambda: f"{HEADER},\x1b[31mred\x07\n{reference()},{PHONE},100,{NAME},x\n",
        "FAILED",
        {(1, "column 5")},
    ),
    BatchCase(
        "csv-reference-with-nul",
        "csv",
        lambda: f"{HEADER}\nINV\x00009,{PHONE},100,{NAME}\n{reference()},{PHONE},100,{NAME}\n",
        "INGESTED",
        {(2, "external_reference")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-nested-5000-deep",
        "jsonl",
        lambda: jsonl(good(), '{"a":' * DEEP + "1" + "}" * DEEP, good()),
        "INGESTED",
        {(2, "line")},
        good_rows=2,
    ),
    BatchCase(
        "jsonl-formula-keys",
        "jsonl",
        lambda: jsonl(
            good(**{'=HYPERLINK("http://x","y")': 1}),
            good(**{"+1+1": 1}),
            good(**{"-2+3": 1}),
            good(**{"@SUM(A1)": 1}),
            good(),
        ),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)"), (3, "(unnamed field)"), (4, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-personal-data-as-keys",
        "jsonl",
        lambda: jsonl(good(**{PHONE: 1}), good(**{NAME: 1}), good()),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-control-bytes-in-keys",
        "jsonl",
        lambda: jsonl(good(**{"amount\x07": 1}), good(**{"\x1b[2J": 1}), good()),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-references-with-control-characters",
        "jsonl",
        lambda: jsonl(good(external_reference="INV\n009"), good(external_reference="INV\x00009"), good()),
        "INGESTED",
        {(1, "external_reference"), (2, "external_reference")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-huge-integers",
        "jsonl",
        lambda: jsonl(good(channel_id=2**63), good(amount=2**63), good()),
        "INGESTED",
        {(1, "channel_id"), (2, "amount")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-receipt-shaped-objects",
        "jsonl",
        lambda: jsonl(good(customer_name={"name": NAME}), good(phone_number=[PHONE]), good()),
        "INGESTED",
        {(1, "customer_name"), (2, "phone_number")},
        good_rows=1,
    ),
]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def assert_rejects_file_is_inert(text: str, expected: set[tuple[int, str]]) -> None:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["line", "field", "rule"]
    assert {(int(line), field_name) for line, field_name, _rule in rows[1:]} == expected
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(FORMULA_STARTS), f"a formula cell in the rejects file: {cell!r}"
            assert cell.isprintable(), f"a control character in the rejects file: {cell!r}"
    assert_no_personal_data(text)


def wait_for_batch(stack: Stack, batch_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(
            f"{stack.web_url}/batches/{batch_id}", headers=key(stack), timeout=5
        ).json()
        if status["state"] != "INGESTING":
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still ingesting after {timeout_s}s")


@pytest.mark.parametrize("case", BATCH_CASES, ids=[case.name for case in BATCH_CASES])
def test_post_batches_rejects_each_bad_line_by_line_and_field_and_records_the_good_ones(
    hostile_stack: Stack, case: BatchCase
) -> None:
    before = ledger_state(hostile_stack)
    log_offset = len(hostile_stack.log_text("web"))
    accepted = httpx.post(
        f"{hostile_stack.web_url}/batches?format={case.file_format}&name=hostile.{case.file_format}",
        content=case.make_content().encode(),
        headers=key(hostile_stack),
        timeout=10,
    )
    assert accepted.status_code == 202, accepted.text
    status = wait_for_batch(hostile_stack, accepted.json()["batch_id"])

    assert status["state"] == case.state, status
    assert status["rows_recorded"] == case.good_rows
    assert {(int(r["line"]), r["field"]) for r in status["rejects"]} == case.rejects
    assert len(payments_of_batch(status["batch_id"])) == case.good_rows
    after = ledger_state(hostile_stack)
    assert (after.payments, after.single_queue, after.bulk_queue) == (
        before.payments + case.good_rows,
        before.single_queue,
        before.bulk_queue + case.good_rows,
    )
    rejects = httpx.get(
        f"{hostile_stack.web_url}/batches/{status['batch_id']}/rejects", headers=key(hostile_stack)
    )
    assert rejects.status_code == 200
    assert_rejects_file_is_inert(rejects.text, case.rejects)
    assert_no_personal_data(json.dumps(status), hostile_stack.log_text("web")[log_offset:])


@pytest.mark.parametrize("case", BATCH_CASES, ids=[case.name for case in BATCH_CASES])
def test_stkpush_batch_rejects_each_bad_line_by_line_and_field_and_records_the_good_ones(
    hostile_stack: Stack, case: BatchCase, tmp_path: Path
) -> None:
    before = ledger_state(hostile_stack)
    upload = tmp_path / f"hostile.{case.file_format}"
    upload.write_text(case.make_content(), encoding="utf-8")
    for as_json_flag in ((), ("--json",)):
        # Twice: the human report and the JSON one; the second run records nothing again.
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "batch", str(upload), *as_json_flag],
            env=hostile_stack.child_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == (2 if case.state == "FAILED" else 1), done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert_no_personal_data(done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["state"] == case.state
    after = ledger_state(hostile_stack)
    assert (after.payments, after.single_queue, after.bulk_queue) == (
        before.payments + case.good_rows,
        before.single_queue,
        before.bulk_queue + case.good_rows,
    )
    assert_rejects_file_is_inert(
        (tmp_path / f"hostile.{case.file_format}.rejects.csv").read_text(encoding="utf-8"), case.rejects
    )


def given_up(payment: Payment, *, checkout_request_id: str | None) -> Payment:
    """The payment as settlement leaves it after SETTLE_GIVE_UP_S without an outcome."""
    with session_scope(runtime.engine()) as session:
        row = session.get(Payment, payment.id)
        assert row is not None
        row.state = PaymentState.FAILED
        row.reason = "unsettled: no outcome from UpesiPay after 10800s (last status QUEUED)"
        row.checkout_request_id = checkout_request_id
        session.add(row)
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
