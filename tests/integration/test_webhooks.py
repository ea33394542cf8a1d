"""Webhooks over real parts: payments through real `celery worker` processes and the sandbox, events from the
ledger's outbox, signed POSTs to a real HTTP receiver started here, verified with docs/webhooks.md's own code."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from sqlmodel import col, select

from producers import enqueue_payment
from tests.integration.webhook_receiver import Delivery, Receiver, documented_receiver, running_receiver
from tests.support import new_reference, running_stack, wait_for_state
from worker import runtime
from worker.events import Event
from worker.ledger import session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack
from worker.webhooks.endpoints import add_endpoint, delivery_log, replay, set_enabled
from worker.webhooks.store import DeliveryState, WebhookDelivery

OUTCOME_PHONES = {
    "0700200001": "success",
    "0700200002": "cancelled",
    "0700200003": "insufficient",
    "0700200004": "reject",
    "0700200005": "timeout",
}
EXPECTED_TYPES = {
    "0700200001": "payment.succeeded",
    "0700200002": "payment.cancelled",
    "0700200003": "payment.failed",
    "0700200004": "payment.rejected",
    "0700200005": "payment.expired",
}
SCENARIO = {"seed": 17, "callback_delay_s": 0.1, "default": "success", "phones": OUTCOME_PHONES}
HOOK_QUEUE = "stkpush-test-outcomes"
FAST = {
    "WEBHOOK_TIMEOUT_S": "2",
    "WEBHOOK_RETRY_BASE_S": "0.3",
    "WEBHOOK_RETRY_CAP_S": "1",
    "WEBHOOK_LEASE_S": "6",
    "STKPUSH_ON_OUTCOME_TASK": "myshop.tasks.payment_settled",
    "STKPUSH_ON_OUTCOME_QUEUE": HOOK_QUEUE,
}
# Success phones for the delivery tests: one per payment, so the guard's per-phone limits never interfere.
_next_phone = iter(range(700300001, 700309999))


def success_phone() -> str:
    return f"0{next(_next_phone)}"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    with running_stack(redis_server, 5, scenario=SCENARIO, extra_env=FAST) as running:
        yield running


@pytest.fixture
def endpoint(
    stack: Stack, receiver: Receiver, request: pytest.FixtureRequest
) -> Iterator[tuple[str, str, str]]:
    """A fresh endpoint on its own receiver path: (endpoint id, path, secret); disabled afterwards."""
    path = f"/hooks/{request.node.name}"
    created = add_endpoint(receiver.url + path)
    yield created.endpoint.id, path, created.secret
    set_enabled(created.endpoint.id, False)


def events_of(payment_id: str) -> list[Event]:
    with session_scope(runtime.engine()) as session:
        return list(
            session.exec(
                select(Event).where(col(Event.payment_id) == payment_id).order_by(col(Event.seq))
            ).all()
        )


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.1)


def delivered_ids(receiver: Receiver, path: str) -> set[str]:
    return {json.loads(d.body)["id"] for d in receiver.answered_ok(path)}


def verify(delivery: Delivery, secret: str, now: float | None = None) -> dict[str, object]:
    code = documented_receiver()
    event: dict[str, object] = code["verify_delivery"](
        secret, delivery.headers["Stkpush-Signature"], delivery.body, now=now
    )
    return event


def test_every_terminal_payment_produces_exactly_its_event_delivered_signed(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    # Given an endpoint for every event type, When one payment per outcome runs through the real workers
    _, path, secret = endpoint
    handles = {
        phone: enqueue_payment(amount=25, phone_number=phone, external_reference=new_reference("WH"))
        for phone in OUTCOME_PHONES
    }
    payments = {phone: wait_for_state(handle.id, timeout_s=40) for phone, handle in handles.items()}
    # Then the ledger holds exactly one event per payment, of the type its ending calls for
    expected: dict[str, str] = {}
    for phone, payment in payments.items():
        events = events_of(payment.id)
        assert [event.type for event in events] == [EXPECTED_TYPES[phone]], (phone, payment.state)
        expected[events[0].id] = EXPECTED_TYPES[phone]
    # And the receiver gets each of them, with a signature the documented code accepts
    wait_until(lambda: set(expected) <= delivered_ids(receiver, path), 30, "every event delivered")
    for delivery in receiver.answered_ok(path):
        event = verify(delivery, secret)
        assert event["id"] in expected and event["type"] == expected[str(event["id"])]
        assert delivery.headers["Stkpush-Event-Id"] == event["id"]
        payment = event["data"]["payment"]  # type: ignore[index]
        assert "****" in payment["phone"] and "customer_name" not in payment
    assert len(receiver.answered_ok(path)) == len(expected)  # a healthy receiver gets no duplicates


def test_a_receiver_answering_500_for_a_while_gets_every_event_after_it_recovers(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    # Given a receiver that fails everything for its first 4 seconds
    endpoint_id, path, secret = endpoint
    recovers_at = time.time() + 4
    receiver.behaviours[path] = lambda _: (500 if time.time() < recovers_at else 200, 0.0)
    # When ten payments succeed meanwhile
    handles = [
        enqueue_payment(amount=10, phone_number=success_phone(), external_reference=new_reference("WH"))
        for _ in range(10)
    ]
    expected = {events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id for handle in handles}
    # Then after recovery every event arrives; duplicates, if any, carry an id already seen
    wait_until(lambda: expected <= delivered_ids(receiver, path), 40, "every event after recovery")
    received = [json.loads(d.body)["id"] for d in receiver.on(path)]
    assert set(received) == expected
    assert any(d.answered == 500 for d in receiver.on(path)), "the receiver never failed: nothing was retried"
    for delivery in receiver.answered_ok(path):
        verify(delivery, secret)
    # And the delivery log shows the failed attempts and the final 200
    log = delivery_log(endpoint_id, limit=100)
    assert {row["state"] for row in log} == {"DELIVERED"}
    statuses = [attempt["status_code"] for row in log for attempt in row["log"]]
    assert 500 in statuses and 200 in statuses


def test_a_receiver_slower_than_the_timeout_is_retried(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    # Given a receiver whose first answer comes after the 2 s timeout
    endpoint_id, path, _ = endpoint
    receiver.behaviours[path] = lambda index: (200, 3.5 if index == 0 else 0.0)
    handle = enqueue_payment(amount=11, phone_number=success_phone(), external_reference=new_reference("WH"))
    event_id = events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id
    # Then a second attempt delivers it, and the log records the timeout
    wait_until(lambda: len(receiver.on(path)) >= 2 and event_id in delivered_ids(receiver, path), 30, "retry")
    (row,) = delivery_log(endpoint_id)
    assert row["state"] == "DELIVERED" and row["attempts"] >= 2
    assert row["log"][0]["error"] == "timeout"


def test_a_worker_killed_mid_delivery_loses_nothing(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    # Given a receiver that holds the first request long enough to kill the worker sending it
    endpoint_id, path, _ = endpoint
    receiver.behaviours[path] = lambda index: (200, 1.5 if index == 0 else 0.0)
    receiver.started.clear()
    handle = enqueue_payment(amount=12, phone_number=success_phone(), external_reference=new_reference("WH"))
    event_id = events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id
    assert receiver.started.wait(20), "the delivery never started"
    # When the worker is SIGKILLed mid-POST, and a fresh one starts
    stack.stop_process("worker1", signal.SIGKILL)
    stack.start_worker("worker1")

    # Then the lease runs out, beat releases the delivery again, and the ledger records it delivered
    def delivery() -> WebhookDelivery:
        with session_scope(runtime.engine()) as session:
            (row,) = session.exec(
                select(WebhookDelivery).where(col(WebhookDelivery.endpoint_id) == endpoint_id)
            ).all()
        return row

    wait_until(lambda: delivery().state == DeliveryState.DELIVERED, 40, "delivery after the kill")
    # And the receiver saw the same event twice (the killed attempt and the redelivery), nothing else
    assert [json.loads(d.body)["id"] for d in receiver.on(path)] == [event_id, event_id]
    assert delivery().attempts == 1  # the killed attempt recorded nothing: the ledger's lease ran out instead


def test_a_forged_or_replayed_delivery_is_refused_by_the_documented_code(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    _, path, secret = endpoint
    handle = enqueue_payment(amount=13, phone_number=success_phone(), external_reference=new_reference("WH"))
    wait_for_state(handle.id, timeout_s=40)
    wait_until(lambda: len(receiver.answered_ok(path)) == 1, 30, "the delivery")
    (genuine,) = receiver.answered_ok(path)
    code = documented_receiver()
    bad = code["BadSignature"]
    header = genuine.headers["Stkpush-Signature"]
    signed_at = int(header.split(",")[0].removeprefix("t="))
    assert verify(genuine, secret)["id"] == json.loads(genuine.body)["id"]
    forged_body = genuine.body.replace(b'"amount":13', b'"amount":13000')
    assert forged_body != genuine.body
    for forged in (
        lambda: code["verify_delivery"](secret, header, forged_body),  # body changed
        lambda: code["verify_delivery"]("whsec_" + "x" * 43, header, genuine.body),  # signed with another key
        lambda: code["verify_delivery"](
            secret, header.replace(f"t={signed_at}", f"t={signed_at + 1}"), genuine.body
        ),
        lambda: code["verify_delivery"](secret, "v1=" + header.split("v1=")[1], genuine.body),  # no timestamp
        lambda: code["verify_delivery"](secret, header, genuine.body, now=signed_at + 301),  # replayed later
    ):
        with pytest.raises(bad):
            forged()


def test_replay_sends_the_same_event_again(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    endpoint_id, path, secret = endpoint
    handle = enqueue_payment(amount=14, phone_number=success_phone(), external_reference=new_reference("WH"))
    event_id = events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id
    wait_until(lambda: len(receiver.answered_ok(path)) == 1, 30, "the first delivery")
    assert replay(event_id, endpoint_id=endpoint_id) == 1
    wait_until(lambda: len(receiver.answered_ok(path)) == 2, 30, "the replay")
    assert [json.loads(d.body)["id"] for d in receiver.answered_ok(path)] == [event_id, event_id]
    verify(receiver.answered_ok(path)[1], secret)


def test_the_python_hook_is_sent_each_event_with_public_fields_only(stack: Stack) -> None:
    handle = enqueue_payment(
        amount=15,
        phone_number=success_phone(),
        external_reference=new_reference("WH"),
        customer_name="Wanjiru",
    )
    event_id = events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    key = stack.env["REDIS_KEY_PREFIX"] + HOOK_QUEUE

    def hook_events() -> list[dict[str, object]]:
        found = []
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "myshop.tasks.payment_settled"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found.append(args[0])
        return found

    try:
        wait_until(lambda: any(e["id"] == event_id for e in hook_events()), 30, "the hook's message")
    finally:
        client.close()
    (event,) = [e for e in hook_events() if e["id"] == event_id]
    assert event["type"] == "payment.succeeded"
    assert "Wanjiru" not in json.dumps(event) and "****" in event["data"]["payment"]["phone"]  # type: ignore[index]


def test_the_webhooks_api_adds_lists_and_refuses_bad_input(stack: Stack, receiver: Receiver) -> None:
    key = {"X-API-Key": stack.env["API_KEYS"]}
    refused = httpx.post(f"{stack.web_url}/webhooks", json={"url": "ftp://nope"}, headers=key)
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "url"
    typo = httpx.post(f"{stack.web_url}/webhooks", json={"url": receiver.url, "evnts": []}, headers=key)
    assert typo.status_code == 422 and typo.json()["errors"][0]["field"] == "evnts"
    assert httpx.post(f"{stack.web_url}/webhooks", json={"url": receiver.url}).status_code == 401
    created = httpx.post(
        f"{stack.web_url}/webhooks",
        json={"url": receiver.url + "/hooks/api", "events": ["payment.succeeded"]},
        headers=key,
    )
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == ["payment.succeeded"]
    listed = httpx.get(f"{stack.web_url}/webhooks", headers=key)
    assert endpoint["id"] in listed.text and endpoint["secret"] not in listed.text
    log = httpx.get(f"{stack.web_url}/webhooks/{endpoint['id']}/deliveries", headers=key)
    assert log.status_code == 200 and isinstance(log.json(), list)
    disabled = httpx.post(f"{stack.web_url}/webhooks/{endpoint['id']}/disable", headers=key)
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert httpx.post(f"{stack.web_url}/webhooks/we_missing/enable", headers=key).status_code == 404


def test_the_cli_adds_lists_shows_the_log_and_replays(
    stack: Stack, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    def stkpush(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", "webhook", *args],
            env=stack.child_env(),
            cwd=stack.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    path = f"/hooks/{request.node.name}"
    refused = stkpush("add", "ftp://nope")
    assert refused.returncode != 0 and "url:" in refused.stderr
    added = stkpush("add", receiver.url + path, "--events", "payment.succeeded")
    assert added.returncode == 0, added.stderr
    endpoint = json.loads(added.stdout)
    try:
        assert endpoint["secret"] not in stkpush("list").stdout
        handle = enqueue_payment(
            amount=16, phone_number=success_phone(), external_reference=new_reference("WH")
        )
        event_id = events_of(wait_for_state(handle.id, timeout_s=40).id)[0].id
        wait_until(lambda: event_id in delivered_ids(receiver, path), 30, "the delivery")
        log = [json.loads(line) for line in stkpush("deliveries", endpoint["id"]).stdout.splitlines()]
        assert [(row["event_id"], row["state"]) for row in log] == [(event_id, "DELIVERED")]
        replayed = stkpush("replay", event_id, "--endpoint", endpoint["id"])
        assert json.loads(replayed.stdout) == {"deliveries": 1}, replayed.stderr
        wait_until(lambda: len(receiver.answered_ok(path)) == 2, 30, "the replay")
        bad_time = stkpush("replay", "--since", "yesterday")
        assert bad_time.returncode != 0 and "--since" in bad_time.stderr
    finally:
        assert stkpush("disable", endpoint["id"]).returncode == 0


def test_a_finished_batch_is_announced_once_with_its_totals(
    stack: Stack, receiver: Receiver, endpoint: tuple[str, str, str]
) -> None:
    _, path, secret = endpoint
    rows = [f"{new_reference('WB')},{success_phone()},{amount}" for amount in (31, 32, 33)]
    csv = "external_reference,phone_number,amount\n" + "\n".join(rows) + "\n"
    accepted = httpx.post(
        f"{stack.web_url}/batches",
        params={"name": "march.csv"},
        content=csv.encode(),
        headers={"X-API-Key": stack.env["API_KEYS"], "Content-Type": "text/csv"},
    )
    assert accepted.status_code == 202, accepted.text
    batch_id = accepted.json()["batch_id"]

    def finished() -> list[dict[str, object]]:
        bodies = [json.loads(d.body) for d in receiver.answered_ok(path)]
        return [b for b in bodies if b["type"] == "batch.finished" and b["data"]["batch"]["id"] == batch_id]  # type: ignore[index]

    wait_until(lambda: len(finished()) == 1, 60, "batch.finished")
    (event,) = finished()
    batch = event["data"]["batch"]  # type: ignore[index]
    assert batch["payments_by_state"] == {"SUCCEEDED": 3} and batch["amount_collected"] == 96
    payment_events = [
        b
        for b in (json.loads(d.body) for d in receiver.answered_ok(path))
        if b["type"] == "payment.succeeded"
    ]
    assert len(payment_events) == 3  # each payment's own event too
    time.sleep(2)  # a few more beat ticks: still one batch.finished
    assert len(finished()) == 1
    for delivery in receiver.answered_ok(path):
        verify(delivery, secret)
