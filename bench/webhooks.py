"""Webhook deliveries per second to a local receiver, against a plain httpx POST loop measured in the same run.

The receiver is a minimal ASGI app under uvicorn (a subprocess on loopback) answering 200. The baseline POSTs the
same event bodies with one keep-alive httpx client, nothing else. The stkpush side runs exactly what a worker runs
per delivery: beat's release (worker.webhooks.release: lease the backlog, group it into messages of BATCH_SIZE),
then each message as the deliver task runs it (worker.webhooks.delivery: read the leased rows, sign with
HMAC-SHA256, POST with the same kind of client, record the outcomes), sequentially in this process, over a SQLite
ledger whose events were written by real transitions (the outbox) before the clock starts. Celery's own hop (one
Redis LPUSH/BRPOP per message) is not in the loop. Runs alternate baseline and stkpush; medians and their ratio printed.

    .venv/bin/python bench/webhooks.py [--deliveries 500] [--runs 5] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/webhooks.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from worker.local.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from worker.local.stack import wait_http  # noqa: E402

RECEIVER = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
"""


def start_receiver(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    (workdir / "bench_receiver.py").write_text(RECEIVER)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench_receiver:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.post(url, content=b"{}", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("receiver did not start")


def make_events(count: int) -> list[int]:
    """`count` payments moved to SUCCEEDED by real transitions: each writes its event and its delivery."""
    from sqlmodel import col, select

    from worker import runtime
    from worker.ledger import Payment, PaymentState, session_scope, transition
    from worker.webhooks.store import DeliveryState, WebhookDelivery

    engine = runtime.engine()
    with session_scope(engine) as session:
        ids = []
        for index in range(count):
            payment = Payment(
                account=runtime.settings().upesipay_account,
                external_reference=f"BENCH-{secrets.token_hex(6)}",
                phone=f"2547{index % 100000000:08d}",
                amount=100,
                channel_id=2133,
                state=PaymentState.AWAITING_CALLBACK,
            )
            session.add(payment)
            ids.append(payment.id)
        session.commit()
    for payment_id in ids:
        transition(
            engine, payment_id, [PaymentState.AWAITING_CALLBACK], PaymentState.SUCCEEDED, receipt="SAE3YULR0Y"
        )
    with session_scope(engine) as session:
        rows = session.exec(
            select(WebhookDelivery.id).where(col(WebhookDelivery.state) == DeliveryState.PENDING)
        ).all()
    return [row for row in rows if row is not None]


def _in_processes(work: Callable[[int], None], concurrency: int) -> float:
    """Seconds for `concurrency` forked processes to each run work(index); 1 runs in this process."""
    if concurrency == 1:
        started = time.perf_counter()
        work(0)
        return time.perf_counter() - started
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=work, args=(index,)) for index in range(concurrency)]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0, "a bench process failed"
    return time.perf_counter() - started


def run_stkpush(delivery_ids: list[int], concurrency: int) -> float:
    """Beat's release (one lease for the backlog), then each delivery as a worker's task runs it, split over
    `concurrency` processes as a worker's prefork pool would."""
    from worker import runtime
    from worker.webhooks import delivery, release

    started = time.perf_counter()
    token, leased = release.lease(limit=len(delivery_ids))
    assert sorted(i for i, _ in leased) == sorted(delivery_ids)
    messages = release.batches(leased)
    leasing_s = time.perf_counter() - started
    if concurrency > 1:
        runtime.engine().dispose()  # children open their own connections

    def work(index: int) -> None:
        for batch in messages[index::concurrency]:
            assert delivery.deliver(batch, token) == {"delivered": len(batch)}

    return len(delivery_ids) / (leasing_s + _in_processes(work, concurrency))


def run_baseline(url: str, bodies: list[bytes], concurrency: int) -> float:
    def work(index: int) -> None:
        with httpx.Client(timeout=10) as client:
            for body in bodies[index::concurrency]:
                answer = client.post(url, content=body, headers={"Content-Type": "application/json"})
                assert answer.status_code == 200

    return len(bodies) / _in_processes(work, concurrency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="processes per side (the stack's workers run -c 2); both sides always get the same number",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stkpush-bench-webhooks-"))
    redis_server = EmbeddedRedis().start()
    receiver, url = start_receiver(workdir)
    try:
        os.environ.update(
            {
                "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
                "UPESIPAY_AUTH_TOKEN": "bench-token-not-used",
                "UPESIPAY_CHANNEL_ID": "2133",
                "CALLBACK_BASE_URL": "http://127.0.0.1:9",
                "CALLBACK_SECRET": secrets.token_urlsafe(24),
                "REDIS_URL": redis_server.url,
                "DATABASE_URL": f"sqlite:///{workdir / 'ledger.db'}",
            }
        )
        from worker import runtime
        from worker.events import Event
        from worker.ledger import session_scope
        from worker.migrations import upgrade
        from worker.webhooks.endpoints import add_endpoint

        runtime.reset()
        upgrade(runtime.engine())
        add_endpoint(url + "/stkpush/webhook")
        wait_http(url, 5)
        baseline, stkpush = [], []
        for run in range(args.runs):
            delivery_ids = make_events(args.deliveries)
            with session_scope(runtime.engine()) as session:
                from sqlmodel import col, select

                bodies = [
                    e.payload.encode() for e in session.exec(select(Event).order_by(col(Event.seq))).all()
                ]
            baseline.append(
                run_baseline(url + "/stkpush/webhook", bodies[-args.deliveries :], args.concurrency)
            )
            stkpush.append(run_stkpush(delivery_ids, args.concurrency))
            print(
                f"run {run + 1}: plain httpx POST {baseline[-1]:.0f}/s, stkpush deliveries {stkpush[-1]:.0f}/s"
            )
        base_median, ours_median = statistics.median(baseline), statistics.median(stkpush)
        # Each run measures both sides back to back, so a run's own ratio sees the same machine load on both.
        paired = statistics.median(ours / base for ours, base in zip(stkpush, baseline, strict=True))
        print(
            f"median over {args.runs} runs of {args.deliveries}, concurrency {args.concurrency}: "
            f"plain httpx POST {base_median:.0f}/s, stkpush deliveries {ours_median:.0f}/s, "
            f"ratio {ours_median / base_median:.2f}x (median of per-run ratios {paired:.2f}x)"
        )
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
        redis_server.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
