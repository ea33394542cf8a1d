"""The demo may run on a Redis it did not create (REDIS_URL answers): it must keep to its own keys and remove
exactly those when it stops."""

from __future__ import annotations

import json
import secrets
import time

import redis

from worker.ledger import PaymentState, get_payment
from worker.local.stack import Stack


def test_a_stack_on_a_shared_redis_removes_exactly_its_own_keys(shared_redis_url: str) -> None:
    client = redis.Redis.from_url(shared_redis_url)
    sentinel = f"someone-elses-key-{secrets.token_hex(4)}"
    client.set(sentinel, "keep me", ex=300)
    stack = Stack(
        redis_url=shared_redis_url, scenario=json.dumps({"default": "success", "callback_delay_s": 0.1})
    )
    try:
        stack.start(workers=1, beat=False)
        assert stack.embedded is None and stack.key_prefix  # it used the shared server, under a prefix
        stack.activate()
        from producers import enqueue_payment
        from worker import runtime

        handle = enqueue_payment(amount=10, phone_number="0700200001", external_reference="SHARED-1")
        deadline = time.monotonic() + 30
        while (
            payment := get_payment(runtime.engine(), handle.id)
        ) and payment.state != PaymentState.SUCCEEDED:
            assert time.monotonic() < deadline, f"payment still {payment.state}"
            time.sleep(0.1)
        ours = [
            *client.scan_iter(match=f"{stack.key_prefix}*"),
            *client.scan_iter(match=f"stkpush:{{{stack.account}}}:*"),
        ]
        assert ours, "the stack wrote nothing under its prefix: this test would prove nothing"
    finally:
        stack.stop()
    try:
        assert list(client.scan_iter(match=f"{stack.key_prefix}*")) == []
        assert list(client.scan_iter(match=f"stkpush:{{{stack.account}}}:*")) == []
        assert client.get(sentinel) == b"keep me"
    finally:
        client.delete(sentinel)
        client.close()
