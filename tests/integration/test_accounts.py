"""Several UpesiPay accounts in one deployment, over the real stack and a sandbox with one token per account:
each account's payments go out with its own token and channel, and one account's refused credentials, budget or
restriction never slows another's (docs/operations.md, "Adding a merchant")."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from tests.support import new_reference, running_stack, wait_for_state
from worker import runtime
from worker.accounts import add_account, update_account
from worker.ledger import Payment, PaymentState, SendAttempt, find_by_reference, session_scope
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import SANDBOX_CHANNEL_ID, Stack
from worker.secrets_box import generate_key

DB = 32
TOKENS = {name: f"sbx_{name}_" + secrets.token_urlsafe(12) for name in ("alpha", "bravo", "charlie")}
# The sandbox labels tokens in the order given: the environment's is account-1.
LABELS = {"alpha": "account-2", "bravo": "account-3", "charlie": "account-4"}
KEYS = {name: f"key_{name}_" + secrets.token_urlsafe(12) for name in TOKENS}
ALPHA_LIMIT = 5
FAILING = {f"0711{n:06d}": "timeout" for n in range(ALPHA_LIMIT + 3)}
SCENARIO = {"seed": 16, "callback_delay_s": 0.2, "default": "success", "phones": FAILING}


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    env = {
        "ACCOUNT_TOKEN_KEY": generate_key(),
        "ACCOUNT_CACHE_S": "0.5",
        # Long enough to see the pause while it lasts on a loaded machine, short enough for the probe to come soon.
        "CREDENTIALS_PROBE_S": "8",
        "OTHER_CHANNELS_POLL_S": "1",
        "API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
    }
    tokens = tuple(part for token in TOKENS.values() for part in ("--token", token))
    with running_stack(
        redis_server, DB, scenario=SCENARIO, workers=2, extra_env=env, sandbox_args=tokens
    ) as running:
        yield running


def post_payment(stack: Stack, account: str, phone: str, reference: str) -> str:
    answer = httpx.post(
        f"{stack.web_url}/payments",
        json={"amount": 10, "phone_number": phone, "external_reference": reference},
        headers={"X-API-Key": KEYS[account]},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def stats(stack: Stack) -> dict[str, Any]:
    return stack.sandbox_stats()


def attempts_of(payment_id: str) -> list[SendAttempt]:
    with session_scope(runtime.engine()) as session:
        return list(session.exec(select(SendAttempt).where(col(SendAttempt.payment_id) == payment_id)).all())


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s}s: {what}")
        time.sleep(0.1)


def test_one_accounts_refused_token_budget_and_restriction_never_slow_the_others(stack: Stack) -> None:
    engine, settings = runtime.engine(), runtime.settings()
    # Given alpha stored with a token the provider refuses, and bravo and charlie with theirs.
    add_account(
        engine,
        settings,
        "alpha",
        [SANDBOX_CHANNEL_ID],
        "sbx_wrong_" + secrets.token_urlsafe(8),
        {"account_failure_limit": ALPHA_LIMIT, "interactive_reserve": 1},
    )
    for name in ("bravo", "charlie"):
        add_account(engine, settings, name, [SANDBOX_CHANNEL_ID], TOKENS[name])

    # When alpha's credentials are refused: only alpha pauses.
    alpha_first = post_payment(stack, "alpha", "0712000001", new_reference("A"))
    wait_until(
        lambda: (
            (find := wait_for_state(alpha_first, frozenset(PaymentState), 5)).state == PaymentState.DEFERRED
            and "credentials" in (find.reason or "")
        ),
        20,
        "alpha's payment deferred by its refused credentials",
    )
    assert runtime.credentials_pause("alpha").remaining_s() > 0
    assert runtime.credentials_pause("bravo").remaining_s() == 0
    during_pause = [
        post_payment(stack, name, f"07130000{i}{n}", new_reference(name[0].upper()))
        for n, name in enumerate(("bravo", "charlie"))
        for i in range(3)
    ]
    for payment_id in during_pause:
        assert wait_for_state(payment_id, timeout_s=20).state == PaymentState.SUCCEEDED
        assert len(attempts_of(payment_id)) == 1  # never deferred: alpha's pause is alpha's only

    # Then the right token (stkpush account set) reaches the workers, and alpha's payment goes out after its probe.
    update_account(engine, settings, "alpha", token=TOKENS["alpha"])
    assert wait_for_state(alpha_first, timeout_s=45).state == PaymentState.SUCCEEDED

    # When alpha is driven into its budget: its failures fill its own window, its later payments wait.
    failing = [post_payment(stack, "alpha", phone, new_reference("AF")) for phone in FAILING]
    wait_until(
        lambda: (
            sum(1 for payment_id in failing if find_one(payment_id).state == PaymentState.FAILED)
            >= ALPHA_LIMIT
        ),
        30,
        "alpha's failures recorded",
    )
    # ... and the provider restricts it (forced here: failures alpha made through another channel).
    forced = httpx.post(
        f"{stack.sandbox_url}/sandbox/other-channel",
        json={"account": LABELS["alpha"], "count": 50, "outcome": "timeout"},
        timeout=5,
    ).json()
    assert stats(stack)["account_restricted_until"][LABELS["alpha"]] is not None
    alpha_pushes = stats(stack)["pushes_by_account"][LABELS["alpha"]]

    # Then bravo and charlie go on at full speed: singles and a batch each, every one sent once, all settled.
    started = time.monotonic()
    singles = [
        post_payment(stack, name, f"0714{n:02d}{i:04d}", new_reference(name[0].upper()))
        for n, name in enumerate(("bravo", "charlie"))
        for i in range(10)
    ]
    batches = {}
    for n, name in enumerate(("bravo", "charlie")):
        rows = "".join(f"{new_reference('BR')},0715{n:02d}{i:04d},10\n" for i in range(10))
        answer = httpx.post(
            f"{stack.web_url}/batches",
            content=("external_reference,phone_number,amount\n" + rows).encode(),
            headers={"X-API-Key": KEYS[name], "Content-Type": "text/csv"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        batches[name] = answer.json()["batch_id"]
    for payment_id in singles:
        assert wait_for_state(payment_id, timeout_s=30).state == PaymentState.SUCCEEDED
        assert len(attempts_of(payment_id)) == 1
    for name, batch_id in batches.items():
        status: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(
                f"{stack.web_url}/batches/{batch_id}", headers={"X-API-Key": KEYS[name]}, timeout=5
            ).json()
            if status["payments_by_state"]["SUCCEEDED"] == 10:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{name}'s batch not settled in 60 s: {status}")
    elapsed = time.monotonic() - started
    # Full speed is proven by every one of them going out on its first attempt (never deferred); the time bound only
    # catches a stall.
    assert elapsed < 60, f"bravo and charlie took {elapsed:.1f}s"

    # Alpha sent nothing more meanwhile: its unsent payments wait on its own guard.
    after = stats(stack)
    assert after["pushes_by_account"][LABELS["alpha"]] == alpha_pushes
    waiting = [row for payment_id in failing if (row := find_one(payment_id)).state == PaymentState.DEFERRED]
    assert waiting and all((row.reason or "").startswith("guard: account_") for row in waiting)
    # The sandbox: no trigger on bravo or charlie, and on alpha none beyond the one the test forced.
    by_account = after["rule_triggers_by_account"]
    assert sum(by_account[LABELS["bravo"]].values()) == 0
    assert sum(by_account[LABELS["charlie"]].values()) == 0
    assert sum(by_account[LABELS["alpha"]].values()) == forced["rule_triggers"] >= 1
    assert after["rule_triggers_total"] == forced["rule_triggers"]
    assert after["inflight_max_per_phone"] == 1
    # Each account's payments went out with its own token: the sandbox counted them on its own label.
    assert after["pushes_by_account"][LABELS["bravo"]] == 3 + 10 + 10
    assert after["pushes_by_account"][LABELS["charlie"]] == 3 + 10 + 10
    assert after["pushes_by_account"].get("account-1", 0) == 0
    # And a key of one account cannot read another's payment.
    reference = find_one(singles[0]).external_reference
    assert (
        httpx.get(f"{stack.web_url}/payments/{reference}", headers={"X-API-Key": KEYS["charlie"]}).status_code
        == 404
    )
    assert find_by_reference(engine, "bravo", reference) is not None
    # /metrics labels each account's own state.
    text = httpx.get(f"{stack.web_url}/metrics", timeout=10).text
    assert 'stkpush_account_guard_headroom{account="alpha"} 0.0' in text
    assert 'stkpush_account_payments{account="bravo",state="SUCCEEDED"} 23.0' in text
    assert 'stkpush_account_sending_paused_seconds{account="charlie"} 0.0' in text


def find_one(payment_id: str) -> Payment:
    return wait_for_state(payment_id, frozenset(PaymentState), 5)
