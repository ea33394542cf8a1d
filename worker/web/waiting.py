"""`GET /payments/{ref}?wait=N`: hold a request until its payment settles, without polling the database.

One subscriber thread per web process listens on the account's outcome channel (worker.webhooks.outbox publishes
a note after each event commits) and wakes the requests waiting for that reference; each then reads the ledger
once. A note can be lost (Redis restarting, the subscriber reconnecting), so every waiter also reads the ledger
when its wait ends: a lost note costs latency, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis
from fastapi.concurrency import run_in_threadpool

from worker import runtime
from worker.ledger import TERMINAL_STATES, Payment
from worker.webhooks.outbox import outcome_channel

log = logging.getLogger("stkpush.web")

# How long the subscriber blocks for a message before checking it should still run; and waits before
# reconnecting to a Redis that went away.
LISTEN_TIMEOUT_S = 1.0
RECONNECT_AFTER_S = 1.0


class OutcomeWaiters:
    """Waiters by external reference, woken from the subscriber thread onto their own event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()

    def register(self, reference: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        """On the event loop of the waiting request; call ensure_listening first (it may block briefly)."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters[reference].add(entry)
        return entry

    def unregister(self, reference: str, entry: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            waiting = self._waiters.get(reference)
            if waiting is not None:
                waiting.discard(entry)
                if not waiting:
                    del self._waiters[reference]

    def count(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._waiters.values())

    def wake(self, reference: str) -> None:
        with self._lock:
            entries = list(self._waiters.get(reference, ()))
        for loop, event in entries:
            loop.call_soon_threadsafe(event.set)

    def ensure_listening(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="stkpush-outcomes", daemon=True)
                self._thread.start()
        # A waiter registered before the subscription exists could miss its note; waiting briefly here costs
        # the first request of a process a few milliseconds, and the end-of-wait read covers a timeout.
        self._subscribed.wait(timeout=2)

    def _listen(self) -> None:
        settings = runtime.settings()
        # Every account's outcomes (account names never hold glob characters): a note for another account's
        # payment with the same reference only makes its waiter read the ledger once more.
        channel = outcome_channel("*", settings.redis_key_prefix)
        while True:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=None)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.psubscribe(channel)
                self._subscribed.set()
                while True:
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                    if message is None or message.get("type") not in ("message", "pmessage"):
                        continue
                    try:
                        reference = json.loads(message["data"])["external_reference"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    self.wake(str(reference))
            except Exception as error:
                log.warning("outcome subscriber lost Redis (%s); reconnecting", type(error).__name__)
                self._wake_everyone()  # they re-read the ledger rather than sleep through a missed note
                time.sleep(RECONNECT_AFTER_S)
            finally:
                client.close()

    def _wake_everyone(self) -> None:
        with self._lock:
            references = list(self._waiters)
        for reference in references:
            self.wake(reference)


waiters = OutcomeWaiters()


async def wait_for_outcome(reference: str, wait_s: int, read: Callable[[], Payment | None]) -> Payment | None:
    """Sleep until a note for `reference` arrives or the wait ends; read the ledger on each wake and at the end."""
    deadline = asyncio.get_running_loop().time() + wait_s
    await run_in_threadpool(waiters.ensure_listening)  # the first wait of a process starts the subscriber
    entry = waiters.register(reference)
    _, woken = entry
    try:
        # Registered first, then read: a settlement between the first read and the registration is not missed.
        payment = await run_in_threadpool(read)
        while payment is not None and payment.state not in TERMINAL_STATES:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(woken.wait(), timeout=remaining)
            except TimeoutError:
                pass
            woken.clear()
            payment = await run_in_threadpool(read)
        return payment
    finally:
        waiters.unregister(reference, entry)
