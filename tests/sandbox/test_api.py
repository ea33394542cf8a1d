"""The documented API: auth, body checks, the 201, transaction-status and the transactions list."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.sandbox.conftest import OTHER_TOKEN, RunningSandbox, StartSandbox, push_body

STATUS_FIELDS = {
    "transaction_date",
    "provider",
    "success",
    "merchant",
    "payment_reference",
    "third_party_reference",
    "status",
    "reference",
    "CheckoutRequestID",
    "provider_reference",
    "external_reference",
}


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic", "Bearer sbx_test_token_1", "Basic wrong-token", "basic sbx_test_token_1x"],
)
def test_a_push_without_a_valid_basic_token_is_refused_401(
    sandbox: RunningSandbox, authorization: str | None
) -> None:
    # Given a request without a valid "Authorization: Basic <token>"
    headers = {} if authorization is None else {"Authorization": authorization}
    # When it is sent
    response = httpx.post(sandbox.url + "/api/v2/payments", json=push_body(), headers=headers)
    # Then it is refused with an error_message, and nothing is recorded
    assert response.status_code == 401
    assert response.json()["error_message"]
    stats = sandbox.stats()
    assert stats["pushes_total"] == 0
    assert stats["requests_refused"]["unauthorized"] == 1


def test_every_api_endpoint_needs_the_token(sandbox: RunningSandbox) -> None:
    for path in ("/api/v2/transaction-status?reference=X", "/api/v2/transactions"):
        assert httpx.get(sandbox.url + path).status_code == 401


def test_the_scheme_is_case_insensitive_and_each_token_is_its_own_account(sandbox: RunningSandbox) -> None:
    response = httpx.post(
        sandbox.url + "/api/v2/payments",
        json=push_body(),
        headers={"Authorization": "basic sbx_test_token_1"},
    )
    assert response.status_code == 201
    with sandbox.with_token(OTHER_TOKEN) as other:
        assert sandbox.push(client=other).status_code == 201
        assert other.get("/api/v2/transactions").json()["total"] == 1
    assert sandbox.client.get("/api/v2/transactions").json()["total"] == 1


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("amount", {"amount": None}),
    ("amount", {"amount": "100"}),
    ("amount", {"amount": True}),
    ("amount", {"amount": 100.0}),
    ("amount", {"amount": 0}),
    ("amount", {"amount": -5}),
    ("amount", {"amount": 10**30}),
    ("phone_number", {"phone_number": None}),
    ("phone_number", {"phone_number": 712345678}),
    ("phone_number", {"phone_number": "0202345678"}),  # a Nairobi landline
    ("phone_number", {"phone_number": "12345"}),
    ("phone_number", {"phone_number": "+255712345678"}),  # Tanzania
    ("phone_number", {"phone_number": "0712345678" * 20}),
    ("channel_id", {"channel_id": None}),
    ("channel_id", {"channel_id": "2133"}),
    ("channel_id", {"channel_id": True}),
    ("channel_id", {"channel_id": 0}),
    ("provider", {"provider": None}),
    ("provider", {"provider": "airtel-money"}),
    ("provider", {"provider": "M-PESA"}),
    ("external_reference", {"external_reference": 9}),
    ("external_reference", {"external_reference": "X" * 65}),
    ("customer_name", {"customer_name": ["John"]}),
    ("callback_url", {"callback_url": "ftp://example.test/cb"}),
    ("callback_url", {"callback_url": "not a url"}),
    ("callback_url", {"callback_url": 7}),
    ("credential_id", {"credential_id": 1}),
]


@pytest.mark.parametrize(("field", "change"), BAD_FIELDS, ids=[f"{f}={v}"[:40] for f, v in BAD_FIELDS])
def test_each_bad_field_is_refused_400_naming_the_field(
    sandbox: RunningSandbox, field: str, change: dict[str, Any]
) -> None:
    # Given a body whose `field` is missing or wrong
    body = {key: value for key, value in (push_body() | change).items() if value is not None}
    # When it is pushed
    response = sandbox.client.post("/api/v2/payments", json=body)
    # Then the answer is 400 with an error_message that names the field, and nobody is prompted
    assert response.status_code == 400
    message = response.json()["error_message"]
    assert message.startswith("Invalid request")
    assert field in message
    stats = sandbox.stats()
    assert stats["pushes_total"] == 0
    assert stats["requests_refused"]["invalid"] == 1


def test_a_valid_push_answers_201_with_the_documented_shape(sandbox: RunningSandbox) -> None:
    # Given the documentation's own example body
    body = push_body(
        "0787677677",
        external_reference="INV-009",
        customer_name="John Doe",
        callback_url="",
        credential_id=None,
    )
    # When it is pushed
    response = sandbox.client.post("/api/v2/payments", json=body)
    # Then the 201 carries exactly the documented fields
    assert response.status_code == 201
    data = response.json()
    assert set(data) == {"success", "status", "reference", "CheckoutRequestID"}
    assert data["success"] is True
    assert data["status"] == "QUEUED"
    assert re.fullmatch(r"[A-Z0-9]{10}", data["reference"])
    # ws_CO_ + DDMMYYYYHHMMSSmmm + the national number, as in the documented examples
    assert re.fullmatch(r"ws_CO_\d{17}787677677", data["CheckoutRequestID"])
    assert sandbox.stats()["pushes_by_reference"] == {"INV-009": 1}


@pytest.mark.parametrize(
    "phone", ["0712345678", "254712345678", "+254712345678", " 0712 345 678 ", "0112345678"]
)
def test_every_kenyan_mobile_form_is_accepted(sandbox: RunningSandbox, phone: str) -> None:
    response = sandbox.push(phone)
    assert response.status_code == 201
    national = "112345678" if phone == "0112345678" else "712345678"
    assert response.json()["CheckoutRequestID"].endswith(national)


def test_unknown_body_fields_are_ignored(sandbox: RunningSandbox) -> None:
    assert sandbox.push(currency="KES", metadata={"any": ["thing"]}).status_code == 201


def test_transaction_status_moves_from_queued_to_success_when_the_outcome_happens(
    start_sandbox: StartSandbox,
) -> None:
    # Given a sandbox whose customers answer 60 s (sandbox time) after the prompt
    sandbox = start_sandbox(callback_delay_s=60)
    reference = sandbox.push(external_reference="INV-1").json()["reference"]
    # When the status is asked before the answer
    queued = sandbox.status(reference)
    # Then it is QUEUED, with every documented field (and external_reference)
    assert queued.status_code == 200
    assert set(queued.json()) == STATUS_FIELDS
    assert queued.json()["status"] == "QUEUED"
    assert queued.json()["success"] is False
    assert queued.json()["provider_reference"] is None
    # And once the answer's time has come, SUCCESS with the M-Pesa receipt
    sandbox.advance(60)
    done = sandbox.status(reference).json()
    assert done["status"] == "SUCCESS"
    assert done["success"] is True
    assert re.fullmatch(r"S[A-Z0-9]{9}", done["provider_reference"])
    assert done["reference"] == reference
    assert done["external_reference"] == "INV-1"
    assert done["provider"] == "m-pesa"


def test_transaction_status_moves_from_queued_to_failed_when_the_customer_cancels(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox({"phones": {"0722000001": "cancelled"}}, callback_delay_s=60)
    reference = sandbox.push("0722000001").json()["reference"]
    assert sandbox.status(reference).json()["status"] == "QUEUED"
    sandbox.advance(59)
    assert sandbox.status(reference).json()["status"] == "QUEUED"
    sandbox.advance(1)
    failed = sandbox.status(reference).json()
    assert failed["status"] == "FAILED"
    assert failed["success"] is False
    assert failed["provider_reference"] is None


def test_an_unknown_or_another_accounts_reference_is_404(sandbox: RunningSandbox) -> None:
    assert sandbox.status("NOSUCHREF1").status_code == 404
    assert sandbox.status("NOSUCHREF1").json() == {"error_message": "Transaction not found"}
    with sandbox.with_token(OTHER_TOKEN) as other:
        reference = sandbox.push(client=other).json()["reference"]
    assert sandbox.status(reference).status_code == 404


def test_transaction_status_without_a_reference_is_400(sandbox: RunningSandbox) -> None:
    response = sandbox.client.get("/api/v2/transaction-status")
    assert response.status_code == 400
    assert "reference" in response.json()["error_message"]


def test_the_transactions_list_is_newest_first_paginated_and_filtered(start_sandbox: StartSandbox) -> None:
    # Given five pushes INV-1..INV-5 whose outcomes have not happened yet
    sandbox = start_sandbox(callback_delay_s=30)
    for index in range(1, 6):
        assert sandbox.push(f"07220000{index:02d}", external_reference=f"INV-{index}").status_code == 201
    # When the list is read two at a time
    pages = [
        sandbox.client.get("/api/v2/transactions", params={"page": p, "per": 2}).json() for p in (1, 2, 3, 4)
    ]
    # Then it is newest first, with page, per and total, and the items have the status shape
    assert [[item["external_reference"] for item in page["data"]] for page in pages] == [
        ["INV-5", "INV-4"],
        ["INV-3", "INV-2"],
        ["INV-1"],
        [],
    ]
    assert {(page["page"], page["per"], page["total"]) for page in pages} == {(p, 2, 5) for p in (1, 2, 3, 4)}
    assert all(set(item) == STATUS_FIELDS and item["status"] == "QUEUED" for item in pages[0]["data"])
    # And the external_reference filter finds one push, which moves to SUCCESS with the clock
    sandbox.advance(30)
    found = sandbox.client.get("/api/v2/transactions", params={"external_reference": "INV-3"}).json()
    assert found["total"] == 1
    assert [(item["external_reference"], item["status"]) for item in found["data"]] == [("INV-3", "SUCCESS")]
    # And another account sees none of them
    with sandbox.with_token(OTHER_TOKEN) as other:
        assert other.get("/api/v2/transactions").json() == {"data": [], "page": 1, "per": 20, "total": 0}


@pytest.mark.parametrize(
    "query", [{"page": "0"}, {"page": "x"}, {"per": "101"}, {"per": "-1"}, {"page": "²"}]
)
def test_bad_paging_parameters_are_400_naming_the_parameter(
    sandbox: RunningSandbox, query: dict[str, str]
) -> None:
    response = sandbox.client.get("/api/v2/transactions", params=query)
    assert response.status_code == 400
    assert next(iter(query)) in response.json()["error_message"]


def test_a_reject_outcome_refuses_the_push_with_the_documented_400(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"phones": {"0700000108": "reject"}})
    response = sandbox.push("0700000108", external_reference="INV-R")
    assert response.status_code == 400
    assert response.json() == {"error_message": "Invalid request"}
    stats = sandbox.stats()
    assert stats["pushes_total"] == 0
    assert stats["requests_refused"]["rejected"] == 1
    assert sandbox.client.get("/api/v2/transactions").json()["total"] == 0


def test_a_channel_that_is_not_the_accounts_is_refused_with_the_documented_400(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox({"channels": [2133]})
    wrong = sandbox.push(external_reference="INV-CH1", channel_id=9999)
    assert (wrong.status_code, wrong.json()) == (400, {"error_message": "Invalid request"})
    assert sandbox.push(external_reference="INV-CH2").status_code == 201
    stats = sandbox.stats()
    assert (stats["pushes_total"], stats["requests_refused"]["rejected"]) == (1, 1)


def test_stats_have_the_documented_shape(sandbox: RunningSandbox) -> None:
    sandbox.push(external_reference="INV-1")
    stats = sandbox.stats()
    assert set(stats) >= {
        "pushes_total",
        "pushes_by_reference",
        "rule_triggers",
        "rule_triggers_total",
        "blocked_numbers",
        "account_restricted_until",
        "outcomes",
        "callbacks_sent",
        "callbacks_failed",
        "requests_refused",
        "faults",
    }
    assert stats["rule_triggers"] == {"phone_block": 0, "account_4h": 0, "account_24h": 0, "account_72h": 0}
    assert stats["account_restricted_until"] == {"account-1": None, "account-2": None}
    assert set(stats["requests_refused"]) >= {
        "blocked",
        "restricted",
        "invalid",
        "unauthorized",
        "rate_limited",
    }
    assert set(stats["outcomes"]) == {
        "success",
        "cancelled",
        "timeout",
        "insufficient",
        "wrong_pin",
        "in_progress",
        "no_callback",
    }
    assert stats["outcomes"]["success"] == 1
    assert stats["pushes_by_reference"] == {"INV-1": 1}
