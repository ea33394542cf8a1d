"""What many tests over the real stack need: a private stack on the suite's Redis, waiting for a payment's state,
and the sandbox's own counts (pushes per reference, callbacks sent). Import from here instead of writing another.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker import runtime
from worker.ledger import (
    TERMINAL_STATES,
    Payment,
    PaymentState,
    SendAttempt,
    create_schema,
    get_payment,
    session_scope,
)
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack
from worker.secrets_box import generate_key


def account_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[None]:
    """A SQLite ledger in `tmp_path` with the schema, the environment's account `acct-env` (no UpesiPay, no Redis
    answering unless `env` says otherwise), an account token key and `env` on top; runtime reset before and after.
    The accounts tests build their own stored accounts on it."""
    base = {
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
        "UPESIPAY_AUTH_TOKEN": "tok_env_account_value",
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": "acct-env",
        "CALLBACK_BASE_URL": "http://127.0.0.1:9",
        "CALLBACK_SECRET": "s" * 32,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "ACCOUNT_TOKEN_KEY": generate_key(),
    }
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    runtime.reset()
    create_schema(runtime.engine())
    yield
    runtime.engine().dispose()
    runtime.reset()


def redis_db(server: EmbeddedRedis, db: int) -> str:
    """The URL of database `db` on the suite's private Redis; each stack of the suite takes its own number."""
    return server.url.rsplit("/", 1)[0] + f"/{db}"


@contextmanager
def running_stack(
    server: EmbeddedRedis,
    db: int,
    *,
    scenario: Mapping[str, Any] | None = None,
    workers: int = 1,
    beat: bool = True,
    extra_env: Mapping[str, str] | None = None,
    tmpdir_inside: bool = False,
    sandbox_args: tuple[str, ...] = (),
) -> Iterator[Stack]:
    """A stack of its own, activated for this process while the block runs, stopped (and deactivated) after.

    `tmpdir_inside` points the processes' temporary folder into the stack's folder, which goes with the stack
    (the web process keeps batch uploads and rejects files there)."""
    stack = Stack(
        redis_url=redis_db(server, db),
        scenario=json.dumps(scenario) if scenario is not None else Stack.scenario,
        extra_env=dict(extra_env or {}),
        workers=workers,
        sandbox_args=sandbox_args,
    )
    if tmpdir_inside:
        stack.extra_env["TMPDIR"] = str(stack.workdir)
    try:
        stack.start(workers=workers, beat=beat)
        stack.activate()
        yield stack
    finally:
        stack.deactivate()
        stack.stop()


def wait_for_state(
    payment_id: str, states: frozenset[PaymentState] = TERMINAL_STATES, timeout_s: float = 30
) -> Payment:
    """Poll the ledger until the payment is in one of `states`; fail naming the state and reason it is stuck in."""
    deadline = time.monotonic() + timeout_s
    while True:
        payment = get_payment(runtime.engine(), payment_id)
        if payment is not None and payment.state in states:
            return payment
        if time.monotonic() > deadline:
            state = (payment.state, payment.reason) if payment is not None else None
            raise AssertionError(f"payment {payment_id} still {state} after {timeout_s}s")
        time.sleep(0.1)


def pushes_for(stack: Stack, external_reference: str) -> int:
    """How many pushes the sandbox received for this reference: the customer's prompts, by the provider's count."""
    by_reference: Any = stack.sandbox_stats()["pushes_by_reference"]
    return int(by_reference.get(external_reference, 0))


def callbacks_sent(stack: Stack) -> int:
    return int(stack.sandbox_stats()["callbacks_sent"])  # type: ignore[call-overload]


def set_scenario(stack: Stack, scenario: Mapping[str, Any]) -> None:
    answer = httpx.put(f"{stack.sandbox_url}/sandbox/scenario", json=dict(scenario), timeout=5)
    assert answer.status_code == 200, answer.text


def new_reference(prefix: str = "T") -> str:
    return f"{prefix}-" + secrets.token_hex(5).upper()


def api_key(stack: Stack) -> dict[str, str]:
    """The header of the stack's producer API key."""
    return {"X-API-Key": stack.env["API_KEYS"]}


def wait_for_batch(stack: Stack, batch_id: str, timeout_s: float = 30) -> dict[str, Any]:
    """GET /batches/{id} until the batch is no longer INGESTING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(
            f"{stack.web_url}/batches/{batch_id}", headers=api_key(stack), timeout=5
        ).json()
        if status["state"] != "INGESTING":
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still ingesting after {timeout_s}s")


def record_sent(payment: Payment, token: str | None = None) -> Payment:
    """Store `payment` (state, references and sent_at set by the caller) as sent through one send attempt, as
    every payment is: a callback then settles that attempt."""
    payment.guard_token = token or f"{payment.id}.a1"
    attempt = SendAttempt(
        id=payment.guard_token,
        payment_id=payment.id,
        account=payment.account,
        number=1,
        sent_at=payment.sent_at,
        provider_reference=payment.provider_reference,
        checkout_request_id=payment.checkout_request_id,
    )
    with session_scope(runtime.engine()) as session:
        session.add(payment)
        session.flush()
        session.add(attempt)
        session.commit()
    return payment
