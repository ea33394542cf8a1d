"""The guard's rules, one behaviour per test, against the suite's private Redis (fakeredis has no Lua here).

Given a guard with an injected clock, when something happens, then the decision, snapshot or key says so.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from worker.guard import (
    Decision,
    Guard,
    GuardLimits,
    GuardUnavailable,
    Lane,
    Outcome,
    RefusalReason,
    recovery,
)
from worker.local.embedded_redis import free_port
from worker.settings import load_settings

START = 1_700_000_000.0
HOUR = 3600.0
PHONE = "254712345678"
OTHER = "254712345679"
SMALL = GuardLimits(
    phone_streak_limit=3,
    phone_cooldown_s=2 * HOUR,
    account_failure_limit=5,
    account_window_s=HOUR,
    restriction_tiers=((6, 4 * HOUR), (8, 24 * HOUR), (10, 72 * HOUR)),
    busy_poll_s=7.0,
    phone_memory_s=10 * HOUR,
)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


GuardFactory = Callable[..., Guard]


@pytest.fixture
def make_guard(redis_client: redis.Redis, clock: Clock) -> GuardFactory:
    def build(limits: GuardLimits = SMALL, account: str = "acct") -> Guard:
        guard = Guard(redis_client, account, limits, clock=clock)
        recovery.start_empty(guard)  # a fresh account: its (empty) ledger is what the guard starts from
        return guard

    return build


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def phone(i: int) -> str:
    return f"2547{i:08d}"


def fail(guard: Guard, number: str, token: str) -> None:
    assert guard.admit(number, token).admitted
    assert guard.resolve(token, Outcome.FAILURE)


def test_admit_reserves_and_counts_in_flight(make_guard: GuardFactory) -> None:
    guard = make_guard()
    assert guard.admit(PHONE, "t1") == Decision(True, None, 0.0)
    assert guard.phone_snapshot(PHONE).in_flight == 1
    account = guard.account_snapshot()
    assert (account.in_flight, account.failures_in_window, account.headroom) == (1, 0, 4)


def test_readmit_of_a_held_token_does_not_count_twice(make_guard: GuardFactory) -> None:
    guard = make_guard()
    assert guard.admit(PHONE, "t1").admitted
    assert guard.admit(PHONE, "t1").admitted
    assert guard.phone_snapshot(PHONE).in_flight == 1
    assert guard.account_snapshot().in_flight == 1
    assert guard.resolve("t1", Outcome.RELEASED)
    assert guard.account_snapshot().in_flight == 0


def test_readmit_of_a_held_token_for_another_number_is_refused_as_a_bug(make_guard: GuardFactory) -> None:
    guard = make_guard()
    assert guard.admit(PHONE, "t1").admitted
    with pytest.raises(ValueError, match="another number"):
        guard.admit(OTHER, "t1")
    assert guard.phone_snapshot(OTHER).in_flight == 0


def test_second_prompt_to_a_number_waits_for_the_first(make_guard: GuardFactory) -> None:
    guard = make_guard()
    assert guard.admit(PHONE, "t1").admitted
    assert guard.admit(PHONE, "t2") == Decision(False, RefusalReason.PHONE_BUSY, 7.0)
    assert guard.admit(OTHER, "t3").admitted
    guard.resolve("t1", Outcome.SUCCESS)
    assert guard.admit(PHONE, "t2").admitted


def test_in_flight_sends_count_against_the_streak(make_guard: GuardFactory) -> None:
    guard = make_guard(GuardLimits(phone_streak_limit=3, phone_max_inflight=3))
    fail(guard, PHONE, "f1")
    fail(guard, PHONE, "f2")
    assert guard.admit(PHONE, "t3").admitted
    # streak 2 + 1 in flight = 3 = limit: a fourth could be the 4th successive failure.
    assert guard.admit(PHONE, "t4") == Decision(False, RefusalReason.PHONE_BUSY, 30.0)


def test_number_at_its_streak_limit_rests_for_the_cooldown_after_its_last_failure(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    clock.advance(100)
    fail(guard, PHONE, "f2")
    clock.advance(100)
    fail(guard, PHONE, "f3")
    last_failure = clock.now
    clock.advance(600)
    assert guard.admit(PHONE, "t4") == Decision(False, RefusalReason.PHONE_BLOCKED, 2 * HOUR - 600)
    snapshot = guard.phone_snapshot(PHONE)
    assert (snapshot.streak, snapshot.blocked_until) == (3, last_failure + 2 * HOUR)
    clock.now = last_failure + 2 * HOUR - 0.001
    assert guard.admit(PHONE, "t4") == Decision(False, RefusalReason.PHONE_BLOCKED, 0.001)
    clock.now = last_failure + 2 * HOUR
    assert guard.phone_snapshot(PHONE).streak == 0
    assert guard.admit(PHONE, "t4").admitted


def test_success_resets_the_streak_and_release_keeps_it(make_guard: GuardFactory, clock: Clock) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    fail(guard, PHONE, "f2")
    assert guard.admit(PHONE, "r1").admitted
    assert guard.resolve("r1", Outcome.RELEASED)
    assert guard.phone_snapshot(PHONE).streak == 2
    assert guard.admit(PHONE, "s1").admitted
    assert guard.resolve("s1", Outcome.SUCCESS)
    assert guard.phone_snapshot(PHONE).streak == 0
    assert guard.account_snapshot().failures_in_window == 2


def test_streak_below_the_limit_is_forgotten_after_phone_memory(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    fail(guard, PHONE, "f2")
    clock.advance(10 * HOUR - 0.001)
    assert guard.phone_snapshot(PHONE).streak == 2
    clock.advance(0.001)
    assert guard.phone_snapshot(PHONE).streak == 0


def test_budget_counts_in_flight_and_only_a_resolve_can_help(make_guard: GuardFactory) -> None:
    guard = make_guard()
    for i in range(5):
        assert guard.admit(phone(i), f"t{i}").admitted
    assert guard.admit(phone(9), "t9") == Decision(False, RefusalReason.ACCOUNT_BUDGET, 7.0)
    assert guard.account_snapshot().headroom == 0
    guard.resolve("t0", Outcome.SUCCESS)
    assert guard.admit(phone(9), "t9").admitted


LANES = GuardLimits(
    phone_streak_limit=3,
    account_failure_limit=10,
    account_window_s=HOUR,
    busy_poll_s=7.0,
    interactive_reserve=4,
    bulk_max_inflight=3,
)


def test_bulk_stops_at_its_in_flight_cap_and_interactive_goes_on(make_guard: GuardFactory) -> None:
    guard = make_guard(LANES)
    for i in range(3):
        assert guard.admit(phone(i), f"b{i}", Lane.BULK).admitted
    assert guard.admit(phone(3), "b3", Lane.BULK) == Decision(False, RefusalReason.BULK_LANE_FULL, 7.0)
    account = guard.account_snapshot()
    assert (account.in_flight, account.bulk_in_flight, account.bulk_headroom, account.headroom) == (
        3,
        3,
        0,
        7,
    )
    assert guard.admit(phone(4), "i4", Lane.INTERACTIVE).admitted
    # A bulk resolve, whatever its outcome, frees one place in the bulk lane; an interactive one does not.
    assert guard.resolve("i4", Outcome.SUCCESS)
    assert guard.admit(phone(3), "b3", Lane.BULK) == Decision(False, RefusalReason.BULK_LANE_FULL, 7.0)
    assert guard.resolve("b0", Outcome.FAILURE)
    assert guard.account_snapshot().bulk_in_flight == 2
    assert guard.admit(phone(3), "b3", Lane.BULK).admitted


def test_bulk_leaves_the_interactive_reserve_and_interactive_may_use_it_all(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard(LANES)
    # Six failures in the window: the bulk lane (10 - 4 = 6) is exhausted, exactly until the first slides out.
    for i in range(6):
        assert guard.admit(phone(i), f"b{i}", Lane.BULK).admitted
        assert guard.resolve(f"b{i}", Outcome.FAILURE)
        clock.advance(60)
    refused = guard.admit(phone(6), "b6", Lane.BULK)
    assert refused == Decision(False, RefusalReason.BULK_LANE_FULL, HOUR - 360)
    account = guard.account_snapshot()
    assert (account.bulk_headroom, account.headroom) == (0, 4)
    for i in range(4):
        assert guard.admit(phone(10 + i), f"i{i}").admitted
    # Now the whole budget is taken, and a bulk admit names the budget itself.
    assert guard.admit(phone(20), "i20") == Decision(False, RefusalReason.ACCOUNT_BUDGET, HOUR - 360)
    assert guard.admit(phone(21), "b21", Lane.BULK).reason == RefusalReason.ACCOUNT_BUDGET


def test_interactive_sends_in_flight_count_against_the_bulk_lane(make_guard: GuardFactory) -> None:
    guard = make_guard(LANES)
    for i in range(6):
        assert guard.admit(phone(i), f"i{i}").admitted
    assert guard.admit(phone(9), "b9", Lane.BULK) == Decision(False, RefusalReason.BULK_LANE_FULL, 7.0)
    assert guard.resolve("i0", Outcome.RELEASED)
    assert guard.admit(phone(9), "b9", Lane.BULK).admitted


def test_readmit_of_a_bulk_token_keeps_its_lane_and_counts_once(make_guard: GuardFactory) -> None:
    guard = make_guard(LANES)
    assert guard.admit(PHONE, "b1", Lane.BULK).admitted
    assert guard.admit(PHONE, "b1", Lane.BULK).admitted
    assert guard.admit(PHONE, "b1", Lane.INTERACTIVE).admitted
    account = guard.account_snapshot()
    assert (account.in_flight, account.bulk_in_flight) == (1, 1)
    with pytest.raises(ValueError, match="another number"):
        guard.admit(OTHER, "b1", Lane.BULK)
    assert guard.resolve("b1", Outcome.SUCCESS)
    account = guard.account_snapshot()
    assert (account.in_flight, account.bulk_in_flight) == (0, 0)
    assert guard.phone_snapshot(PHONE).in_flight == 0


def test_budget_refusal_is_exact_when_the_window_decides(make_guard: GuardFactory, clock: Clock) -> None:
    guard = make_guard()
    for i in range(4):
        fail(guard, phone(i), f"f{i}")
        clock.advance(60)
    # window: failures at +0, +60, +120, +180; one in flight: 4 + 1 = 5 = limit.
    assert guard.admit(phone(5), "t5").admitted
    refused = guard.admit(phone(6), "t6")
    assert refused == Decision(False, RefusalReason.ACCOUNT_BUDGET, HOUR - 240)
    clock.now = START + HOUR - 0.001
    assert not guard.admit(phone(6), "t6").admitted
    clock.now = START + HOUR
    assert guard.account_snapshot().failures_in_window == 3
    assert guard.admit(phone(6), "t6").admitted


def test_budget_refusal_names_the_entry_that_must_slide_out(make_guard: GuardFactory, clock: Clock) -> None:
    guard = make_guard(GuardLimits(account_failure_limit=3, account_window_s=HOUR))
    for i in range(3):
        fail(guard, phone(i), f"f{i}")
        clock.advance(100)
    # Three failures, no room; the first to leave frees room: at START + HOUR.
    assert guard.admit(phone(7), "t7") == Decision(False, RefusalReason.ACCOUNT_BUDGET, HOUR - 300)


def test_budget_refusal_waits_for_enough_entries_to_slide_out(make_guard: GuardFactory, clock: Clock) -> None:
    # Another integration with a bigger budget filled the window past ours.
    ours = make_guard(GuardLimits(account_failure_limit=3, account_window_s=HOUR))
    theirs = make_guard(GuardLimits(account_failure_limit=10, account_window_s=HOUR))
    for i in range(5):
        fail(theirs, phone(i), f"f{i}")
        clock.advance(100)
    # Failures at +0 .. +400, now +500: three must leave before 2 < 3, the third oldest (+200) last.
    assert ours.admit(phone(9), "t9") == Decision(False, RefusalReason.ACCOUNT_BUDGET, HOUR + 200 - 500)
    clock.now = START + HOUR + 200 - 0.001
    assert not ours.admit(phone(9), "t9").admitted
    clock.now = START + HOUR + 200
    assert ours.admit(phone(9), "t9").admitted


def test_crossing_a_tier_restricts_the_account_from_the_crossing(
    make_guard: GuardFactory, clock: Clock
) -> None:
    # A budget above the first tier stands in for other traffic on the same account.
    limits = GuardLimits(
        account_failure_limit=20, account_window_s=HOUR, restriction_tiers=((3, 4 * HOUR), (5, 24 * HOUR))
    )
    guard = make_guard(limits)
    for i in range(3):
        fail(guard, phone(i), f"f{i}")
    assert guard.account_snapshot().restricted_until is None
    assert guard.admit(phone(3), "f3").admitted
    assert guard.admit(phone(4), "f4").admitted
    clock.advance(10)
    guard.resolve("f3", Outcome.FAILURE)
    crossing = clock.now
    snapshot = guard.account_snapshot()
    assert snapshot.restricted_until == crossing + 4 * HOUR
    assert snapshot.restriction_reason == "more than 3 failures in the window"
    assert guard.admit(phone(5), "t5") == Decision(False, RefusalReason.ACCOUNT_RESTRICTED, 4 * HOUR)
    clock.advance(10)
    guard.resolve("f4", Outcome.FAILURE)  # 5 failures: not above the second tier yet, no extension
    assert guard.account_snapshot().restricted_until == crossing + 4 * HOUR


def test_higher_tier_restricts_longer(make_guard: GuardFactory, clock: Clock) -> None:
    limits = GuardLimits(
        account_failure_limit=20, phone_max_inflight=1, restriction_tiers=((2, 4 * HOUR), (3, 24 * HOUR))
    )
    guard = make_guard(limits)
    for i in range(4):
        assert guard.admit(phone(i), f"t{i}").admitted
    for i in range(4):
        guard.resolve(f"t{i}", Outcome.FAILURE)
    snapshot = guard.account_snapshot()
    assert snapshot.restricted_until == START + 24 * HOUR
    assert snapshot.restriction_reason == "more than 3 failures in the window"


def test_provider_restriction_refuses_until_it_ends_and_only_extends(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard()
    guard.restrict_account(600, "HTTP 429 for 254712345678")
    snapshot = guard.account_snapshot()
    assert snapshot.restricted_until == START + 600
    assert snapshot.restriction_reason == "HTTP 429 for ****"
    guard.restrict_account(60, "shorter")
    assert guard.account_snapshot().restriction_reason == "HTTP 429 for ****"
    assert guard.admit(PHONE, "t1") == Decision(False, RefusalReason.ACCOUNT_RESTRICTED, 600)
    clock.advance(600)
    assert guard.account_snapshot().restricted_until is None
    assert guard.admit(PHONE, "t1").admitted


def test_provider_block_refuses_that_number_only_until_it_ends(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard()
    guard.block_phone(PHONE, 3600)
    assert guard.admit(PHONE, "t1") == Decision(False, RefusalReason.PHONE_BLOCKED, 3600)
    assert guard.admit(OTHER, "t2").admitted
    assert guard.phone_snapshot(PHONE).blocked_until == START + 3600
    assert guard.account_snapshot().blocked_numbers == 1
    clock.advance(3600)
    assert guard.account_snapshot().blocked_numbers == 0
    assert guard.phone_snapshot(PHONE).blocked_until is None
    assert guard.admit(PHONE, "t1").admitted


def test_blocks_only_extend_and_each_ends_on_its_own(make_guard: GuardFactory, clock: Clock) -> None:
    guard = make_guard()
    guard.block_phone(PHONE, 3600)
    guard.block_phone(PHONE, 60)  # a shorter answer does not shorten the block
    guard.block_phone(OTHER, 7200)
    assert guard.admit(PHONE, "t1") == Decision(False, RefusalReason.PHONE_BLOCKED, 3600)
    clock.advance(3600)  # exactly when the first block ends; the other still runs
    assert guard.admit(PHONE, "t1").admitted
    assert guard.admit(OTHER, "t2") == Decision(False, RefusalReason.PHONE_BLOCKED, 3600)
    assert guard.account_snapshot().blocked_numbers == 1


def test_resolving_an_unknown_or_settled_token_changes_nothing(
    make_guard: GuardFactory, redis_client: redis.Redis
) -> None:
    guard = make_guard()
    assert guard.resolve("never", Outcome.FAILURE) is False
    assert guard.admit(PHONE, "t1").admitted
    assert guard.resolve("t1", Outcome.FAILURE) is True
    before = {key: redis_client.dump(key) for key in redis_client.keys()}
    for outcome in Outcome:
        assert guard.resolve("t1", outcome) is False
    assert {key: redis_client.dump(key) for key in redis_client.keys()} == before
    assert guard.phone_snapshot(PHONE).streak == 1


def test_revert_takes_back_the_window_entry_and_the_streak_step(make_guard: GuardFactory) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    fail(guard, PHONE, "f2")
    assert guard.revert_failure("f1") is True
    assert guard.account_snapshot().failures_in_window == 1
    assert guard.phone_snapshot(PHONE).streak == 1
    assert guard.revert_failure("f1") is False
    assert guard.revert_failure("unknown") is False


def test_revert_lifts_a_resting_number_below_its_limit(make_guard: GuardFactory) -> None:
    guard = make_guard()
    for i in range(3):
        fail(guard, PHONE, f"f{i}")
    assert guard.admit(PHONE, "t").reason is RefusalReason.PHONE_BLOCKED
    assert guard.revert_failure("f2")
    assert guard.admit(PHONE, "t").admitted


def test_revert_after_a_success_leaves_the_new_streak_alone(make_guard: GuardFactory) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    assert guard.admit(PHONE, "s1").admitted
    guard.resolve("s1", Outcome.SUCCESS)
    fail(guard, PHONE, "f2")
    assert guard.revert_failure("f1") is True
    assert guard.phone_snapshot(PHONE).streak == 1  # f2's streak: f1 belonged to the one the success ended
    assert guard.account_snapshot().failures_in_window == 1


def test_revert_after_the_window_changes_nothing(make_guard: GuardFactory, clock: Clock) -> None:
    guard = make_guard()
    fail(guard, PHONE, "f1")
    clock.advance(HOUR)
    assert guard.revert_failure("f1") is False
    assert guard.phone_snapshot(PHONE).streak == 1


def test_revert_takes_back_the_latest_failure_of_a_reused_token(
    make_guard: GuardFactory, clock: Clock
) -> None:
    guard = make_guard()
    fail(guard, PHONE, "same")
    clock.advance(60)
    fail(guard, PHONE, "same")
    assert guard.revert_failure("same")
    assert guard.account_snapshot().failures_in_window == 1
    clock.now = (
        START + HOUR
    )  # the first failure leaves the window: the one left was the first, not the second
    assert guard.account_snapshot().failures_in_window == 0
    assert guard.revert_failure("same") is False
    assert guard.phone_snapshot(PHONE).streak == 1


def test_every_key_has_a_ttl_and_shares_the_account_hash_tag(
    make_guard: GuardFactory, redis_client: redis.Redis
) -> None:
    guard = make_guard(GuardLimits(phone_streak_limit=3, account_failure_limit=5))
    fail(guard, PHONE, "f1")
    assert guard.admit(OTHER, "t2").admitted
    guard.block_phone(phone(5), 60)
    keys = [_as_bytes(key) for key in redis_client.keys("*")]
    assert {key.decode() for key in keys} == {f"stkpush:{{acct}}:{name}" for name in "sw"}
    assert len({key_slot(key) for key in keys}) == 1
    ttls = {key.decode()[-1]: redis_client.pttl(key) for key in keys}
    # TTLs are kept at least their length and topped up to 9/8 of it (docs/guard.md).
    assert ttls["s"] == pytest.approx(30 * 86400 * 1000 * 9 / 8, abs=5000)
    assert 6 * 3600 * 1000 - 5000 <= ttls["w"] <= 6 * 3600 * 1000 * 9 / 8
    guard.restrict_account(70 * 86400, "long provider restriction")
    assert redis_client.pttl("stkpush:{acct}:s") == pytest.approx(70 * 86400 * 1000, abs=5000)


def test_ttls_are_topped_up_once_an_eighth_of_them_has_passed(
    make_guard: GuardFactory, redis_client: redis.Redis, clock: Clock
) -> None:
    guard = make_guard()  # SMALL: the state hash needs 10 h (phone_memory_s), the window 1 h
    fail(guard, PHONE, "f1")
    assert guard.admit(PHONE, "t2").admitted
    redis_client.pexpire("stkpush:{acct}:s", 1000)
    redis_client.pexpire("stkpush:{acct}:w", 1000)
    clock.advance(10 * HOUR / 8)  # both tops-up are due by now
    guard.resolve("t2", Outcome.FAILURE)
    assert redis_client.pttl("stkpush:{acct}:s") == pytest.approx(10 * HOUR * 1000 * 9 / 8, abs=5000)
    assert redis_client.pttl("stkpush:{acct}:w") == pytest.approx(HOUR * 1000 * 9 / 8, abs=5000)


def test_dead_phone_fields_are_collected(make_guard: GuardFactory, redis_client: redis.Redis) -> None:
    guard = make_guard(GuardLimits(account_failure_limit=10_000, restriction_tiers=(), phone_memory_s=86400))
    state = "stkpush:{acct}:s"
    for i in range(20):
        assert guard.admit(phone(i), f"r{i}").admitted
        guard.resolve(f"r{i}", Outcome.RELEASED)  # nothing left: the number's field goes at once
    # Counters and the rebuild marker only: no number has state.
    assert set(redis_client.hkeys(state)) == {b"n", b"x", b"e", b"q", b"xw"}
    for i in range(10):  # in flight: live
        assert guard.admit(phone(4000 + i), f"held{i}").admitted
    # 300 fields whose streak was forgotten long ago (last failure at epoch + 1 ms): dead.
    stale = {phone(1000 + i) for i in range(300)}
    redis_client.hset(state, mapping=dict.fromkeys(stale, struct.pack(">HHdI", 1, 0, 1.0, 1)))
    guard._collect_above(0)
    for i in range(300):  # only failures leave fields behind, so failures pay for collection
        fail(guard, phone(5000 + i), f"f{i}")
    fields = {_as_bytes(field).decode() for field in redis_client.hkeys(state)}
    live = {phone(4000 + i) for i in range(10)} | {phone(5000 + i) for i in range(300)}
    assert live <= fields  # nothing live is ever collected
    assert {f"t:held{i}" for i in range(10)} <= fields  # nor a reservation
    assert len(fields & stale) < 100  # about 300 * e^(-3 * 300 / ~460) = 42 expected


class CountingConnection(redis.Connection):
    round_trips = 0

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        CountingConnection.round_trips += 1
        return super().read_response(*args, **kwargs)


def test_admit_and_resolve_are_one_round_trip_each(redis_url: str, clock: Clock) -> None:
    client = redis.Redis.from_url(redis_url)
    client.connection_pool.connection_class = CountingConnection
    guard = Guard(client, "acct", SMALL, clock=clock)
    recovery.start_empty(guard)
    assert guard.admit(PHONE, "warm").admitted  # the first call may load the script
    guard.resolve("warm", Outcome.SUCCESS)
    guard.resolve("warm", Outcome.SUCCESS)
    CountingConnection.round_trips = 0
    assert guard.admit(PHONE, "t1").admitted
    assert CountingConnection.round_trips == 1
    assert guard.resolve("t1", Outcome.FAILURE)
    assert CountingConnection.round_trips == 2
    client.close()


def test_guard_works_with_a_decoding_client(redis_url: str, clock: Clock) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    guard = Guard(client, "acct", SMALL, clock=clock)
    recovery.start_empty(guard)
    fail(guard, PHONE, "f1")
    guard.restrict_account(60, "provider said so")
    assert guard.account_snapshot().restriction_reason == "provider said so"
    assert guard.revert_failure("f1")
    client.close()


def test_without_an_injected_clock_the_guard_uses_redis_time(redis_client: redis.Redis) -> None:
    guard = Guard(redis_client, "acct", SMALL)
    recovery.start_empty(guard)
    assert guard.admit(PHONE, "t1").admitted
    guard.resolve("t1", Outcome.FAILURE)
    seconds, micros = (int(part) for part in redis_client.time())
    entries = list(redis_client.zrange("stkpush:{acct}:w", 0, -1, withscores=True))
    assert len(entries) == 1
    assert 0 <= seconds * 1000 + micros // 1000 - float(entries[0][1]) < 5000
    assert guard.admit(PHONE, "t2").admitted


def test_accounts_do_not_share_state(make_guard: GuardFactory) -> None:
    first, second = make_guard(account="one"), make_guard(account="two")
    assert first.admit(PHONE, "t1").admitted
    assert second.admit(PHONE, "t1").admitted


@pytest.fixture
def closed_port_client() -> Iterator[redis.Redis]:
    # No retries: redis-py's default backoff would only make the test slow; the guard's answer is the same.
    client = redis.Redis(
        port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    yield client
    client.close()


def test_admit_fails_closed_without_naming_the_number(
    closed_port_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    guard = Guard(closed_port_client, "acct", SMALL)
    with caplog.at_level(logging.WARNING, logger="worker.guard.guard"):
        decision = guard.admit(PHONE, "t1")
    assert decision == Decision(False, RefusalReason.GUARD_UNAVAILABLE, 7.0)
    assert caplog.records
    assert PHONE not in caplog.text and "345678" not in caplog.text


@pytest.mark.parametrize(
    "call",
    [
        lambda guard: guard.resolve("t1", Outcome.SUCCESS),
        lambda guard: guard.revert_failure("t1"),
        lambda guard: guard.restrict_account(60, "x"),
        lambda guard: guard.block_phone(PHONE, 60),
        lambda guard: guard.phone_snapshot(PHONE),
        lambda guard: guard.account_snapshot(),
    ],
)
def test_other_calls_raise_guard_unavailable(
    closed_port_client: redis.Redis, call: Callable[[Guard], object]
) -> None:
    with pytest.raises(GuardUnavailable):
        call(Guard(closed_port_client, "acct", SMALL))


def test_snapshot_masks_the_number(make_guard: GuardFactory) -> None:
    assert make_guard().phone_snapshot(PHONE).phone == "2547****678"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phone_streak_limit", 0),
        ("phone_streak_limit", True),
        ("phone_streak_limit", 70_000),
        ("phone_max_inflight", 1.5),
        ("account_failure_limit", -1),
        ("phone_cooldown_s", 0),
        ("account_window_s", float("nan")),
        ("busy_poll_s", 0.0001),
        ("phone_memory_s", 60),  # below the cooldown
        ("restriction_tiers", ((50, 10), (40, 20))),
        ("restriction_tiers", ((0, 10),)),
        ("restriction_tiers", ((50, 0),)),
        ("restriction_tiers", [(50, 10)]),
        ("interactive_reserve", -1),
        ("interactive_reserve", 50),  # the bulk lane would have nothing
        ("bulk_max_inflight", 0),
    ],
)
def test_limits_reject_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GuardLimits(**{field: value})  # type: ignore[arg-type]


def test_limits_from_settings() -> None:
    settings = load_settings(
        upesipay_base_url="http://upesipay.test",
        upesipay_auth_token="token",
        upesipay_channel_id=1,
        callback_base_url="http://callbacks.test",
        callback_secret="0123456789abcdef",
        phone_streak_limit=4,
        account_window_s=600,
    )
    limits = GuardLimits.from_settings(settings)
    assert (limits.phone_streak_limit, limits.account_window_s, limits.account_failure_limit) == (4, 600, 50)
    assert limits.holds_at_limit  # the default: a number at its limit is held, not rested
    assert (limits.interactive_reserve, limits.bulk_max_inflight, limits.bulk_budget) == (10, 20, 40)


@pytest.mark.parametrize("bad", ["0712 345678", "+254712345678", "2547|1234567", "abc", "1" * 30])
def test_admit_rejects_a_malformed_number_without_repeating_it(make_guard: GuardFactory, bad: str) -> None:
    with pytest.raises(ValueError, match="phone") as raised:
        make_guard().admit(bad, "t1")
    assert bad not in str(raised.value)


@pytest.mark.parametrize("bad_account", ["", "a{b}", "x" * 65])
def test_account_names_cannot_break_the_hash_tag(redis_client: redis.Redis, bad_account: str) -> None:
    with pytest.raises(ValueError, match="account"):
        Guard(redis_client, bad_account, SMALL)
