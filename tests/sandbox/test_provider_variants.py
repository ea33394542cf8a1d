"""The sandbox's answers where UpesiPay's documentation is silent, so stkpush can be proven against each reading:
blocks and restrictions with or without Retry-After and an `until` time, a transactions list that lags, and
failures the merchant caused through other channels."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.sandbox.conftest import RunningSandbox, StartSandbox

HOUR = 3600
PHONE = "0712345678"


def block_phone(sandbox: RunningSandbox) -> httpx.Response:
    for _ in range(11):
        assert sandbox.push(PHONE).status_code == 201
    refused = sandbox.push(PHONE)
    assert refused.status_code == 429
    return refused


def other_channel(sandbox: RunningSandbox, **body: Any) -> httpx.Response:
    return httpx.post(f"{sandbox.url}/sandbox/other-channel", json=body, timeout=5)


def listed(sandbox: RunningSandbox, **params: Any) -> list[dict[str, Any]]:
    answer = sandbox.client.get("/api/v2/transactions", params={"per": 100, **params})
    assert answer.status_code == 200, answer.text
    data: list[dict[str, Any]] = answer.json()["data"]
    return data


@pytest.mark.parametrize(
    ("style", "has_header", "has_until"),
    [
        ("retry_after_and_until", True, True),
        ("retry_after", True, False),
        ("until", False, True),
        ("bare", False, False),
    ],
)
def test_a_block_is_answered_in_the_style_the_scenario_names(
    start_sandbox: StartSandbox, style: str, has_header: bool, has_until: bool
) -> None:
    sandbox = start_sandbox({"phones": {PHONE: "cancelled"}, "abuse_answer": style})
    refused = block_phone(sandbox)
    assert ("Retry-After" in refused.headers) is has_header
    message = refused.json()["error_message"]
    assert message.startswith("STK push blocked for this phone number by abuse protection")
    assert (" until " in message) is has_until
    if has_header:
        assert 24 * HOUR - 5 <= int(refused.headers["Retry-After"]) <= 24 * HOUR


def test_a_restriction_without_retry_after_or_until_still_names_the_account(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox({"abuse_answer": "bare"})
    assert other_channel(sandbox, count=51).json() == {"recorded": 51, "rule_triggers": 1}
    refused = sandbox.push("0733000001")
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    assert refused.json() == {"error_message": "Account restricted from STK push by abuse protection"}


def test_an_unknown_abuse_answer_style_is_refused(sandbox: RunningSandbox) -> None:
    answer = sandbox.put_scenario({"abuse_answer": "polite"})
    assert answer.status_code == 400 and "abuse_answer" in answer.text


def test_the_list_shows_a_push_only_after_the_lag(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"list_lag_s": 30})
    pushed = sandbox.push(PHONE, external_reference="LAG-1")
    assert pushed.status_code == 201
    reference = pushed.json()["reference"]
    # transaction-status knows it at once; the list does not, with or without the reference filter
    assert sandbox.status(reference).status_code == 200
    assert listed(sandbox) == [] and listed(sandbox, external_reference="LAG-1") == []
    sandbox.advance(29)
    assert listed(sandbox) == []
    sandbox.advance(2)
    assert [item["reference"] for item in listed(sandbox)] == [reference]
    assert [item["reference"] for item in listed(sandbox, external_reference="LAG-1")] == [reference]


def test_other_channel_failures_fill_the_window_and_show_in_the_list(sandbox: RunningSandbox) -> None:
    answer = other_channel(sandbox, count=40, outcome="timeout")
    assert answer.status_code == 200 and answer.json() == {"recorded": 40, "rule_triggers": 0}
    stats = sandbox.stats()
    assert stats["failures_in_window"]["account-1"] == 40
    assert stats["other_channel_failures"]["account-1"] == 40
    assert stats["pushes_total"] == 0 and stats["callbacks_sent"] == 0
    items = listed(sandbox)
    assert len(items) == 40
    assert {(item["status"], item["external_reference"]) for item in items} == {("FAILED", None)}
    assert len({item["reference"] for item in items}) == 40
    # ten more of ours and the eleventh failure beyond 50 restricts the account, counted as a trigger
    assert other_channel(sandbox, count=11).json()["rule_triggers"] == 1
    assert sandbox.push("0733000001").status_code == 429


def test_other_channel_failures_on_one_number_build_its_streak(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"phones": {PHONE: "cancelled"}})
    assert other_channel(sandbox, count=10, phone=PHONE).json()["rule_triggers"] == 0
    # the number's streak is at 10: one more failure of ours would block it
    assert sandbox.push(PHONE).status_code == 201
    assert sandbox.stats()["rule_triggers"]["phone_block"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"count": 0},
        {"count": 1001},
        {"count": True},
        {"outcome": "success"},
        {"outcome": "bankrupt"},
        {"account": "account-9"},
        {"phone": "12345"},
        {"phone": 712345678},
        {"extra": 1},
    ],
)
def test_a_bad_other_channel_request_is_400_and_records_nothing(
    sandbox: RunningSandbox, body: dict[str, Any]
) -> None:
    answer = other_channel(sandbox, **body)
    assert answer.status_code == 400 and answer.json()["error_message"].startswith("Invalid request")
    assert sandbox.stats()["other_channel_failures"]["account-1"] == 0
