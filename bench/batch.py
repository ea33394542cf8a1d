"""Bulk ingestion against its baseline, in one run: `stkpush batch FILE` versus a loop calling enqueue_payment once
per row, and the batch command's peak memory for a 10x longer file.

    .venv/bin/python bench/batch.py                      # 100,000 rows; memory check with 1,000,000
    .venv/bin/python bench/batch.py --rows 20000 --memory-rows 200000 --sample 500   # a quick look

What runs: a private redis-server (no worker: messages stay on the broker, which a drain thread empties so Redis
does not grow), a fresh SQLite ledger per measurement, and
- batch: `stkpush batch FILE` as a child process, timed from spawn to exit (interpreter start-up included), its
  peak RSS read from the kernel (wait4's ru_maxrss) for exactly that process;
- baseline: enqueue_payment(...) in a loop over the first `--sample` rows of the same file, in this process
  (no start-up cost), timed and scaled to the file's length.
Pass criteria (the issue's): batch at least 5x faster; peak RSS for `--memory-rows` at most 1.5x that for `--rows`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.local.embedded_redis import EmbeddedRedis  # noqa: E402


def write_file(path: Path, rows: int) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["external_reference", "phone_number", "amount", "customer_name"])
        for n in range(rows):
            # Distinct references and numbers, real Kenyan mobile prefixes, amounts 1..5000, names present.
            writer.writerow(
                [f"INV-{n:08d}", f"07{10_000_000 + n % 90_000_000:08d}", n % 5000 + 1, f"Customer {n}"]
            )


def base_env(redis_url: str, database_url: str) -> dict[str, str]:
    return {
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",  # never called: no worker runs
        "UPESIPAY_AUTH_TOKEN": "sbx_" + secrets.token_urlsafe(12),
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": "bench",
        "CALLBACK_BASE_URL": "http://127.0.0.1:8",
        "CALLBACK_SECRET": secrets.token_urlsafe(24),
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
    }


def fresh_database(workdir: Path, name: str) -> str:
    from worker.ledger import create_schema, make_engine

    url = f"sqlite:///{workdir / name}.db"
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    return url


class Drain:
    """Empties the broker's queues now and then: 1,000,000 waiting messages would need ~1.5 GB of Redis."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.client.delete("bulk", "single")

    def __enter__(self) -> Drain:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.client.delete("bulk", "single")


def run_batch_command(file: Path, env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """`stkpush batch FILE --json` as a child; its wall time and its own peak RSS."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("UPESIPAY_", "CALLBACK_"))}
    child_env.update(env)
    stdout_path = workdir / f"{file.stem}.out"
    with stdout_path.open("wb") as stdout:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "batch", str(file), "--json"],
            env=child_env,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
        )
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"stkpush batch exited {process.returncode}: {stdout_path.read_text()[:500]}")
    report: dict[str, Any] = json.loads(stdout_path.read_text())
    return {"seconds": elapsed, "peak_rss_mb": usage.ru_maxrss / 1024, "report": report}


def run_enqueue_loop(file: Path, sample: int) -> float:
    """Seconds per row for enqueue_payment called once per row (this process, settings already pointed)."""
    from producers import enqueue_payment

    with file.open(newline="") as stream:
        rows = [row for _, row in zip(range(sample), csv.DictReader(stream), strict=False)]
    started = time.perf_counter()
    for row in rows:
        handle = enqueue_payment(
            amount=int(row["amount"]),
            phone_number=row["phone_number"],
            external_reference="LOOP-" + row["external_reference"],
            customer_name=row["customer_name"],
        )
        assert handle.created and handle.queued
    return (time.perf_counter() - started) / len(rows)


def point_this_process_at(env: dict[str, str]) -> None:
    os.environ.update(env)
    from worker import runtime
    from worker.celery_app import app, celery_config

    runtime.reset()
    app.conf.update(celery_config(runtime.settings()))
    app.close()
    app.amqp._producer_pool = None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--memory-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--sample", type=int, default=2_000, help="rows the enqueue_payment loop runs (scaled)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the files and ledgers (folder printed)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stkpush-bench-"))
    try:
        return measure(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path) -> int:
    small, large = workdir / "invoices-small.csv", workdir / "invoices-large.csv"
    write_file(small, args.rows)
    write_file(large, args.memory_rows)
    print(
        f"files: {args.rows:,} rows ({small.stat().st_size / 1e6:.1f} MB), "
        f"{args.memory_rows:,} rows ({large.stat().st_size / 1e6:.1f} MB) in {workdir}"
    )

    with EmbeddedRedis() as redis_server, Drain(redis_server.url):
        # Baseline: the per-row loop, on its own fresh ledger.
        loop_env = base_env(redis_server.url, fresh_database(workdir, "loop"))
        point_this_process_at(loop_env)
        per_row = run_enqueue_loop(small, args.sample)
        loop_seconds = per_row * args.rows
        print(
            f"enqueue_payment loop: {per_row * 1e3:.2f} ms/row on {args.sample:,} rows "
            f"-> {loop_seconds:,.1f} s scaled to {args.rows:,}"
        )

        # The batch command, fresh ledgers.
        batch = run_batch_command(
            small, base_env(redis_server.url, fresh_database(workdir, "small")), workdir
        )
        assert batch["report"]["rows_recorded"] == args.rows and batch["report"]["rows_queued"] == args.rows
        print(
            f"stkpush batch {args.rows:,} rows: {batch['seconds']:,.1f} s "
            f"({batch['seconds'] / args.rows * 1e3:.3f} ms/row), peak RSS {batch['peak_rss_mb']:.0f} MB"
        )
        big = run_batch_command(large, base_env(redis_server.url, fresh_database(workdir, "large")), workdir)
        assert big["report"]["rows_recorded"] == args.memory_rows
        print(
            f"stkpush batch {args.memory_rows:,} rows: {big['seconds']:,.1f} s "
            f"({big['seconds'] / args.memory_rows * 1e3:.3f} ms/row), peak RSS {big['peak_rss_mb']:.0f} MB"
        )

    speedup = loop_seconds / batch["seconds"]
    memory_ratio = big["peak_rss_mb"] / batch["peak_rss_mb"]
    faster_ok, memory_ok = speedup >= 5, memory_ratio <= 1.5
    print(f"speed-up batch vs loop: {speedup:.1f}x (need >= 5x): {'PASS' if faster_ok else 'FAIL'}")
    print(
        f"peak RSS {args.memory_rows:,} / {args.rows:,} rows: {memory_ratio:.2f}x (need <= 1.5x): "
        f"{'PASS' if memory_ok else 'FAIL'}"
    )
    return 0 if faster_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
