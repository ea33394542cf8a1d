"""Faults on demand: latency, 5xx (recorded or not), hangs, connection resets, 429 with Retry-After."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter

import httpx
import pytest

from tests.sandbox.conftest import TOKEN, RunningSandbox, StartSandbox, push_body

PHONE = "0712345678"


def listed(sandbox: RunningSandbox) -> int:
    total: int = sandbox.client.get("/api/v2/transactions").json()["total"]
    return total


def test_latency_delays_every_answer(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"faults": {"latency_s": 0.25, "endpoints": ["payments", "transactions"]}})
    started = time.monotonic()
    assert sandbox.push(PHONE).status_code == 201
    assert listed(sandbox) == 1
    assert time.monotonic() - started >= 0.5
    assert sandbox.stats()["faults"]["latency"] == 2


def test_5xx_answers_are_500_after_recording_or_502_503_before(start_sandbox: StartSandbox) -> None:
    # Given every push answered with a 5xx
    sandbox = start_sandbox({"faults": {"error_5xx_rate": 1.0}, "seed": 3})
    # When 40 pushes are sent
    codes = Counter(sandbox.push(f"07220000{index:02d}").status_code for index in range(40))
    # Then all three kinds appear; exactly the 500s were recorded (the customer was prompted)
    assert set(codes) == {500, 502, 503}
    stats = sandbox.stats()
    assert stats["pushes_total"] == codes[500] == listed(sandbox)
    assert stats["faults"]["error_500"] == codes[500]
    assert stats["faults"]["error_502"] == codes[502]
    assert stats["faults"]["error_503"] == codes[503]
    assert stats["outcomes"]["success"] == codes[500]


def test_a_hang_records_the_push_and_outlasts_the_clients_timeout(start_sandbox: StartSandbox) -> None:
    # Given a sandbox whose answers hang for 5 s
    sandbox = start_sandbox({"faults": {"hang_rate": 1.0, "hang_s": 5}})
    # When a client with a 0.3 s read timeout pushes
    with sandbox.with_token(TOKEN, timeout_s=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/api/v2/payments", json=push_body(PHONE, external_reference="INV-H"))
    # Then the push was recorded all the same, and its outcome proceeds
    stats = sandbox.stats()
    assert stats["pushes_by_reference"] == {"INV-H": 1}
    assert stats["faults"]["hang"] == 1
    found = sandbox.client.get("/api/v2/transactions", params={"external_reference": "INV-H"}).json()
    assert found["data"][0]["status"] == "SUCCESS"


def test_a_short_hang_answers_201_late(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"faults": {"hang_rate": 1.0, "hang_s": 0.3}})
    started = time.monotonic()
    assert sandbox.push(PHONE).status_code == 201
    assert time.monotonic() - started >= 0.3


def test_a_reset_records_the_push_and_drops_the_connection_without_an_answer(
    start_sandbox: StartSandbox,
) -> None:
    # Given a sandbox that resets every connection once it has read the push
    sandbox = start_sandbox({"faults": {"reset_rate": 1.0}})
    # When httpx pushes, it gets a transport error, not an HTTP status
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        sandbox.push(PHONE, external_reference="INV-X1")
    # Then the push was recorded
    stats = sandbox.stats()
    assert stats["pushes_by_reference"] == {"INV-X1": 1}
    assert stats["faults"]["reset"] == 1
    # And the sandbox keeps serving once the fault is off
    assert sandbox.put_scenario({}).status_code == 200
    assert sandbox.push(PHONE).status_code == 201


def test_a_reset_is_a_tcp_reset_with_no_http_bytes(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"faults": {"reset_rate": 1.0}})
    body = json.dumps(push_body(PHONE)).encode()
    request = (
        f"POST /api/v2/payments HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Basic {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    port = int(sandbox.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)
        with pytest.raises(ConnectionResetError):
            while connection.recv(4096):
                pytest.fail("the sandbox sent bytes before the reset")
    assert sandbox.stats()["pushes_total"] == 1


def test_a_rate_limit_fault_answers_429_with_retry_after_and_records_nothing(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox({"faults": {"rate_limit_rate": 1.0, "retry_after_s": 7}})
    response = sandbox.push(PHONE)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.json() == {"error_message": "Too many requests"}
    stats = sandbox.stats()
    assert stats["pushes_total"] == 0
    assert stats["requests_refused"]["rate_limited"] == 1
    assert stats["faults"]["rate_limited"] == 1


def test_faults_apply_only_to_the_listed_endpoints(start_sandbox: StartSandbox) -> None:
    # Given 5xx on transaction-status only
    sandbox = start_sandbox({"faults": {"error_5xx_rate": 1.0, "endpoints": ["transaction-status"]}})
    reference = sandbox.push(PHONE).json()["reference"]
    assert sandbox.status(reference).status_code in {500, 502, 503}
    assert sandbox.client.get("/api/v2/transactions").status_code == 200


def test_fault_rates_are_shares_of_the_requests(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"faults": {"rate_limit_rate": 0.25, "error_5xx_rate": 0.25}, "seed": 11})
    codes = Counter(sandbox.push(f"07220000{index:02d}").status_code for index in range(80))
    assert 10 <= codes[429] <= 30
    assert 10 <= codes[500] + codes[502] + codes[503] <= 30
    assert codes[201] >= 25
