"""How fast the sandbox takes STK pushes, against a trivial FastAPI endpoint measured in the same run.

Both servers run as uvicorn subprocesses with the same settings (worker.sandbox.cli.serve) on loopback. The load
is POST /api/v2/payments with valid bodies and no callback_url (callbacks off; outcomes still happen), sent by a
small asyncio HTTP/1.1 client over keep-alive connections, so that the client costs far less than either server.
Runs alternate baseline and sandbox; the medians and their ratio are printed.

    .venv/bin/python bench/sandbox.py [--requests 5000] [--runs 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/sandbox.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from worker.local.embedded_redis import free_port  # noqa: E402

HOST = "127.0.0.1"
CREATED = {"success": True, "status": "QUEUED", "reference": "E8UWT7CLUW", "CheckoutRequestID": "ws_CO_1"}
_LENGTH_RE = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


def baseline_app() -> object:
    """A trivial FastAPI endpoint with the sandbox's path, answering a fixed 201 JSON."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    body = json.dumps(CREATED).encode()

    @app.post("/api/v2/payments")
    async def payments() -> Response:
        return Response(body, status_code=201, media_type="application/json")

    return app


def requests_for(run: int, count: int, token: str) -> list[bytes]:
    """Distinct valid pushes: 1000 numbers (none near an abuse limit: every outcome is a success)."""
    built = []
    for index in range(count):
        body = json.dumps(
            {
                "amount": 100,
                "phone_number": f"0722{index % 1000:06d}",
                "channel_id": 2133,
                "provider": "m-pesa",
                "external_reference": f"BENCH-{run}-{index}",
            }
        ).encode()
        head = (
            f"POST /api/v2/payments HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Basic {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        built.append(head.encode() + body)
    return built


async def _connection(port: int, requests: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection(HOST, port)
    unexpected = 0
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH_RE.search(head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            latencies.append(time.perf_counter() - started)
            unexpected += head[9:12] != b"201"
    finally:
        writer.close()
        await writer.wait_closed()
    return unexpected


async def _load(port: int, requests: list[bytes], connections: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    shares = [requests[index::connections] for index in range(connections)]
    started = time.perf_counter()
    unexpected = await asyncio.gather(*(_connection(port, share, latencies) for share in shares))
    return time.perf_counter() - started, latencies, sum(unexpected)


def measure(port: int, requests: list[bytes], connections: int) -> tuple[float, float, float]:
    """(requests per second, median latency ms, p99 latency ms); every answer must be a 201."""
    elapsed, latencies, unexpected = asyncio.run(_load(port, requests, connections))
    if unexpected:
        raise SystemExit(f"{unexpected} answers were not 201 on port {port}")
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(requests) / elapsed, statistics.median(latencies) * 1000, p99 * 1000


def start(argv: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{argv[2]} exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            httpx.get(f"http://{HOST}:{port}/", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    stop(process)
    raise SystemExit(f"{argv[2]} did not answer on port {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000, help="pushes per run and server")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        from worker.sandbox.cli import serve

        serve(baseline_app(), HOST, args.serve_baseline)
        return

    token = "bench_" + secrets.token_urlsafe(12)
    sandbox_port, baseline_port = free_port(), free_port()
    python = sys.executable
    sandbox = start(
        [python, "-m", "worker.sandbox.cli", "--port", str(sandbox_port), "--token", token,
         "--scenario", '{"default": "success"}', "--callback-delay", "1"],
        sandbox_port,
    )  # fmt: skip
    try:
        baseline = start([python, __file__, "--serve-baseline", str(baseline_port)], baseline_port)
    except BaseException:
        stop(sandbox)
        raise
    print(
        f"POST /api/v2/payments, {args.runs} runs x {args.requests} requests per server, "
        f"{args.connections} keep-alive connections, loopback, callbacks off; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    rates: dict[str, list[float]] = {"baseline": [], "sandbox": []}
    latency: dict[str, list[tuple[float, float]]] = {"baseline": [], "sandbox": []}
    try:
        warm = requests_for(-1, 500, token)
        measure(baseline_port, warm, args.connections)
        measure(sandbox_port, warm, args.connections)
        for run in range(args.runs):
            load = requests_for(run, args.requests, token)
            for name, port in (("baseline", baseline_port), ("sandbox", sandbox_port)):
                rate, p50, p99 = measure(port, load, args.connections)
                rates[name].append(rate)
                latency[name].append((p50, p99))
            print(
                f"run {run + 1}: baseline {rates['baseline'][-1]:7.0f} req/s   "
                f"sandbox {rates['sandbox'][-1]:7.0f} req/s"
            )
        pushes = httpx.get(f"http://{HOST}:{sandbox_port}/sandbox/stats", timeout=10).json()["pushes_total"]
    finally:
        stop(baseline)
        stop(sandbox)
    expected = 500 + args.runs * args.requests
    if pushes != expected:
        raise SystemExit(f"the sandbox recorded {pushes} pushes, {expected} were sent")
    for name in ("baseline", "sandbox"):
        p50 = statistics.median(value[0] for value in latency[name])
        p99 = statistics.median(value[1] for value in latency[name])
        print(
            f"median {name:8}: {statistics.median(rates[name]):7.0f} req/s   "
            f"latency p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )
    ratio = statistics.median(rates["sandbox"]) / statistics.median(rates["baseline"])
    print(f"ratio sandbox / baseline (median req/s): {ratio:.2f}")


if __name__ == "__main__":
    main()
