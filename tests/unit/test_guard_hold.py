"""A number at its streak limit is held until a success on it or an operator's release (the default), or rests for
the cooldown when the merchant chose PHONE_AT_LIMIT=rest; and the guard's limits can't exceed UpesiPay's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.test_guard import SMALL, Clock, GuardFactory, clock, fail, make_guard
from worker.guard import Decision, Guard, GuardLimits, Outcome, RefusalReason
from worker.guard.guard import HOLD_S
from worker.settings import SettingsError, load_settings

PHONE = "254712345678"
DAY = 86400.0
__all__ = ["clock", "make_guard"]  # fixtures of test_guard, used here
HELD = replace(SMALL, phone_cooldown_s=HOLD_S)
REQUIRED = {
    "upesipay_base_url": "http://upesipay.test",
    "upesipay_auth_token": "token",
    "upesipay_channel_id": 1,
    "callback_base_url": "http://callbacks.test",
    "callback_secret": "0123456789abcdef",
}


@pytest.fixture
def held(make_guard: GuardFactory) -> Guard:
    return make_guard(HELD)


def fill_streak(guard: Guard, clock: Clock) -> None:
    for index in range(guard.limits.phone_streak_limit):
        fail(guard, PHONE, f"f{index}")
        clock.advance(60)


def test_a_number_at_its_limit_is_never_admitted_again_by_time_alone(held: Guard, clock: Clock) -> None:
    # Given a number that reached its limit
    fill_streak(held, clock)
    # When a day, a week and a year pass
    for wait in (DAY, 7 * DAY, 365 * DAY):
        clock.advance(wait)
        decision = held.admit(PHONE, f"later-{wait}")
        # Then it is still refused as blocked, with a wait no run will see end
        assert not decision.admitted and decision.reason == RefusalReason.PHONE_BLOCKED
        assert decision.retry_after > 50 * 365 * DAY
    assert held.phone_snapshot(PHONE).streak == held.limits.phone_streak_limit


def test_a_release_frees_a_held_number_and_its_streak_starts_afresh(held: Guard, clock: Clock) -> None:
    fill_streak(held, clock)
    assert held.release_phone(PHONE) is True
    assert held.phone_snapshot(PHONE).streak == 0
    assert held.admit(PHONE, "after-release") == Decision(True, None, 0.0)
    # A second release of a number without a streak changes nothing
    assert held.resolve("after-release", Outcome.SUCCESS)
    assert held.release_phone(PHONE) is False


def test_a_release_keeps_the_sends_in_flight(held: Guard, clock: Clock) -> None:
    fail(held, PHONE, "f0")
    assert held.admit(PHONE, "live").admitted
    assert held.release_phone(PHONE) is True
    snapshot = held.phone_snapshot(PHONE)
    assert (snapshot.streak, snapshot.in_flight) == (0, 1)
    assert held.account_snapshot().in_flight == 1


def test_rest_mode_frees_the_number_after_the_cooldown(make_guard: GuardFactory, clock: Clock) -> None:
    rests = make_guard(SMALL, account="acct-rest")
    fill_streak(rests, clock)
    assert not rests.admit(PHONE, "early").admitted
    clock.advance(SMALL.phone_cooldown_s)
    assert rests.admit(PHONE, "rested").admitted


def test_settings_hold_by_default_and_rest_only_when_asked() -> None:
    assert GuardLimits.from_settings(load_settings(**REQUIRED)).holds_at_limit
    rested = GuardLimits.from_settings(
        load_settings(**REQUIRED, phone_at_limit="rest", phone_cooldown_s=3600)
    )
    assert not rested.holds_at_limit and rested.phone_cooldown_s == 3600


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        (
            "phone_streak_limit",
            11,
            "PHONE_STREAK_LIMIT: Value error, must be at most 10: UpesiPay blocks a number",
        ),
        (
            "account_failure_limit",
            51,
            "ACCOUNT_FAILURE_LIMIT: Value error, must be at most 50: UpesiPay restricts",
        ),
        ("phone_at_limit", "forget", "PHONE_AT_LIMIT: Input should be 'hold' or 'rest'"),
    ],
)
def test_limits_above_the_providers_are_refused_naming_the_rule(field: str, value: object, rule: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(**REQUIRED, **{field: value})
    assert rule in str(refused.value)


def test_lower_limits_are_a_margin_and_allowed() -> None:
    settings = load_settings(**REQUIRED, phone_streak_limit=7, account_failure_limit=40)
    assert (settings.phone_streak_limit, settings.account_failure_limit) == (7, 40)
