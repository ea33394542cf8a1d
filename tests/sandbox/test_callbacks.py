"""Callbacks: delivered to a real receiver, in the documented shape, with duplicates, late ones, and none."""

from __future__ import annotations

import time

import pytest

from tests.sandbox.conftest import CallbackReceiver, StartSandbox
from worker.local.embedded_redis import free_port

PHONE = "0712345678"


def test_a_success_callback_has_the_documented_shape(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    # Given a customer who pays
    sandbox = start_sandbox()
    # When a push names a callback_url
    created = sandbox.push(PHONE, amount=10, external_reference="INV-009", callback_url=receiver.url).json()
    # Then the documented success body is POSTed there
    [callback] = receiver.wait_for(1)
    assert callback.path == "/callbacks/upesipay/pay-1/signature"
    assert set(callback.body) == {"forward_url", "response", "status"}
    assert callback.body["forward_url"] == ""
    assert callback.body["status"] is True
    response = callback.body["response"]
    receipt = sandbox.status(created["reference"]).json()["provider_reference"]
    assert response == {
        "Amount": 10,
        "CheckoutRequestID": created["CheckoutRequestID"],
        "ExternalReference": "INV-009",
        "MerchantRequestID": response["MerchantRequestID"],
        "MpesaReceiptNumber": receipt,
        "Phone": "+254712345678",
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "Status": "Success",
    }
    sandbox.wait_for_stat("callbacks_sent", 1)


@pytest.mark.parametrize(
    ("outcome", "code", "status"),
    [
        ("cancelled", 1032, "Cancelled"),
        ("timeout", 1037, "Failed"),
        ("insufficient", 1, "Failed"),
        ("wrong_pin", 2001, "Failed"),
        ("in_progress", 1001, "Failed"),
    ],
)
def test_a_failure_callback_mirrors_the_success_shape_with_its_result_code(
    start_sandbox: StartSandbox, receiver: CallbackReceiver, outcome: str, code: int, status: str
) -> None:
    sandbox = start_sandbox({"phones": {PHONE: outcome}})
    created = sandbox.push(PHONE, external_reference="INV-F", callback_url=receiver.url).json()
    [callback] = receiver.wait_for(1)
    assert callback.body["status"] is False
    response = callback.body["response"]
    assert response["ResultCode"] == code
    assert response["ResultDesc"]
    assert response["Status"] == status
    assert response["MpesaReceiptNumber"] == ""
    assert response["CheckoutRequestID"] == created["CheckoutRequestID"]
    assert response["ExternalReference"] == "INV-F"
    assert sandbox.status(created["reference"]).json()["status"] == "FAILED"
    assert sandbox.stats()["outcomes"][outcome] == 1


def test_a_duplicate_outcome_sends_the_same_callback_twice(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    sandbox = start_sandbox({"phones": {PHONE: {"outcome": "success", "duplicate": True}}})
    sandbox.push(PHONE, callback_url=receiver.url)
    first, second = receiver.wait_for(2)
    assert first.body == second.body
    sandbox.wait_for_stat("callbacks_sent", 2)
    time.sleep(0.2)
    assert len(receiver.received) == 2


def test_a_late_callback_comes_late_delay_after_the_outcome(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    # Given a customer who pays at once but whose callback UpesiPay sends an hour later
    sandbox = start_sandbox({"phones": {PHONE: {"outcome": "success", "late": True}}}, late_delay_s=3600)
    reference = sandbox.push(PHONE, callback_url=receiver.url).json()["reference"]
    # Then the provider already knows the outcome, but no callback has come
    assert sandbox.status(reference).json()["status"] == "SUCCESS"
    time.sleep(0.3)
    assert receiver.received == []
    assert sandbox.stats()["callbacks_pending"] == 1
    # When the hour passes, the callback comes
    sandbox.advance(3600)
    [callback] = receiver.wait_for(1)
    assert callback.body["response"]["ResultCode"] == 0


def test_a_late_callback_arrives_after_real_time_too(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    sandbox = start_sandbox({"phones": {PHONE: {"outcome": "cancelled", "late": True}}}, late_delay_s=0.4)
    sent = time.monotonic()
    sandbox.push(PHONE, callback_url=receiver.url)
    [callback] = receiver.wait_for(1)
    assert callback.at - sent >= 0.35
    assert callback.body["response"]["ResultCode"] == 1032


def test_a_callback_comes_after_the_callback_delay_without_any_request(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    # Given a sandbox whose customers answer 0.4 s after the prompt
    sandbox = start_sandbox(callback_delay_s=0.4)
    sent = time.monotonic()
    reference = sandbox.push(PHONE, callback_url=receiver.url).json()["reference"]
    assert sandbox.status(reference).json()["status"] == "QUEUED"
    # Then the scheduler sends the callback on its own, once the delay has passed
    [callback] = receiver.wait_for(1)
    assert callback.at - sent >= 0.35
    assert sandbox.status(reference).json()["status"] == "SUCCESS"


def test_no_callback_fails_at_the_provider_and_sends_nothing(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    sandbox = start_sandbox({"phones": {PHONE: "no_callback"}})
    reference = sandbox.push(PHONE, callback_url=receiver.url).json()["reference"]
    assert sandbox.status(reference).json()["status"] == "FAILED"
    time.sleep(0.3)
    assert receiver.received == []
    stats = sandbox.stats()
    assert stats["outcomes"]["no_callback"] == 1
    assert stats["callbacks_sent"] == stats["callbacks_failed"] == stats["callbacks_pending"] == 0


def test_a_dropped_callback_is_never_sent_but_the_outcome_happens(
    start_sandbox: StartSandbox, receiver: CallbackReceiver
) -> None:
    # Given a customer who pays, whose callback UpesiPay loses
    sandbox = start_sandbox({"phones": {PHONE: {"outcome": "success", "drop": True}}})
    reference = sandbox.push(PHONE, callback_url=receiver.url).json()["reference"]
    # Then transaction-status shows the success, and no callback ever comes
    status = sandbox.status(reference).json()
    assert status["status"] == "SUCCESS"
    assert status["provider_reference"]
    time.sleep(0.3)
    assert receiver.received == []
    stats = sandbox.stats()
    assert stats["callbacks_dropped"] == 1
    assert stats["callbacks_sent"] == stats["callbacks_pending"] == 0


def test_the_outcome_happens_without_a_callback_url(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"default": "wrong_pin"})
    reference = sandbox.push(PHONE).json()["reference"]
    assert sandbox.status(reference).json()["status"] == "FAILED"
    assert sandbox.stats()["outcomes"]["wrong_pin"] == 1


def test_a_receiver_that_is_down_or_failing_is_counted_and_the_sandbox_keeps_serving(
    start_sandbox: StartSandbox,
) -> None:
    # Given one callback_url where nothing listens and one that answers 500
    sandbox = start_sandbox()
    failing = CallbackReceiver(status_code=500)
    try:
        down_url = f"http://127.0.0.1:{free_port()}/callbacks/upesipay/x/y"
        # When pushes name them
        sandbox.push(PHONE, callback_url=down_url)
        sandbox.push("0722000001", callback_url=failing.url)
        failing.wait_for(1)
        # Then both failures are counted, the outcomes still happened, and the sandbox still answers
        stats = sandbox.wait_for_stat("callbacks_failed", 2)
    finally:
        failing.stop()
    assert stats["callbacks_sent"] == 0
    assert stats["outcomes"]["success"] == 2
    assert sandbox.push("0722000002").status_code == 201
