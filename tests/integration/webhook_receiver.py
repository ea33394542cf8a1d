"""A real HTTP receiver for webhook tests: a threaded server on a free port that records every delivery and answers
as each path is told (200, 500 for a while, sleep past the timeout). Verification uses docs/webhooks.md's code."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from worker.local.embedded_redis import free_port

DOCS = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def documented_receiver() -> dict[str, Any]:
    """The exact `python receiver` block of docs/webhooks.md, run: what a merchant copies."""
    match = re.search(r"```python receiver\n(.*?)```", DOCS.read_text(), re.S)
    assert match is not None, "docs/webhooks.md has no ```python receiver block"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOCS), "exec"), namespace)  # noqa: S102  (our own docs, run on purpose)
    return namespace


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    received_at: float


# A behaviour gets the request's index on its path (0 for the first) and returns (status, seconds to sleep first).
Behaviour = Callable[[int], tuple[int, float]]


@dataclass
class Receiver:
    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    started: threading.Event = field(default_factory=threading.Event)  # set when any request arrives
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=dict)

    def on(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path]

    def answered_ok(self, path: str) -> list[Delivery]:
        return [d for d in self.on(path) if 200 <= d.answered < 300]


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    port = free_port()
    receiver = Receiver(url=f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                index = receiver.counts.get(self.path, 0)
                receiver.counts[self.path] = index + 1
            receiver.started.set()
            status, sleep_s = receiver.behaviours.get(self.path, lambda _: (200, 0.0))(index)
            if sleep_s:
                time.sleep(sleep_s)
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                status = 0  # the sender hung up (timed out, or was killed): nothing was answered
            with receiver.lock:
                receiver.deliveries.append(
                    Delivery(self.path, dict(self.headers.items()), body, status, time.time())
                )

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
