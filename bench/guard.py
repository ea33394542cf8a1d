"""Benchmark the guard against the `limits` library's moving window on the same private Redis, in one run.

    .venv/bin/python bench/guard.py [--reps 7] [--ops 5000] [--numbers 100000]

Measures, sequentially with one redis-py client each (the same client style as the guard's users):
  * guard.admit decisions/s            vs  MovingWindowRateLimiter(RedisStorage).hit /s   (ratio must be >= 1.0)
  * guard admit + resolve cycles/s     vs  the same hit /s                                (ratio must be >= 0.5)
  * Redis bytes per tracked number over --numbers numbers, each admitted and resolved as a failure (<= 200)
Prints medians over the repetitions and exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.guard import Guard, GuardLimits, Lane, Outcome, recovery
from worker.local.embedded_redis import EmbeddedRedis

# Throughput runs: every admit is admitted (the full path: checks, reservation, phone update, TTLs), so the
# budget and streak limits are set out of the way. Like a bulk invoice batch, every admit is for a number the
# guard has not seen yet, so each one creates state, and goes through the bulk lane (the longer path: the reserve
# and the bulk in-flight cap are checked and counted too).
THROUGHPUT_LIMITS = GuardLimits(
    account_failure_limit=10**9, restriction_tiers=(), interactive_reserve=10, bulk_max_inflight=10**9
)


def fresh_numbers(rep: int, ops: int) -> list[str]:
    return [f"2547{rep % 10}{i:07d}" for i in range(ops)]


class Workload:
    """One of the measured call sequences, run in slices so that the three share the machine's mood."""

    def __init__(self, name: str, step: Callable[[int], None]) -> None:
        self.name, self.step, self.seconds, self.done = name, step, 0.0, 0

    def run(self, count: int) -> None:
        started = time.perf_counter()
        for i in range(self.done, self.done + count):
            self.step(i)
        self.seconds += time.perf_counter() - started
        self.done += count

    @property
    def rate(self) -> float:
        return self.done / self.seconds


def limits_workload(url: str, rep: int, ops: int) -> Workload:
    """The baseline: one moving-window limit per number, each hit for a number not seen before."""
    limiter = MovingWindowRateLimiter(RedisStorage(url))
    item = RateLimitItemPerMinute(10)
    numbers = fresh_numbers(rep, ops)

    def step(i: int) -> None:
        if not limiter.hit(item, "bench", numbers[i]):
            raise RuntimeError("limits refused a hit it should have allowed")

    return Workload("limits hit", step)


def admit_workload(client: redis.Redis, rep: int, ops: int) -> Workload:
    guard = Guard(client, f"admit{rep}", THROUGHPUT_LIMITS)
    recovery.start_empty(guard)
    numbers = fresh_numbers(rep, ops)

    def step(i: int) -> None:
        if not guard.admit(numbers[i], f"a{i}", Lane.BULK).admitted:
            raise RuntimeError("the guard refused an admit it should have allowed")

    return Workload("guard admit", step)


def cycle_workload(client: redis.Redis, rep: int, ops: int) -> Workload:
    """Admit, then resolve as success, failure or release in turn (a third of them leave a streak behind)."""
    guard = Guard(client, f"cycle{rep}", THROUGHPUT_LIMITS)
    recovery.start_empty(guard)
    numbers = fresh_numbers(rep, ops)
    outcomes = (Outcome.SUCCESS, Outcome.FAILURE, Outcome.RELEASED)

    def step(i: int) -> None:
        token = f"c{i}"
        if not guard.admit(numbers[i], token, Lane.BULK).admitted:
            raise RuntimeError("the guard refused an admit it should have allowed")
        guard.resolve(token, outcomes[i % 3])

    return Workload("guard admit+resolve", step)


def one_rep(client: redis.Redis, url: str, rep: int, ops: int, slice_ops: int = 100) -> list[float]:
    """Interleave the three workloads in slices: a load spike on the machine then hits all of them alike."""
    workloads = [
        limits_workload(url, rep, ops),
        admit_workload(client, rep, ops),
        cycle_workload(client, rep, ops),
    ]
    for _ in range(ops // slice_ops):
        for workload in workloads:
            workload.run(slice_ops)
    return [workload.rate for workload in workloads]


def bytes_per_number(client: redis.Redis, numbers: int) -> tuple[float, int, int]:
    """Populate `numbers` numbers with real state (admitted, then resolved as a failure: streak 1).

    Default limits, except that numbers are remembered for ten years: the budget admits 49 failures per window, so
    the injected clock jumps one window ahead after every 49 numbers and 100,000 numbers span 510 days of guard
    time; with the default 30-day memory the early ones would be forgotten and collected, flattering the figure.
    """
    client.flushdb()
    now = [1_700_000_000.0]
    limits = GuardLimits(phone_memory_s=3650 * 86400)
    guard = Guard(client, "mem", limits, clock=lambda: now[0])
    recovery.start_empty(guard)
    batch = limits.account_failure_limit - 1
    before = int(client.info("memory")["used_memory"])
    for start in range(0, numbers, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + batch, numbers)):
            phone, token = f"2547{i:08d}", f"payment-{i}"
            guard._admit_script(keys=guard._keys, args=guard._admit_args(phone, token), client=pipe)
            guard._resolve_script(
                keys=guard._keys, args=guard._resolve_args(token, Outcome.FAILURE), client=pipe
            )
        answers = pipe.execute()
        if any(answers[0::2]) or not all(answers[1::2]):  # admit answers 0 when admitted
            raise RuntimeError("populating: an admit was refused or a resolve changed nothing")
        now[0] += limits.account_window_s
    after = int(client.info("memory")["used_memory"])
    state = "stkpush:{mem}:s"
    tracked = sum(1 for field in client.hscan_iter(state) if field[0].isdigit())
    if tracked != numbers:
        raise RuntimeError(f"expected {numbers} tracked numbers, found {tracked}")
    return (after - before) / numbers, int(client.memory_usage(state, samples=0) or 0), tracked


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--numbers", type=int, default=100_000)
    args = parser.parse_args()

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        print(f"redis-server {client.info('server')['redis_version']} on {server.url} (private)")
        # Warm both sides up: script loading and connection setup are not what is measured.
        one_rep(client, server.url, 9, 200)

        limits_rates, admit_rates, cycle_rates = [], [], []
        for rep in range(args.reps):
            client.flushdb()
            hit_rate, admit_rate, cycle_rate = one_rep(client, server.url, rep, args.ops)
            limits_rates.append(hit_rate)
            admit_rates.append(admit_rate)
            cycle_rates.append(cycle_rate)
            print(
                f"rep {rep + 1}: limits hit {hit_rate:8.0f}/s  guard admit {admit_rate:8.0f}/s  "
                f"guard admit+resolve {cycle_rate:8.0f}/s  "
                f"(ratios {admit_rate / hit_rate:.2f}, {cycle_rate / hit_rate:.2f})"
            )
        hit = statistics.median(limits_rates)
        admit = statistics.median(admit_rates)
        cycle = statistics.median(cycle_rates)
        per_number, hash_bytes, tracked = bytes_per_number(client, args.numbers)
        client.close()

    checks = [
        ("guard admit / limits hit", admit / hit, ">=", 1.0),
        ("guard admit+resolve / limits hit", cycle / hit, ">=", 0.5),
        ("Redis bytes per tracked number", per_number, "<=", 200.0),
    ]
    print(f"\nmedians over {args.reps} reps of {args.ops} sequential calls")
    print(f"  limits MovingWindowRateLimiter(RedisStorage).hit  {hit:9.0f}/s")
    print(f"  guard.admit                                       {admit:9.0f}/s")
    print(f"  guard.admit + guard.resolve (one cycle)           {cycle:9.0f}/s")
    print(
        f"memory: {tracked} numbers, used_memory delta {per_number:.1f} B/number "
        f"(state hash alone: {hash_bytes / tracked:.1f} B/number)"
    )
    failed = False
    for name, value, op, target in checks:
        ok = value >= target if op == ">=" else value <= target
        failed |= not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name} = {value:.2f} (target {op} {target})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
