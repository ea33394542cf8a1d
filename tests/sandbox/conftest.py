"""Sandbox fixtures: the sandbox served by uvicorn on a free loopback port, and a callback receiver.

Every test talks to the sandbox over a real socket with httpx; both servers are stopped when the test ends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import uvicorn

from worker.local.embedded_redis import free_port
from worker.sandbox.app import SandboxConfig, Scenario, create_app

TOKEN = "sbx_test_token_1"
OTHER_TOKEN = "sbx_test_token_2"


def push_body(phone: str = "0712345678", **fields: Any) -> dict[str, Any]:
    """A valid POST /api/v2/payments body, as the documentation's example; `fields` override or add."""
    body: dict[str, Any] = {"amount": 100, "phone_number": phone, "channel_id": 2133, "provider": "m-pesa"}
    body.update(fields)
    return body


@dataclass
class RunningSandbox:
    config: SandboxConfig
    server: uvicorn.Server
    thread: threading.Thread
    url: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = self.with_token(TOKEN)

    def with_token(self, token: str, timeout_s: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Basic {token}"}, timeout=timeout_s)

    def push(
        self, phone: str = "0712345678", *, client: httpx.Client | None = None, **fields: Any
    ) -> httpx.Response:
        return (client or self.client).post("/api/v2/payments", json=push_body(phone, **fields))

    def status(self, reference: str) -> httpx.Response:
        return self.client.get("/api/v2/transaction-status", params={"reference": reference})

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/sandbox/stats")
        assert response.status_code == 200
        data: dict[str, Any] = response.json()
        return data

    def wait_for_stat(self, name: str, value: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        """Stats once stats[name] == value (callback counters move after the receiver has answered)."""
        deadline = time.monotonic() + timeout_s
        while (stats := self.stats())[name] != value and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats[name] == value, (name, stats[name], value)
        return stats

    def advance(self, seconds: float) -> None:
        response = self.client.post("/sandbox/clock/advance", json={"seconds": seconds})
        assert response.status_code == 200, response.text

    def put_scenario(self, scenario: dict[str, Any]) -> httpx.Response:
        return self.client.put("/sandbox/scenario", json=scenario)

    def reset(self) -> None:
        assert self.client.post("/sandbox/reset").status_code == 200

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the sandbox server did not stop"


def serve_in_thread(config: SandboxConfig) -> RunningSandbox:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, name=f"sandbox-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the sandbox did not start")
        time.sleep(0.01)
    return RunningSandbox(config=config, server=server, thread=thread, url=f"http://127.0.0.1:{port}")


StartSandbox = Callable[..., RunningSandbox]
# Options a scenario can carry: with only these, a test reuses the session's server (reset, new scenario).
SCENARIO_OPTIONS = {"callback_delay_s", "late_delay_s", "seed"}


@pytest.fixture(scope="session")
def shared_sandbox() -> Iterator[RunningSandbox]:
    sandbox = serve_in_thread(SandboxConfig(tokens=(TOKEN, OTHER_TOKEN), callback_delay_s=0.0))
    yield sandbox
    sandbox.stop()


@pytest.fixture
def start_sandbox(shared_sandbox: RunningSandbox) -> Iterator[StartSandbox]:
    """start_sandbox(scenario_json=None, **SandboxConfig fields); callback_delay_s defaults to 0 here.

    Scenario-only options reuse the session's server, reset and given the scenario (starting a server costs
    a quarter of a second); any other SandboxConfig field gets a server of its own, stopped afterwards.
    """
    running: list[RunningSandbox] = []

    def start(scenario: dict[str, Any] | None = None, **options: Any) -> RunningSandbox:
        options.setdefault("callback_delay_s", 0.0)
        if set(options) <= SCENARIO_OPTIONS:
            data = options | (scenario or {})
            response = shared_sandbox.put_scenario(data)
            assert response.status_code == 200, response.text
            shared_sandbox.reset()
            return shared_sandbox
        options.setdefault("tokens", (TOKEN, OTHER_TOKEN))
        config = SandboxConfig(scenario=Scenario.from_json(scenario or {}), **options)
        sandbox = serve_in_thread(config)
        running.append(sandbox)
        return sandbox

    yield start
    for sandbox in running:
        sandbox.stop()


@pytest.fixture
def sandbox(start_sandbox: StartSandbox) -> RunningSandbox:
    return start_sandbox()


@dataclass
class ReceivedCallback:
    path: str
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival


class CallbackReceiver:
    """A tiny HTTP server that records every POSTed JSON body and answers `status_code`."""

    def __init__(self, status_code: int = 200) -> None:
        self.received: list[ReceivedCallback] = []
        self.status_code = status_code
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                self.send_response(receiver.status_code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver._arrived:
                    receiver.received.append(ReceivedCallback(self.path, body, time.monotonic()))
                    receiver._arrived.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/callbacks/upesipay/pay-1/signature"

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[ReceivedCallback]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout_s)
            assert len(self.received) >= count, f"{len(self.received)} callbacks arrived, {count} expected"
            return list(self.received)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    server = CallbackReceiver()
    yield server
    server.stop()
