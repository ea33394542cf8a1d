"""Many merchants in one deployment: `--accounts` stored UpesiPay accounts x `--per` payments each, through two
workers against the sandbox (one token per account), and the guard's admit rate on a Redis Cluster against a
single Redis in the same run.

    .venv/bin/python bench/accounts.py                         # 200 accounts x 20 payments
    .venv/bin/python bench/accounts.py --accounts 20 --per 5   # a quick look

What runs: the local stack (worker/local/stack.py: a private redis-server, the sandbox started with one
`--token` per account, the web app, beat, two `celery worker` processes), a SQLite ledger. Each account is added
with `worker.accounts.add_account` (its token encrypted under a fresh ACCOUNT_TOKEN_KEY); payments are enqueued
with `enqueue_payment(..., account=...)`, accounts interleaved, each to a number of its own. Then:
- every payment must settle SUCCEEDED, the sandbox must count each account's pushes on that account's token,
  the most prompts in flight per number must be 1, and the sandbox's abuse rules must trigger 0 times;
- it prints each account's p50 / p95 time from enqueue (the row's created_at) to push (the attempt's sent_at:
  UpesiPay answered 201), the spread of those over the accounts, and the guard's admit rate on a three-master
  cluster against a single Redis (bench/guard_cluster.py's measurement), with the ratio.
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from guard_cluster import compare  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def run_accounts(
    accounts: int, per: int, timeout_s: float
) -> tuple[dict[str, list[float]], dict[str, object], int]:
    from sqlmodel import col, select

    from producers import enqueue_payment
    from worker import runtime
    from worker.accounts import add_account
    from worker.ledger import TERMINAL_STATES, Payment, PaymentState, SendAttempt, session_scope
    from worker.local.stack import SANDBOX_CHANNEL_ID, Stack
    from worker.secrets_box import generate_key

    names = [f"merchant-{index:04d}" for index in range(accounts)]
    tokens = {name: f"sbx_{index}_" + secrets.token_urlsafe(10) for index, name in enumerate(names)}
    env = {
        "ACCOUNT_TOKEN_KEY": generate_key(),
        "ACCOUNT_CACHE_S": "60",
        "OTHER_CHANNELS_POLL_S": "0",
        "SETTLE_AFTER_S": "60",
    }
    scenario = json.dumps({"seed": 16, "callback_delay_s": 0.5, "default": "success"})
    stack = Stack(
        scenario=scenario,
        extra_env=env,
        workers=2,
        sandbox_args=tuple(part for token in tokens.values() for part in ("--token", token)),
    )
    with stack:
        stack.activate()
        try:
            engine, settings = runtime.engine(), runtime.settings()
            for name in names:
                add_account(engine, settings, name, [SANDBOX_CHANNEL_ID], tokens[name])
            started = time.monotonic()
            ids: dict[str, str] = {}
            for n in range(per):
                for index, name in enumerate(names):
                    phone = f"07{10_000_000 + index * per + n:08d}"
                    ids[enqueue_payment(10, phone, f"B-{index}-{n}", account=name).id] = name
            enqueued_s = time.monotonic() - started
            print(f"enqueued {len(ids):,} payments over {accounts} accounts in {enqueued_s:.1f} s")
            deadline = time.monotonic() + timeout_s
            while True:
                with session_scope(engine) as session:
                    open_rows = session.exec(
                        select(Payment.id).where(col(Payment.state).not_in(list(TERMINAL_STATES))).limit(1)
                    ).first()
                if open_rows is None:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"not every payment settled within {timeout_s:.0f} s")
                time.sleep(0.5)
            settled_s = time.monotonic() - started
            with session_scope(engine) as session:
                rows = session.exec(
                    select(Payment.account, Payment.state, Payment.created_at, SendAttempt.sent_at).join(
                        SendAttempt, col(SendAttempt.id) == col(Payment.guard_token)
                    )
                ).all()
            stats = stack.sandbox_stats()
        finally:
            stack.deactivate()
    waits: dict[str, list[float]] = {name: [] for name in names}
    not_succeeded = 0
    for account, state, created_at, sent_at in rows:
        if state != PaymentState.SUCCEEDED or sent_at is None:
            not_succeeded += 1
            continue
        waits[account].append((sent_at - created_at).total_seconds())
    not_succeeded += len(ids) - len(rows)
    print(f"all settled {settled_s:.1f} s after the first enqueue ({len(ids) / settled_s:.0f} payments/s)")
    return waits, stats, not_succeeded


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--per", type=int, default=20, help="payments per account")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for every payment to settle")
    parser.add_argument("--reps", type=int, default=5, help="guard admit-rate repetitions")
    parser.add_argument("--ops", type=int, default=3000, help="admits per repetition")
    args = parser.parse_args()

    waits, stats, not_succeeded = run_accounts(args.accounts, args.per, args.timeout)
    failures = []
    if not_succeeded:
        failures.append(f"{not_succeeded} payments did not end SUCCEEDED")
    if stats["inflight_max_per_phone"] != 1:
        failures.append(f"max prompts in flight per number {stats['inflight_max_per_phone']} (want 1)")
    if stats["rule_triggers_total"] != 0:
        failures.append(f"sandbox abuse rules triggered {stats['rule_triggers_total']} times (want 0)")
    by_label: dict[str, int] = stats["pushes_by_account"]  # type: ignore[assignment]
    if by_label.get("account-1", 0) or any(
        by_label.get(f"account-{index + 2}", 0) != args.per for index in range(args.accounts)
    ):
        failures.append("the sandbox did not count each account's pushes on its own token")

    print(f"\nper account: p50 / p95 seconds from enqueue to push ({args.per} payments each)")
    lines = []
    for name, values in waits.items():
        if values:
            lines.append(f"{name} {quantile(values, 0.5):5.2f} / {quantile(values, 0.95):5.2f}")
    for start in range(0, len(lines), 4):
        print("  " + "   ".join(lines[start : start + 4]))
    p50s = [quantile(v, 0.5) for v in waits.values() if v]
    p95s = [quantile(v, 0.95) for v in waits.values() if v]
    if p50s:
        print(
            f"over the accounts: p50 median {statistics.median(p50s):.2f} s (max {max(p50s):.2f}), "
            f"p95 median {statistics.median(p95s):.2f} s (max {max(p95s):.2f})"
        )
    print(
        f"sandbox: {stats['pushes_total']} pushes, max in flight per number {stats['inflight_max_per_phone']}, "
        f"rule triggers {stats['rule_triggers_total']}"
    )

    one, many, spread = compare(args.reps, args.ops, args.accounts)
    print(
        f"\nguard admit rate, medians of {args.reps} reps x {args.ops} admits over {args.accounts} accounts"
    )
    print(f"  single Redis          {one:9.0f}/s")
    print(f"  3-master cluster      {many:9.0f}/s   ratio cluster / single {many / one:.2f}")
    print(f"  keys per master: {spread}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
