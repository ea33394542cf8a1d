"""UpesiPay's abuse protection as the sandbox enforces it, with the documented limits, on its own clock."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import httpx

from tests.sandbox.conftest import OTHER_TOKEN, RunningSandbox, StartSandbox
from worker.sandbox.app import AbuseLimits, AccountTier, SandboxClock

HOUR = 3600
PHONE = "0712345678"
PHONE_MESSAGE = re.compile(r"STK push blocked for this phone number by abuse protection until (\S+)")
ACCOUNT_MESSAGE = re.compile(r"Account restricted from STK push by abuse protection until (\S+)")


def numbers(count: int) -> list[str]:
    return [f"0722{index:06d}" for index in range(count)]


def push_failures(sandbox: RunningSandbox, count: int, phones: list[str]) -> None:
    """`count` accepted pushes spread over `phones` (at most 10 each, so no number gets blocked)."""
    assert count <= 10 * len(phones)
    for index in range(count):
        response = sandbox.push(phones[index % len(phones)])
        assert response.status_code == 201, (index, response.text)


def retry_after(response: httpx.Response) -> int:
    return int(response.headers["Retry-After"])


def until(response: httpx.Response, pattern: re.Pattern[str]) -> datetime:
    match = pattern.fullmatch(response.json()["error_message"])
    assert match, response.text
    return datetime.fromisoformat(match.group(1))


def test_the_11th_successive_cancellation_blocks_the_number_for_24h(start_sandbox: StartSandbox) -> None:
    # Given a customer who cancels every prompt
    sandbox = start_sandbox({"phones": {PHONE: "cancelled"}})
    # When 11 prompts are cancelled in a row
    for _ in range(11):
        assert sandbox.push(PHONE).status_code == 201
    # Then the next push to that number is refused for 24 h from the 11th outcome
    refused = sandbox.push(PHONE)
    assert refused.status_code == 429
    assert 24 * HOUR - 5 <= retry_after(refused) <= 24 * HOUR
    blocked_until = until(refused, PHONE_MESSAGE)
    stats = sandbox.stats()
    assert blocked_until - datetime.fromisoformat(stats["clock"]) > timedelta(hours=23, minutes=59)
    assert stats["rule_triggers"]["phone_block"] == 1
    assert stats["rule_triggers_total"] == 1
    assert stats["blocked_numbers"] == ["2547****678"]
    assert stats["requests_refused"]["blocked"] == 1
    assert stats["pushes_total"] == 11
    # And it stays refused until the 24 h are over, with a Retry-After that counts down
    sandbox.advance(24 * HOUR - 10)
    still = sandbox.push(PHONE)
    assert still.status_code == 429
    assert 1 <= retry_after(still) <= 10
    sandbox.advance(11)
    assert sandbox.push(PHONE).status_code == 201
    assert sandbox.stats()["blocked_numbers"] == []


def test_ten_cancellations_do_not_block_a_number(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"phones": {PHONE: {"sequence": ["cancelled"] * 10 + ["success"]}}})
    for _ in range(11):
        assert sandbox.push(PHONE).status_code == 201
    assert sandbox.stats()["rule_triggers_total"] == 0


def test_a_success_before_the_11th_failure_resets_the_streak(start_sandbox: StartSandbox) -> None:
    # Given a customer who cancels 10 times, pays once, then cancels every time
    sandbox = start_sandbox({"phones": {PHONE: {"sequence": ["cancelled"] * 10 + ["success", "timeout"]}}})
    # When 21 prompts go out (10 failures, a success, 10 failures)
    for _ in range(21):
        assert sandbox.push(PHONE).status_code == 201
    # Then the number is not blocked: the success reset the streak
    assert sandbox.stats()["rule_triggers"]["phone_block"] == 0
    # And the 11th failure after the success blocks it
    assert sandbox.push(PHONE).status_code == 201
    assert sandbox.push(PHONE).status_code == 429
    assert sandbox.stats()["rule_triggers"]["phone_block"] == 1


def test_every_failure_kind_counts_toward_the_streak(start_sandbox: StartSandbox) -> None:
    kinds = ["cancelled", "timeout", "insufficient", "wrong_pin", "in_progress", "no_callback"]
    sandbox = start_sandbox({"phones": {PHONE: {"sequence": (kinds * 2)[:11]}}})
    for _ in range(11):
        assert sandbox.push(PHONE).status_code == 201
    assert sandbox.push(PHONE).status_code == 429


def test_a_blocked_number_does_not_affect_other_numbers_or_accounts(start_sandbox: StartSandbox) -> None:
    # Given a number blocked on account-1
    sandbox = start_sandbox({"phones": {PHONE: "cancelled"}})
    for _ in range(11):
        sandbox.push(PHONE)
    assert sandbox.push(PHONE).status_code == 429
    # Then other numbers on the account are still prompted
    assert sandbox.push("0722000001").status_code == 201
    assert sandbox.push("0733000002").status_code == 201
    # And the same number is still prompted from another account
    with sandbox.with_token(OTHER_TOKEN) as other:
        assert sandbox.push(PHONE, client=other).status_code == 201


def test_the_51st_failure_in_6h_restricts_the_account_for_4h(start_sandbox: StartSandbox) -> None:
    # Given an account whose customers all time out, and one customer who would pay
    payer = "0799000001"
    sandbox = start_sandbox({"default": "timeout", "phones": {payer: "success"}})
    # When 50 pushes fail, the account is still free
    push_failures(sandbox, 50, numbers(10))
    assert sandbox.stats()["account_restricted_until"]["account-1"] is None
    # And the 51st failure restricts it for 4 h, for every number
    assert sandbox.push("0722999999").status_code == 201
    for phone in ("0722000001", payer):
        refused = sandbox.push(phone)
        assert refused.status_code == 429
        assert 4 * HOUR - 5 <= retry_after(refused) <= 4 * HOUR
        until(refused, ACCOUNT_MESSAGE)
    stats = sandbox.stats()
    assert stats["rule_triggers"] == {"phone_block": 0, "account_4h": 1, "account_24h": 0, "account_72h": 0}
    assert stats["account_restricted_until"]["account-1"] is not None
    assert stats["account_restricted_until"]["account-2"] is None
    assert stats["requests_refused"]["restricted"] == 2
    # And the other account is not restricted
    with sandbox.with_token(OTHER_TOKEN) as other:
        assert sandbox.push(payer, client=other).status_code == 201
    # And the restriction ends 4 h after the 51st failure
    sandbox.advance(4 * HOUR - 10)
    assert sandbox.push(payer).status_code == 429
    sandbox.advance(11)
    assert sandbox.push(payer).status_code == 201
    assert sandbox.stats()["account_restricted_until"]["account-1"] is None


def test_the_failure_window_slides(start_sandbox: StartSandbox) -> None:
    # Given 30 failures at T and 20 more at T+3h (50 in the window: no restriction)
    sandbox = start_sandbox({"default": "cancelled"})
    phones = numbers(10)
    push_failures(sandbox, 30, phones)
    sandbox.advance(3 * HOUR)
    push_failures(sandbox, 20, numbers(20)[10:])
    assert sandbox.stats()["failures_in_window"]["account-1"] == 50
    # When the first 30 leave the 6 h window
    sandbox.advance(3 * HOUR + 1)
    assert sandbox.stats()["failures_in_window"]["account-1"] == 20
    # Then 30 more failures still leave the account free (50 in the window)
    push_failures(sandbox, 30, numbers(30)[20:])
    assert sandbox.stats()["rule_triggers_total"] == 0
    # And the next one is the 51st in the window: restricted
    assert sandbox.push("0733000001").status_code == 201
    assert sandbox.push("0733000002").status_code == 429
    assert sandbox.stats()["rule_triggers"]["account_4h"] == 1


def test_the_501st_and_1001st_failures_restrict_the_account_for_24h_and_72h(
    start_sandbox: StartSandbox,
) -> None:
    # Given 1001 failing pushes accepted before any outcome happens, their outcomes due in four steps:
    # 500 at T+60, the 501st at T+120, 499 more at T+180, the 1001st at T+240
    sandbox = start_sandbox({"default": "cancelled"}, callback_delay_s=60)
    phones = numbers(101)
    sent = 0
    for batch, delay in ((500, 60), (1, 120), (499, 180), (1, 240)):
        assert sandbox.put_scenario({"default": "cancelled", "callback_delay_s": delay}).status_code == 200
        for _ in range(batch):
            assert sandbox.push(phones[sent % 101]).status_code == 201
            sent += 1
    assert sandbox.stats()["outcomes_pending"] == 1001
    probe = "0799000009"

    def restriction_s() -> int:
        refused = sandbox.push(probe)
        assert refused.status_code == 429
        until(refused, ACCOUNT_MESSAGE)
        return retry_after(refused)

    # When the first 500 outcomes happen: the 4 h restriction only
    sandbox.advance(60)
    stats = sandbox.stats()
    assert stats["rule_triggers"] == {"phone_block": 0, "account_4h": 1, "account_24h": 0, "account_72h": 0}
    assert 4 * HOUR - 70 <= restriction_s() <= 4 * HOUR
    # Then the 501st: 24 h
    sandbox.advance(60)
    assert sandbox.stats()["rule_triggers"]["account_24h"] == 1
    assert 24 * HOUR - 70 <= restriction_s() <= 24 * HOUR
    # Then the 1000th is not enough for 72 h
    sandbox.advance(60)
    assert sandbox.stats()["rule_triggers"]["account_72h"] == 0
    # And the 1001st is: 72 h from that failure
    sandbox.advance(60)
    stats = sandbox.stats()
    assert stats["rule_triggers"] == {"phone_block": 0, "account_4h": 1, "account_24h": 1, "account_72h": 1}
    assert stats["rule_triggers_total"] == 3
    assert stats["failures_in_window"]["account-1"] == 1001
    assert 72 * HOUR - 70 <= restriction_s() <= 72 * HOUR
    sandbox.advance(72 * HOUR)
    assert sandbox.push(probe).status_code == 201


def test_refused_requests_never_count_as_failures(start_sandbox: StartSandbox) -> None:
    # Given 10 failures on one number and 60 invalid or unauthorized requests
    sandbox = start_sandbox({"default": "cancelled"})
    push_failures(sandbox, 10, [PHONE])
    for _ in range(60):
        assert sandbox.push(PHONE, amount="ten").status_code == 400
    for _ in range(5):
        assert httpx.post(sandbox.url + "/api/v2/payments", json={}).status_code == 401
    # Then neither the number nor the account is blocked
    stats = sandbox.stats()
    assert stats["rule_triggers_total"] == 0
    assert stats["failures_in_window"]["account-1"] == 10


def test_an_account_restricted_again_while_its_window_still_holds_over_50_failures(
    start_sandbox: StartSandbox,
) -> None:
    # Given a 4 h restriction that has ended while the 6 h window still holds 51 failures
    sandbox = start_sandbox({"default": "insufficient"})
    push_failures(sandbox, 51, numbers(10))
    sandbox.advance(4 * HOUR + 1)
    # When one more push fails, the window holds 52: the account is restricted again, from now
    assert sandbox.push("0733000001").status_code == 201
    refused = sandbox.push("0733000002")
    assert refused.status_code == 429
    assert retry_after(refused) > 4 * HOUR - 5
    assert sandbox.stats()["rule_triggers"]["account_4h"] == 2


def test_the_limits_are_configurable(start_sandbox: StartSandbox) -> None:
    # Given a sandbox with small limits: 2 failures per number, 3 per account window
    limits = AbuseLimits(
        phone_streak_limit=2,
        phone_block_s=100,
        window_s=600,
        tiers=(AccountTier("account_4h", 3, 50),),
    )
    sandbox = start_sandbox({"default": "cancelled"}, limits=limits)
    for _ in range(3):
        assert sandbox.push(PHONE).status_code == 201
    blocked = sandbox.push(PHONE)
    assert blocked.status_code == 429
    assert PHONE_MESSAGE.fullmatch(blocked.json()["error_message"])
    assert sandbox.push("0722000001").status_code == 201  # the 4th failure: over 3
    restricted = sandbox.push("0722000002")
    assert ACCOUNT_MESSAGE.fullmatch(restricted.json()["error_message"])
    assert retry_after(restricted) <= 50
    assert sandbox.stats()["rule_triggers"] == {"phone_block": 1, "account_4h": 1}


def test_a_test_may_move_the_clock_it_gave_the_config(start_sandbox: StartSandbox) -> None:
    # Given a sandbox whose clock the test holds, and a blocked number
    clock = SandboxClock()
    sandbox = start_sandbox({"phones": {PHONE: "cancelled"}}, clock=clock)
    for _ in range(11):
        sandbox.push(PHONE)
    assert sandbox.push(PHONE).status_code == 429
    # When the test moves that clock past the 24 h block
    clock.advance(24 * HOUR + 1)
    # Then the number is prompted again
    assert sandbox.push(PHONE).status_code == 201
