"""Issue 11's waiting rules on the real send path (claim, guard on a real Redis, the UpesiPay client, SQLite ledger),
UpesiPay's answers injected through httpx's transport seam (tests/unit/test_sending.py's fixture):

- a block or restriction without a stated end lasts the rule's own duration, one with `until <time>` that time;
- a payment whose sends never reached UpesiPay is re-opened by `stkpush retry` / the API only when that is provable,
  once, whoever races.
"""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import update
from sqlmodel import col, func, select

from tests.unit.test_sending import Handler, Provider, new_payment, provider, reload
from worker import runtime
from worker.ambiguous import lookups_of
from worker.attempts import attempts_of, mark_attempt
from worker.ledger import (
    ExternalFailure,
    GuardBlock,
    GuardBlockKind,
    Payment,
    PaymentReopen,
    PaymentState,
    UnknownLookup,
    get_payment,
    session_scope,
    utcnow,
)
from worker.provider_blocks import restriction_s
from worker.provider_callback import ProviderCallback, apply_callback
from worker.retry import reopen
from worker.sending import SendResult, send_payment
from worker.settings import get_settings
from worker.settlement import settle_from_status
from worker.upesipay import StatusResult, TransactionStatus

__all__ = ["provider"]  # the fixture of test_sending, used here
HOUR = 3600.0
PHONE_BLOCKED = {"error_message": "STK push blocked for this phone number by abuse protection"}
ACCOUNT_RESTRICTED = {"error_message": "Account restricted from STK push by abuse protection"}


def answer_429(body: dict[str, str], headers: dict[str, str] | None = None) -> Handler:
    return lambda _request: httpx.Response(429, json=body, headers=headers)


def deferred_for_s(payment_id: str) -> float:
    stored = reload_id(payment_id)
    assert stored.state == PaymentState.DEFERRED and stored.next_attempt_at is not None
    return (stored.next_attempt_at - utcnow()).total_seconds()


def reload_id(payment_id: str) -> Payment:
    stored = get_payment(runtime.engine(), payment_id)
    assert stored is not None
    return stored


def blocks(kind: GuardBlockKind) -> list[GuardBlock]:
    with session_scope(runtime.engine()) as session:
        return list(session.exec(select(GuardBlock).where(col(GuardBlock.kind) == kind)).all())


def add_external_failures(count: int) -> None:
    now = utcnow()
    with session_scope(runtime.engine()) as session:
        for index in range(count):
            session.add(ExternalFailure(account="unit", provider_reference=f"X{index}", failed_at=now))
        session.commit()


def test_a_number_blocked_without_retry_after_waits_24_hours_and_its_other_payments_are_refused(
    provider: Provider,
) -> None:
    provider.handler = answer_429(PHONE_BLOCKED)
    payment = new_payment("A")
    assert send_payment(payment.id)[0] == SendResult.DEFERRED
    # The payment waits the rule's 24 h, not 60 s; the ledger holds the block until then (a rebuild keeps it)
    assert 24 * HOUR - 60 <= deferred_for_s(payment.id) <= 24 * HOUR
    (block,) = blocks(GuardBlockKind.PHONE)
    until = block.until if block.until.tzinfo else block.until.replace(tzinfo=utcnow().tzinfo)
    assert 24 * HOUR - 60 <= (until - utcnow()).total_seconds() <= 24 * HOUR
    # Another payment to that number is refused by the guard and never reaches UpesiPay
    other = new_payment("B")
    assert send_payment(other.id)[0] == SendResult.DEFERRED
    assert len(provider.pushes) == 1
    assert deferred_for_s(other.id) >= 24 * HOUR - 60
    # ... while another number is sent
    provider.handler = lambda _r: httpx.Response(
        201, json={"success": True, "status": "QUEUED", "reference": "R2", "CheckoutRequestID": "ws_2"}
    )
    assert send_payment(new_payment("C", phone="254712345679").id)[0] == SendResult.ACCEPTED


@pytest.mark.parametrize(("failures", "hours"), [(0, 4), (49, 4), (500, 24), (1000, 72)])
def test_an_account_restricted_without_retry_after_waits_the_tier_its_window_implies(
    provider: Provider, failures: int, hours: float
) -> None:
    add_external_failures(failures)
    provider.handler = answer_429(ACCOUNT_RESTRICTED)
    payment = new_payment()
    assert send_payment(payment.id)[0] == SendResult.DEFERRED
    assert hours * HOUR - 60 <= deferred_for_s(payment.id) <= hours * HOUR
    restricted = runtime.guard().account_snapshot().restricted_until
    assert restricted is not None and restricted - utcnow().timestamp() >= hours * HOUR - 60
    assert len(blocks(GuardBlockKind.ACCOUNT)) == 1


def test_an_end_stated_in_the_message_is_used(provider: Provider) -> None:
    until = (utcnow() + timedelta(hours=2)).replace(microsecond=0)
    body = {"error_message": f"{PHONE_BLOCKED['error_message']} until {until.isoformat()}"}
    provider.handler = answer_429(body)
    payment = new_payment()
    send_payment(payment.id)
    assert 2 * HOUR - 60 <= deferred_for_s(payment.id) <= 2 * HOUR + 1


def test_retry_after_wins_over_the_rule(provider: Provider) -> None:
    provider.handler = answer_429(PHONE_BLOCKED, {"Retry-After": "900"})
    payment = new_payment()
    send_payment(payment.id)
    assert 840 <= deferred_for_s(payment.id) <= 900


def test_the_looser_wait_is_an_explicit_setting(provider: Provider, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_BLOCK_WAIT_S", "600")
    get_settings.cache_clear()
    provider.handler = answer_429(PHONE_BLOCKED)
    payment = new_payment()
    send_payment(payment.id)
    assert 540 <= deferred_for_s(payment.id) <= 600


def test_a_plain_429_naming_no_scope_is_throttling_and_waits_a_minute(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(429, text="slow down")
    payment = new_payment()
    send_payment(payment.id)
    assert 0 < deferred_for_s(payment.id) <= 60


def test_restriction_tiers_never_below_four_hours() -> None:
    assert [restriction_s(n) / HOUR for n in (0, 50, 499, 500, 999, 1000, 5000)] == [4, 4, 4, 24, 24, 72, 72]


# -- re-opening payments never sent ------------------------------------------------------------------------------


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def failed_never_sent(provider: Provider, reference: str = "NS-1") -> str:
    provider.handler = refuse
    payment = new_payment(reference)
    send_payment(payment.id)
    first = attempts_of(runtime.engine(), payment.id)[0]
    old = first.created_at - timedelta(seconds=runtime.settings().send_retry_for_s + 1)
    mark_attempt(runtime.engine(), first.id, created_at=old)
    assert send_payment(payment.id)[0] == SendResult.GAVE_UP
    assert reload(payment).state == PaymentState.FAILED
    return payment.id


def reopens(payment_id: str) -> int:
    with session_scope(runtime.engine()) as session:
        statement = select(func.count()).select_from(PaymentReopen)
        return int(session.exec(statement.where(col(PaymentReopen.payment_id) == payment_id)).one())


def test_a_never_sent_payment_is_reopened_once_and_its_budget_starts_afresh(provider: Provider) -> None:
    payment_id = failed_never_sent(provider)
    stale = reload_id(payment_id)
    first = reopen(runtime.engine(), stale, "ops")
    assert first.reopened and first.refusal is None and first.payment.state == PaymentState.PENDING
    assert first.payment.attempts == 0
    # A racing caller holding the same FAILED row, and a repeat, re-open nothing more and are not refused
    assert reopen(runtime.engine(), stale, "ops") == reopen(runtime.engine(), stale, "ops")
    again = reopen(runtime.engine(), stale, "ops")
    assert not again.reopened and again.refusal is None
    assert reopens(payment_id) == 1
    # Its budget runs from the re-opening: the next not-sent attempt waits again instead of failing
    assert send_payment(payment_id)[0] == SendResult.RETRY


def test_a_payment_that_may_have_reached_upesipay_is_not_reopened(provider: Provider) -> None:
    provider.handler = lambda _r: httpx.Response(502, text="bad gateway")
    payment = new_payment()
    assert send_payment(payment.id)[0] == SendResult.UNKNOWN
    from worker.settlement import finish

    assert finish(reload(payment), PaymentState.FAILED, reason="unsettled: test")
    answer = reopen(runtime.engine(), reload(payment), "ops")
    assert (
        not answer.reopened and answer.refusal is not None and "may have reached UpesiPay" in answer.refusal
    )
    assert reload(payment).state == PaymentState.FAILED and reopens(payment.id) == 0


def test_a_payment_not_failed_is_not_reopened(provider: Provider) -> None:
    payment = new_payment()
    answer = reopen(runtime.engine(), reload(payment), "ops")
    assert answer.refusal is not None and "not FAILED" in answer.refusal


def test_the_cli_and_the_api_reopen_or_refuse_with_the_reason(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from worker.cli.main import main
    from worker.web.app import create_app

    monkeypatch.setenv("API_KEYS", "unit-api-key-0123456789")
    get_settings.cache_clear()
    published: list[str] = []
    monkeypatch.setattr("worker.dispatch.publish_payment", lambda pid, **_kw: published.append(pid) or True)
    never = failed_never_sent(provider, "NS-CLI")
    runner = CliRunner()
    done = runner.invoke(main, ["retry", "NS-CLI", "--by", "alice"])
    assert done.exit_code == 0, done.output
    assert "re-opened NS-CLI" in done.output and published == [never]
    # By payment id, again: the same answer, nothing queued twice
    assert runner.invoke(main, ["retry", never]).exit_code == 0 and published == [never]
    refused = runner.invoke(main, ["retry", "NO-SUCH"])
    assert refused.exit_code == 1 and "no payment" in refused.output

    client = TestClient(create_app())
    headers = {"X-API-Key": "unit-api-key-0123456789"}
    other = new_payment("API-1", phone="254712345670")
    answer = client.post("/payments/API-1/retry", headers=headers)
    assert answer.status_code == 409 and "not FAILED" in answer.json()["detail"]
    assert client.post("/payments/NOPE/retry", headers=headers).status_code == 404
    assert client.post("/payments/API-1/retry").status_code == 401
    api_never = failed_never_sent(provider, "NS-API")
    answer = client.post(f"/payments/{api_never}/retry", headers=headers)
    assert answer.status_code == 200 and answer.json()["reopened"] is True
    assert reload_id(other.id).state == PaymentState.PENDING


# -- ResultCode 1001: another transaction in progress on the phone -----------------------------------------------


def in_progress_callback(payment: Payment) -> ProviderCallback:
    return ProviderCallback(
        result_code=1001,
        result_desc="Unable to lock subscriber, a transaction is already in process for the current subscriber",
        checkout_request_id=payment.checkout_request_id,
        receipt=None,
        amount=payment.amount,
        phone=payment.phone,
        external_reference=payment.external_reference,
    )


def test_result_1001_counts_for_the_guard_and_is_retried_a_bounded_number_of_times(
    provider: Provider,
) -> None:
    from worker.ledger import transition

    retries = runtime.settings().in_progress_retries
    payment = new_payment()
    for attempt in range(1, retries + 2):
        assert send_payment(payment.id)[0] == SendResult.ACCEPTED
        sent = reload(payment)
        assert apply_callback(sent, in_progress_callback(sent))
        # A redelivered callback changes nothing more
        assert not apply_callback(sent, in_progress_callback(sent))
        stored = reload(payment)
        guard = runtime.guard()
        assert guard.account_snapshot().failures_in_window == attempt
        assert guard.phone_snapshot(payment.phone).streak == attempt
        if attempt <= retries:
            # Not the payment's end: it waits IN_PROGRESS_RETRY_S, then goes out as a new attempt
            assert stored.state == PaymentState.DEFERRED and stored.result_code == 1001
            wait = deferred_for_s(payment.id)
            assert (
                runtime.settings().in_progress_retry_s - 5 <= wait <= runtime.settings().in_progress_retry_s
            )
            assert transition(runtime.engine(), payment.id, [PaymentState.DEFERRED], PaymentState.PENDING)
        else:
            assert stored.state == PaymentState.FAILED and stored.result_code == 1001
    assert len(attempts_of(runtime.engine(), payment.id)) == retries + 1
    assert len(provider.pushes) == retries + 1


# -- ambiguous sends: resent only on strong evidence --------------------------------------------------------------

MISSING = StatusResult(TransactionStatus.NOT_FOUND, None, None, None, None, "no such request", None)
QUEUED = StatusResult(TransactionStatus.QUEUED, None, None, None, None, "queued", None)


@pytest.fixture
def unknown(provider: Provider, monkeypatch: pytest.MonkeyPatch) -> Payment:
    """An UNKNOWN payment (a 502 after sending) whose attempt went out an hour ago; publishing recorded only."""
    monkeypatch.setattr("worker.settlement.publish_payment", lambda *_a, **_kw: True)
    provider.handler = lambda _r: httpx.Response(502, text="bad gateway")
    payment = new_payment("AMB-1")
    assert send_payment(payment.id)[0] == SendResult.UNKNOWN
    age(payment, hours=1)
    return reload(payment)


def age(payment: Payment, **ago: float) -> None:
    stored = reload(payment)
    assert stored.guard_token is not None
    mark_attempt(runtime.engine(), stored.guard_token, sent_at=utcnow() - timedelta(**ago))


def space_out(minutes: float = 30) -> None:
    """Move every recorded lookup back in time, as if the spacing had passed since."""
    with session_scope(runtime.engine()) as session:
        rows = session.exec(select(UnknownLookup)).all()
        times = {row.id: row.asked_at for row in rows}
    with runtime.engine().begin() as connection:
        for row_id, asked_at in times.items():
            connection.execute(
                update(UnknownLookup)
                .where(col(UnknownLookup.id) == row_id)
                .values(asked_at=asked_at - timedelta(minutes=minutes))
            )


def lookups(payment: Payment) -> list[str]:
    token = reload(payment).guard_token
    assert token is not None
    return [row.answer for row in lookups_of(token)]


def trust_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKNOWN_RESEND_ON_LIST_ABSENCE", "true")
    get_settings.cache_clear()


def test_absence_from_the_list_alone_never_resends_by_default(unknown: Payment) -> None:
    for _ in range(4):
        assert settle_from_status(reload(unknown), MISSING) == "waiting"
        space_out()
    assert reload(unknown).state == PaymentState.UNKNOWN
    assert lookups(unknown) == ["not-found"] * 4  # the evidence is kept, it just proves nothing
    # ... and the existing give-up rule ends it (an assumed failure a late success may take back)
    age(unknown, seconds=runtime.settings().settle_give_up_s + 1)
    assert settle_from_status(reload(unknown), MISSING) == "gave-up"


def test_with_the_list_trusted_two_spaced_lookups_after_the_prompts_lifetime_resend(
    unknown: Payment, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust_the_list(monkeypatch)
    # A lookup while the prompt may still be live does not count
    age(unknown, seconds=runtime.settings().prompt_lifetime_s - 30)
    assert settle_from_status(reload(unknown), MISSING) == "waiting" and lookups(unknown) == []
    age(unknown, hours=1)
    # Lookups closer together than the spacing count once, however many passes ask (a crash, a second worker)
    for _ in range(3):
        assert settle_from_status(reload(unknown), MISSING) == "waiting"
    assert lookups(unknown) == ["not-found"]
    space_out()
    assert settle_from_status(reload(unknown), MISSING) == "resent"
    assert reload(unknown).state == PaymentState.PENDING


def test_a_lookup_that_finds_the_request_forbids_resending(
    unknown: Payment, monkeypatch: pytest.MonkeyPatch
) -> None:
    trust_the_list(monkeypatch)
    assert settle_from_status(reload(unknown), QUEUED) == "waiting"
    for _ in range(3):
        space_out()
        assert settle_from_status(reload(unknown), MISSING) == "waiting"
    assert reload(unknown).state == PaymentState.UNKNOWN and lookups(unknown)[0] == "queued"


def test_transaction_status_by_reference_is_evidence_by_default(unknown: Payment) -> None:
    from worker.ledger import mark

    mark(runtime.engine(), unknown.id, provider_reference="E8UWT7CLUW")
    assert settle_from_status(reload(unknown), MISSING) == "waiting"
    space_out()
    assert settle_from_status(reload(unknown), MISSING) == "resent"


def test_the_waiting_settings_refuse_looser_than_the_rules_allow() -> None:
    from tests.unit.test_guard_hold import REQUIRED
    from worker.settings import SettingsError, load_settings

    defaults = load_settings(**REQUIRED)
    assert (defaults.provider_block_wait_s, defaults.unknown_resend_on_list_absence) == (0, False)
    assert defaults.prompt_lifetime_s > 120 and defaults.unknown_lookups == 2
    assert defaults.send_retry_for_s == 3 * 3600
    for field, value in (("unknown_lookups", 1), ("prompt_lifetime_s", 0), ("in_progress_retries", -1)):
        with pytest.raises(SettingsError, match=field.upper()):
            load_settings(**REQUIRED, **{field: value})


def test_time_spent_waiting_on_the_guard_does_not_count_against_the_never_sent_budget(
    provider: Provider,
) -> None:
    from worker.ledger import transition

    # Given a payment the guard kept waiting for hours (another prompt in flight on the number)
    busy = new_payment("BUSY-A")
    assert send_payment(busy.id)[0] == SendResult.ACCEPTED
    waiting = new_payment("BUSY-B")
    assert send_payment(waiting.id)[0] == SendResult.DEFERRED
    (refused,) = attempts_of(runtime.engine(), waiting.id)
    hours_ago = refused.created_at - timedelta(seconds=runtime.settings().send_retry_for_s + 3600)
    mark_attempt(runtime.engine(), refused.id, created_at=hours_ago)
    # When it is finally admitted and UpesiPay can't be reached
    from worker.settlement import finish

    assert finish(reload(busy), PaymentState.SUCCEEDED, receipt="R1")
    # (the success released it at once; else the dispatcher would when due)
    transition(runtime.engine(), waiting.id, [PaymentState.DEFERRED], PaymentState.PENDING)
    assert reload(waiting).state == PaymentState.PENDING
    provider.handler = refuse
    # Then it retries: its budget starts with its first attempt that did not reach UpesiPay
    assert send_payment(waiting.id)[0] == SendResult.RETRY
    assert reload(waiting).state == PaymentState.PENDING
    assert [a.not_sent for a in attempts_of(runtime.engine(), waiting.id)] == [False, True]
