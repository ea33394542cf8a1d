"""Events and webhook deliveries on a real SQLite ledger, with the HTTP seam (httpx MockTransport) for the
receiver's answers: the outbox, event types, order per payment, retries, disabling, and input checks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col, select

from tests.integration.webhook_receiver import documented_receiver
from worker import events, runtime
from worker.events import Event, EventType, event_type_for
from worker.ledger import Payment, PaymentState, create_schema, session_scope, transition, utcnow
from worker.webhooks import delivery, release
from worker.webhooks.endpoints import (
    WebhookInputError,
    add_endpoint,
    endpoint_view,
    list_endpoints,
    set_enabled,
)
from worker.webhooks.store import DeliveryState, WebhookAttempt, WebhookDelivery, WebhookEndpoint

SETTLEABLE = [PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN]


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
        "UPESIPAY_AUTH_TOKEN": "tok_unit_test_value",
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": "acct-unit",
        "CALLBACK_BASE_URL": "http://127.0.0.1:9",
        "CALLBACK_SECRET": "s" * 32,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "WEBHOOK_RETRY_BASE_S": "10",
        "WEBHOOK_RETRY_CAP_S": "60",
        "STKPUSH_ON_OUTCOME_TASK": "",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr(events, "_listeners", [])  # no broker here: releases are driven by the tests
    runtime.reset()
    create_schema(runtime.engine())
    yield
    runtime.engine().dispose()
    runtime.reset()


def add_payment(reference: str = "INV-1", state: PaymentState = PaymentState.AWAITING_CALLBACK) -> Payment:
    payment = Payment(
        account="acct-unit",
        external_reference=reference,
        phone="254787677677",
        amount=100,
        channel_id=2133,
        customer_name="Achieng Otieno",
        state=state,
    )
    with session_scope(runtime.engine()) as session:
        session.add(payment)
        session.commit()
    return payment


def all_events() -> list[Event]:
    with session_scope(runtime.engine()) as session:
        return list(session.exec(select(Event).order_by(col(Event.seq))).all())


def deliveries() -> list[WebhookDelivery]:
    with session_scope(runtime.engine()) as session:
        return list(session.exec(select(WebhookDelivery).order_by(col(WebhookDelivery.id))).all())


def answering(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[[httpx.Request], httpx.Response]
) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    monkeypatch.setattr(delivery, "_http", lambda: client)
    return seen


@pytest.mark.parametrize(
    ("from_states", "to_state", "code", "reason", "expected"),
    [
        ({"AWAITING_CALLBACK"}, "SUCCEEDED", 0, None, EventType.PAYMENT_SUCCEEDED),
        ({"FAILED"}, "SUCCEEDED", 0, None, EventType.PAYMENT_SUCCEEDED_AFTER_FAILURE),
        ({"AWAITING_CALLBACK"}, "CANCELLED", 1032, "M-Pesa result 1032", EventType.PAYMENT_CANCELLED),
        ({"SENDING"}, "REJECTED", None, "UpesiPay refused", EventType.PAYMENT_REJECTED),
        ({"AWAITING_CALLBACK"}, "FAILED", 1, "M-Pesa result 1", EventType.PAYMENT_FAILED),
        ({"AWAITING_CALLBACK"}, "FAILED", 1037, "M-Pesa result 1037", EventType.PAYMENT_EXPIRED),
        ({"UNKNOWN"}, "FAILED", None, "unsettled: no outcome", EventType.PAYMENT_EXPIRED),
        ({"PENDING"}, "SENDING", None, None, None),
        ({"SENDING"}, "AWAITING_CALLBACK", None, None, None),
    ],
)
def test_each_ending_has_its_event_type(
    from_states: set[str], to_state: str, code: int | None, reason: str | None, expected: EventType | None
) -> None:
    assert event_type_for(frozenset(from_states), to_state, code, reason) == expected


def test_a_transition_writes_its_event_with_public_fields_only_and_a_duplicate_writes_none() -> None:
    payment = add_payment()
    assert transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED, receipt="SAE3YULR0Y")
    assert not transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED, receipt="X")
    (event,) = all_events()
    body = json.loads(event.payload)
    assert (event.type, body["id"], body["type"]) == ("payment.succeeded", event.id, "payment.succeeded")
    assert body["data"]["payment"] == {
        "id": payment.id,
        "external_reference": "INV-1",
        "amount": 100,
        "state": "SUCCEEDED",
        "receipt": "SAE3YULR0Y",
        "result_code": None,
        "phone": "2547****677",
        "batch_id": None,
        "settled_at": body["data"]["payment"]["settled_at"],
    }
    assert "Achieng" not in event.payload and "254787677677" not in event.payload


def test_a_non_terminal_transition_writes_no_event() -> None:
    payment = add_payment(state=PaymentState.PENDING)
    assert transition(runtime.engine(), payment.id, [PaymentState.PENDING], PaymentState.SENDING)
    assert all_events() == []


def test_deliveries_are_written_with_the_event_for_subscribed_enabled_endpoints_only() -> None:
    everything = add_endpoint("https://shop.example/all").endpoint
    only_success = add_endpoint("https://shop.example/paid", "payment.succeeded").endpoint
    switched_off = add_endpoint("https://shop.example/off").endpoint
    set_enabled(switched_off.id, False)
    cancelled = add_payment("INV-C")
    transition(runtime.engine(), cancelled.id, SETTLEABLE, PaymentState.CANCELLED, result_code=1032)
    assert [d.endpoint_id for d in deliveries()] == [everything.id]
    paid = add_payment("INV-P")
    transition(runtime.engine(), paid.id, SETTLEABLE, PaymentState.SUCCEEDED)
    assert sorted(d.endpoint_id for d in deliveries()[1:]) == sorted([everything.id, only_success.id])


def test_the_python_hook_gets_a_delivery_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STKPUSH_ON_OUTCOME_TASK", "myshop.tasks.payment_settled")
    runtime.reset()
    payment = add_payment()
    transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED)
    assert [d.endpoint_id for d in deliveries()] == ["python-hook"]


def test_a_delivery_is_signed_so_the_documented_code_accepts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    created = add_endpoint("https://shop.example/hook")
    seen = answering(monkeypatch, lambda _: httpx.Response(204))
    payment = add_payment()
    transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED)
    token, leased = release.lease()
    assert delivery.deliver([i for i, _ in leased], token) == {"delivered": 1}
    (request,) = seen
    event = documented_receiver()["verify_delivery"](
        created.secret, request.headers["Stkpush-Signature"], request.content
    )
    assert event["id"] == request.headers["Stkpush-Event-Id"] == all_events()[0].id
    (row,) = deliveries()
    assert (row.state, row.attempts, row.last_status_code, row.lease_token) == (
        DeliveryState.DELIVERED,
        1,
        204,
        None,
    )


def test_a_failed_attempt_is_logged_and_retried_later_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = add_endpoint("https://shop.example/hook").endpoint
    answering(monkeypatch, lambda _: httpx.Response(503))
    payment = add_payment()
    transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED)
    token, leased = release.lease()
    before = utcnow()
    assert delivery.deliver([i for i, _ in leased], token) == {"retry": 1}
    (row,) = deliveries()
    assert row.state == DeliveryState.PENDING and row.attempts == 1 and row.last_error == "HTTP 503"
    assert before + timedelta(seconds=5) <= row.next_attempt_at <= utcnow() + timedelta(seconds=10)
    assert release.lease()[1] == []  # not due yet: nothing to lease
    with session_scope(runtime.engine()) as session:
        (attempt,) = session.exec(select(WebhookAttempt)).all()
        stored = session.get(WebhookEndpoint, endpoint.id)
    assert attempt.status_code == 503 and stored is not None and stored.failing_since is not None


def test_a_message_from_an_older_lease_delivers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    add_endpoint("https://shop.example/hook")
    seen = answering(monkeypatch, lambda _: httpx.Response(200))
    payment = add_payment()
    transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED)
    old_token, leased = release.lease()
    ids = [i for i, _ in leased]
    # The lease runs out (its worker died) and a later tick leases the delivery again
    with runtime.engine().begin() as connection:
        connection.execute(update(WebhookDelivery).values(lease_until=utcnow() - timedelta(seconds=1)))
    new_token, again = release.lease()
    assert [i for i, _ in again] == ids
    assert delivery.deliver(ids, old_token) == {} and seen == []
    assert delivery.deliver(ids, new_token) == {"delivered": 1} and len(seen) == 1


def test_a_payments_later_event_waits_until_the_earlier_one_is_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_endpoint("https://shop.example/hook")
    answering(monkeypatch, lambda _: httpx.Response(200))
    payment = add_payment(state=PaymentState.UNKNOWN)
    engine = runtime.engine()
    transition(engine, payment.id, SETTLEABLE, PaymentState.FAILED, reason="unsettled: no outcome")
    transition(engine, payment.id, [PaymentState.FAILED], PaymentState.SUCCEEDED, reason=None)
    expired, overturned = deliveries()
    assert [e.type for e in all_events()] == ["payment.expired", "payment.succeeded_after_failure"]
    # Only the first is releasable while it is pending, even when asked for both by id
    token, leased = release.lease([expired.id or 0, overturned.id or 0])
    assert [i for i, _ in leased] == [expired.id]
    monkeypatch.setattr(
        delivery, "release", lambda ids: release.lease(ids)
    )  # the follow-up release, no broker
    delivery.deliver([expired.id or 0], token)
    states = {row.id: row.state for row in deliveries()}
    assert states[expired.id] == DeliveryState.DELIVERED
    with session_scope(engine) as session:
        follower = session.get(WebhookDelivery, overturned.id)
    assert follower is not None and follower.lease_token is not None  # released right after the first


def test_an_endpoint_failing_for_days_is_disabled_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = add_endpoint("https://shop.example/hook").endpoint
    answering(monkeypatch, lambda _: httpx.Response(500))
    with runtime.engine().begin() as connection:
        connection.execute(
            update(WebhookEndpoint).values(failing_since=utcnow() - timedelta(days=3, seconds=1))
        )
    payment = add_payment()
    transition(runtime.engine(), payment.id, SETTLEABLE, PaymentState.SUCCEEDED)
    token, leased = release.lease()
    with caplog.at_level(logging.ERROR, logger="stkpush.webhooks"):
        delivery.deliver([i for i, _ in leased], token)
    assert any("WEBHOOK ENDPOINT DISABLED" in record.getMessage() for record in caplog.records)
    (stored,) = list_endpoints()
    assert stored.id == endpoint.id and not stored.enabled and stored.disabled_reason
    # Its delivery waits in the ledger and is not released while the endpoint is disabled
    with runtime.engine().begin() as connection:
        connection.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
    assert release.lease()[1] == []
    set_enabled(endpoint.id, True)
    assert len(release.lease()[1]) == 1


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    settings = runtime.settings()
    for attempts, full in ((1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (12, 60.0)):
        for _ in range(50):
            assert full / 2 <= delivery.retry_delay_s(settings, attempts) <= full


@pytest.mark.parametrize(
    ("url", "events_arg", "field"),
    [
        ("ftp://shop.example/hook", None, "url"),
        ("https://", None, "url"),
        ("https://user:pw@shop.example/hook", None, "url"),
        ("", None, "url"),
        ("https://shop.example/hook", "payment.paid", "events"),
    ],
)
def test_bad_endpoint_input_is_refused_naming_the_field_and_stores_nothing(
    url: str, events_arg: str | None, field: str
) -> None:
    with pytest.raises(WebhookInputError) as caught:
        add_endpoint(url, events_arg)
    assert caught.value.field == field and caught.value.rule
    assert list_endpoints() == []


def test_an_endpoints_view_never_shows_its_secret() -> None:
    created = add_endpoint("https://shop.example/hook")
    assert created.secret.startswith("whsec_")
    assert created.secret not in json.dumps(endpoint_view(created.endpoint))


def test_a_batch_whose_payments_all_ended_gets_one_finished_event() -> None:
    from worker.batch_events import emit_finished_batches
    from worker.ledger import Batch, BatchState

    endpoint = add_endpoint("https://shop.example/hook", "batch.finished").endpoint
    batch = Batch(account="acct-unit", source_name="march.csv", state=BatchState.INGESTED, rows_recorded=2)
    with session_scope(runtime.engine()) as session:
        session.add(batch)
        session.commit()
    paid, declined = add_payment("INV-B1"), add_payment("INV-B2")
    with runtime.engine().begin() as connection:
        connection.execute(update(Payment).values(batch_id=batch.id))
    engine = runtime.engine()
    transition(engine, paid.id, SETTLEABLE, PaymentState.SUCCEEDED)
    assert emit_finished_batches() == 0  # one payment still in flight
    transition(engine, declined.id, SETTLEABLE, PaymentState.CANCELLED, result_code=1032)
    assert emit_finished_batches() == 1
    assert emit_finished_batches() == 0  # once only
    (finished,) = [e for e in all_events() if e.type == "batch.finished"]
    body = json.loads(finished.payload)["data"]["batch"]
    assert body["payments_by_state"] == {"CANCELLED": 1, "SUCCEEDED": 1}
    assert body["amount_collected"] == 100 and body["source_name"] == "march.csv"
    assert [d.endpoint_id for d in deliveries()] == [endpoint.id]
