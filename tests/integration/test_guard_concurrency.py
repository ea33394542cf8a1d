"""Several OS processes hammer one account's guard for the same few numbers on the real (private) Redis.

Each worker process admits, holds for a moment, and resolves (failure, success or release), recording wall-clock
bounds around every call; a monitor process samples the guard's snapshots meanwhile. Redis TIME (the guard's
clock) and time.time() read the same system clock here, so the bounds are comparable. Afterwards the records must
prove: never two prompts in flight on one number, never a streak above the limit, never window + in flight above
the budget. Every check is sound (a correct guard cannot fail it) and a guard that lost atomicity fails it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import cast

import redis

from worker.guard import Guard, GuardLimits, Outcome, recovery

PHONES = ("254700000001", "254700000002", "254700000003", "254700000004")
WORKERS = 6
RUN_S = 5.0
# Short window and cooldown so that numbers rest, start afresh and failures slide out many times in one run.
LIMITS = GuardLimits(
    phone_streak_limit=3,
    phone_cooldown_s=0.3,
    phone_max_inflight=1,
    account_failure_limit=12,
    account_window_s=0.2,
    restriction_tiers=((50, 3600),),
    busy_poll_s=0.01,
    phone_memory_s=0.3,
)
# The guard reads Redis TIME truncated to the millisecond; allow for that and for float rounding.
SLACK_S = 0.003


@dataclass(frozen=True)
class Hold:
    phone: str
    admit_before: float
    admit_after: float
    resolve_before: float
    resolve_after: float
    outcome: Outcome
    holders_seen: int  # the witness counter for this number, right after admission


def work(url: str, seed: int, start: Event, results: multiprocessing.Queue[object]) -> None:
    rng = random.Random(seed)
    client = redis.Redis.from_url(url)
    guard = Guard(client, "acct", LIMITS)
    recovery.start_empty(
        guard
    )  # whichever process comes first; the others find the marker and change nothing
    holds: list[Hold] = []
    refusals: Counter[str] = Counter()
    start.wait()
    deadline = time.time() + RUN_S
    n = 0
    while time.time() < deadline:
        n += 1
        phone = rng.choice(PHONES)
        token = f"w{seed}-{n}"
        admit_before = time.time()
        decision = guard.admit(phone, token)
        admit_after = time.time()
        if not decision.admitted:
            refusals[str(decision.reason)] += 1
            time.sleep(rng.uniform(0, 0.001))
            continue
        # An independent witness of "one prompt at a time": held between admit and resolve.
        holders = int(client.incr(f"witness:{phone}"))
        time.sleep(rng.uniform(0, 0.004))
        client.decr(f"witness:{phone}")
        outcome = rng.choices(list(Outcome), weights=[4, 5, 1])[0]
        resolve_before = time.time()
        assert guard.resolve(token, outcome)
        holds.append(Hold(phone, admit_before, admit_after, resolve_before, time.time(), outcome, holders))
    results.put((holds, refusals))
    client.close()


def monitor(url: str, start: Event, results: multiprocessing.Queue[object]) -> None:
    client = redis.Redis.from_url(url)
    guard = Guard(client, "acct", LIMITS)
    recovery.start_empty(guard)
    violations: list[str] = []
    samples = 0
    start.wait()
    deadline = time.time() + RUN_S
    while time.time() < deadline:
        samples += 1
        account = guard.account_snapshot()
        if account.failures_in_window + account.in_flight > LIMITS.account_failure_limit:
            violations.append(f"account {account}")
        for phone in PHONES:
            snapshot = guard.phone_snapshot(phone)
            if snapshot.in_flight > LIMITS.phone_max_inflight:
                violations.append(f"in flight {snapshot}")
            if snapshot.streak + snapshot.in_flight > LIMITS.phone_streak_limit:
                violations.append(f"streak {snapshot}")
    results.put((violations, samples))
    client.close()


def test_processes_sharing_one_guard_never_break_a_rule(redis_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results: multiprocessing.Queue[object] = ctx.Queue()
    monitor_results: multiprocessing.Queue[object] = ctx.Queue()
    processes = [ctx.Process(target=work, args=(redis_url, seed, start, results)) for seed in range(WORKERS)]
    processes.append(ctx.Process(target=monitor, args=(redis_url, start, monitor_results)))
    for process in processes:
        process.start()
    start.set()
    outputs = [cast(tuple[list[Hold], Counter[str]], results.get(timeout=60)) for _ in range(WORKERS)]
    violations, samples = cast(tuple[list[str], int], monitor_results.get(timeout=60))
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    holds = [hold for part, _ in outputs for hold in part]
    refusals: Counter[str] = sum((counts for _, counts in outputs), Counter())

    by_phone: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_phone[hold.phone].append(hold)

    # Rule 2: one prompt at a time per number.
    assert all(hold.holders_seen == 1 for hold in holds)
    for phone_holds in by_phone.values():
        phone_holds.sort(key=lambda h: h.admit_after)
        for earlier, later in itertools.pairwise(phone_holds):
            # The guard held `earlier` at least from admit_after to resolve_before; `later` was admitted at the
            # latest at its admit_after. Overlap would mean two prompts at once.
            assert later.admit_after >= earlier.resolve_before, (earlier, later)

    # Rule 1: the streak never passes the limit; a number at the limit rests a full cooldown after its last
    # failure. A gap long enough for the guard to have started afresh (or forgotten) resets the count here too.
    rests = 0
    for phone_holds in by_phone.values():
        run, last_failure = 0, 0.0
        for hold, following in zip(phone_holds, [*phone_holds[1:], None], strict=True):
            if hold.outcome is Outcome.SUCCESS:
                run = 0
            elif hold.outcome is Outcome.FAILURE:
                run, last_failure = run + 1, hold.resolve_before  # took effect no earlier than this
            assert run <= LIMITS.phone_streak_limit, hold
            if following is None or run == 0:
                continue
            gap = following.admit_after - last_failure  # the next admission took effect no later than this
            if run == LIMITS.phone_streak_limit:
                assert gap >= LIMITS.phone_cooldown_s - SLACK_S, (hold, following)
                rests += 1
            rest = LIMITS.phone_cooldown_s if run == LIMITS.phone_streak_limit else LIMITS.phone_memory_s
            if gap >= rest - SLACK_S:
                run = 0
    # Rule 3: at each admission, the failures certainly in the window plus the reservations certainly in flight,
    # plus this one, stay within the budget.
    window = LIMITS.account_window_s
    failures = [h for h in holds if h.outcome is Outcome.FAILURE]
    for admitted in holds:
        a_first, a_last = admitted.admit_before, admitted.admit_after
        certain_failures = sum(
            1 for f in failures if f.resolve_after < a_first and f.resolve_before > a_last - window + SLACK_S
        )
        certain_in_flight = sum(
            1 for h in holds if h is not admitted and h.admit_after < a_first and h.resolve_before > a_last
        )
        assert certain_failures + certain_in_flight + 1 <= LIMITS.account_failure_limit, admitted

    # The guard's own view, sampled by the monitor while the workers ran.
    assert violations == []

    # The run was a real contest: every limit turned someone away, many times, and numbers rested.
    print(f"{len(holds)} holds, {rests} rests, refusals {dict(refusals)}, {samples} monitor samples")
    assert len(holds) > 300, len(holds)
    for reason in ("phone_busy", "phone_blocked", "account_budget"):
        assert refusals[reason] > 20, refusals
    assert rests > 5
    assert samples > 100
