"""count_external_failure: a failure the account made through another channel fills the window once per provider
reference, at its own time, slides out with the window, and restricts the account when it crosses a tier."""

from __future__ import annotations

import pytest

from tests.unit.test_guard import SMALL, Clock, GuardFactory, clock, make_guard
from worker.guard import Guard, RefusalReason

HOUR = 3600.0
__all__ = ["clock", "make_guard"]  # fixtures of test_guard, used here


@pytest.fixture
def guard(make_guard: GuardFactory) -> Guard:
    return make_guard()


def test_an_external_failure_counts_once_by_reference(guard: Guard, clock: Clock) -> None:
    assert guard.count_external_failure("REF1", clock.now - 60) is True
    assert guard.count_external_failure("REF1", clock.now - 60) is False
    snapshot = guard.account_snapshot()
    assert snapshot.failures_in_window == 1
    assert snapshot.headroom == SMALL.account_failure_limit - 1


def test_an_external_failure_slides_out_at_its_own_time(guard: Guard, clock: Clock) -> None:
    guard.count_external_failure("OLD", clock.now - SMALL.account_window_s + 30)
    assert guard.account_snapshot().failures_in_window == 1
    clock.advance(31)
    assert guard.account_snapshot().failures_in_window == 0
    # One already outside the window is not counted at all
    assert guard.count_external_failure("OLDER", clock.now - SMALL.account_window_s - 1) is False


def test_external_failures_that_cross_a_tier_restrict_the_account(guard: Guard, clock: Clock) -> None:
    threshold = SMALL.restriction_tiers[0][0]
    for index in range(threshold + 1):
        guard.count_external_failure(f"R{index}", clock.now)
    decision = guard.admit("254712345678", "t1")
    assert not decision.admitted and decision.reason == RefusalReason.ACCOUNT_RESTRICTED
    assert decision.retry_after == pytest.approx(SMALL.restriction_tiers[0][1], abs=1)


def test_a_revert_never_takes_back_an_external_failure(guard: Guard, clock: Clock) -> None:
    guard.count_external_failure("EXT", clock.now)
    assert guard.revert_failure("x:EXT") is False
    assert guard.revert_failure("EXT") is False
    assert guard.account_snapshot().failures_in_window == 1
