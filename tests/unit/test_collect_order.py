"""Issue 13 in the ledger: the score of a number from its history, the release order it gives, the re-prompt
decision taken where an attempt ends, and the forecasts' arithmetic (ledger on SQLite, guard on the suite's Redis,
UpesiPay behind httpx's MockTransport)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select

from tests.unit import test_sending
from tests.unit.test_sending import Provider, new_payment, reload
from worker import bulk_order, dispatch, forecast, reprompts, runtime, scoring
from worker.attempts import attempts_of
from worker.guard import RefusalReason
from worker.ledger import (
    AttemptOutcome,
    Batch,
    Payment,
    PaymentState,
    SendAttempt,
    mark,
    session_scope,
    utcnow,
)
from worker.sending import SendResult, send_payment
from worker.settings import get_settings
from worker.settlement import finish

provider = test_sending.provider
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def history(*outcomes: tuple[int, bool, bool]) -> scoring.History:
    """(days ago, paid, cancelled) ..."""
    return scoring.History(
        [(NOW - timedelta(days=days), paid, cancelled) for days, paid, cancelled in outcomes]
    )


def test_payers_score_above_new_numbers_and_new_numbers_above_non_payers() -> None:
    payer = scoring.score_of(history((90, True, False), (60, True, False), (30, True, False)), NOW)
    fresh = scoring.score_of(scoring.History(), NOW)
    non_payer = scoring.score_of(history((90, False, False), (60, True, False), (30, False, False)), NOW)
    assert payer > fresh == scoring.NO_HISTORY > non_payer


def test_a_current_streak_or_a_recent_cancellation_goes_below_every_other_number() -> None:
    worst_without = scoring.score_of(history((90, False, False), (60, True, False), (30, False, False)), NOW)
    streak = scoring.score_of(
        history((90, True, False), (60, True, False), (2, False, False), (1, False, False)), NOW
    )
    recent_cancel = scoring.score_of(history((90, True, False), (60, True, False), (3, False, True)), NOW)
    assert streak < 0 and recent_cancel < 0 < worst_without


def test_recent_outcomes_weigh_more_than_old_ones() -> None:
    recent_success = scoring.score_of(history((300, False, False), (10, True, False)), NOW)
    recent_failure = scoring.score_of(history((300, True, False), (10, False, False)), NOW)
    assert recent_success > scoring.NO_HISTORY > recent_failure


def test_an_old_cancellation_weighs_less_than_an_unanswered_prompt() -> None:
    cancelled = scoring.score_of(history((90, True, False), (30, False, True)), NOW)
    unanswered = scoring.score_of(history((90, True, False), (30, False, False)), NOW)
    assert cancelled > unanswered


def settled(reference: str, phone: str, state: PaymentState, days_ago: float, account: str = "unit") -> None:
    at = utcnow() - timedelta(days=days_ago)
    payment = Payment(
        account=account,
        external_reference=reference,
        phone=phone,
        amount=10,
        channel_id=2133,
        state=state,
        guard_token=f"{reference}.a1",
        settled_at=at,
    )
    outcome = AttemptOutcome.SUCCESS if state == PaymentState.SUCCEEDED else AttemptOutcome.FAILURE
    with session_scope(runtime.engine()) as session:
        session.add(payment)
        session.flush()
        session.add(
            SendAttempt(
                id=f"{reference}.a1",
                payment_id=payment.id,
                account=account,
                number=1,
                outcome=outcome,
                outcome_at=at,
                guard_resolved_at=at,
            )
        )
        session.commit()


def test_scores_come_from_this_accounts_ledger_only(provider: Provider) -> None:
    payer, stranger, rejected = "254711000001", "254711000002", "254711000003"
    for n in range(3):
        settled(f"P{n}", payer, PaymentState.SUCCEEDED, 30 + n)
        settled(f"S{n}", stranger, PaymentState.SUCCEEDED, 30 + n, account="other")
        settled(f"R{n}", rejected, PaymentState.REJECTED, 30 + n)
    with runtime.engine().connect() as connection:
        scores = scoring.scores_for(connection, "unit", [payer, stranger, rejected])
    assert scores[payer] > scoring.NO_HISTORY
    # Another account's history and requests UpesiPay refused (nobody prompted) say nothing here.
    assert scores[stranger] == scores[rejected] == scoring.NO_HISTORY


def new_batch(reprompt: int = 0, after_s: int | None = None) -> str:
    batch = Batch(account="unit", source_name="invoices.csv", reprompt_max=reprompt, reprompt_after_s=after_s)
    with session_scope(runtime.engine()) as session:
        session.add(batch)
        session.commit()
    return batch.id


def batch_row(batch_id: str, n: int, score: float | None = None) -> Payment:
    payment = new_payment(f"{batch_id[:6]}-{n}", phone=f"2547150{n:05d}")
    mark(runtime.engine(), payment.id, queue="bulk", batch_id=batch_id, score=score)
    return reload(payment)


@pytest.mark.parametrize("policy", ["score", "fifo"])
def test_the_dispatcher_releases_the_best_scored_due_rows_first_under_score_only(
    provider: Provider, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    monkeypatch.setenv("BULK_ORDER", policy)
    get_settings.cache_clear()
    batch_id = new_batch()
    scores = [0.2, 0.9, scoring.NO_HISTORY, -0.5, 0.7]
    rows = [batch_row(batch_id, n, score) for n, score in enumerate(scores)]
    due = utcnow() - timedelta(seconds=1)
    for n, row in enumerate(rows):
        # Recorded in file order, each due a moment later than the one before it.
        mark(
            runtime.engine(),
            row.id,
            state=PaymentState.DEFERRED,
            next_attempt_at=due + timedelta(milliseconds=n),
        )
    condition = (col(Payment.state) == PaymentState.DEFERRED) & (col(Payment.next_attempt_at) <= utcnow())
    picked = dispatch._bulk_turns(condition, 3)
    if policy == "score":
        assert picked == [rows[1].id, rows[4].id, rows[2].id]  # 0.9, 0.7, then no history (0.5) before 0.2
    else:
        assert picked == [rows[0].id, rows[1].id, rows[2].id]
    assert bulk_order.current().name == policy


def test_a_bulk_message_sends_its_batchs_best_scored_pending_row(provider: Provider) -> None:
    batch_id = new_batch()
    low, high = batch_row(batch_id, 1, 0.1), batch_row(batch_id, 2, 0.8)
    assert send_payment(low.id) == (SendResult.ACCEPTED, None)
    assert reload(high).state == PaymentState.AWAITING_CALLBACK
    # Its own message's turn went to the likelier payer: the row waits in the pool, due at once, for the dispatcher
    # or the next bulk message.
    low = reload(low)
    assert low.state == PaymentState.DEFERRED and low.next_attempt_at is not None
    assert low.next_attempt_at.replace(tzinfo=UTC) <= utcnow()


def test_a_better_row_deferred_for_the_lane_goes_before_worse_pending_rows(provider: Provider) -> None:
    batch_id = new_batch()
    low, middle, high = (batch_row(batch_id, n, score) for n, score in ((1, 0.1), (2, 0.4), (3, 0.8)))
    later = utcnow() + timedelta(seconds=60)
    # Refused while the lane was full (its due time only a retry hint), and a better one waiting for a real reason.
    mark(
        runtime.engine(),
        middle.id,
        state=PaymentState.DEFERRED,
        reason=dispatch.guard_refusal_reason(RefusalReason.BULK_LANE_FULL),
        next_attempt_at=later,
    )
    mark(
        runtime.engine(),
        high.id,
        state=PaymentState.DEFERRED,
        reason="guard: phone_busy",
        next_attempt_at=later,
    )
    assert send_payment(low.id) == (SendResult.ACCEPTED, None)
    assert reload(middle).state == PaymentState.AWAITING_CALLBACK
    assert reload(high).state == PaymentState.DEFERRED  # not due: never taken early
    assert reload(low).state == PaymentState.DEFERRED
    # The next message (the dispatcher's release of the low row) sends the best row left that may go now.
    mark(runtime.engine(), low.id, state=PaymentState.PENDING)
    assert send_payment(low.id) == (SendResult.ACCEPTED, None)
    assert reload(low).state == PaymentState.AWAITING_CALLBACK


def sent_row(batch_id: str, n: int = 1) -> Payment:
    row = batch_row(batch_id, n)
    assert send_payment(row.id) == (SendResult.ACCEPTED, None)
    return reload(row)


def test_a_cancelled_prompt_of_a_batch_with_reprompts_waits_to_be_asked_again(provider: Provider) -> None:
    row = sent_row(new_batch(reprompt=2, after_s=600))
    before = utcnow()
    assert finish(row, PaymentState.CANCELLED, result_code=1032, result_desc="Request cancelled by user")
    waiting = reload(row)
    assert waiting.state == PaymentState.DEFERRED and waiting.guard_token is None
    assert waiting.reason == "re-prompt 1 of 2: prompt cancelled"
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at.replace(tzinfo=UTC) >= before + timedelta(seconds=600)
    # Not due: the dispatcher leaves it alone.
    dispatch.release_deferred()
    assert reload(row).state == PaymentState.DEFERRED


def test_reprompts_stop_after_n_further_prompts_and_the_last_outcome_stands(provider: Provider) -> None:
    row = sent_row(new_batch(reprompt=1, after_s=1))
    assert finish(row, PaymentState.FAILED, result_code=1037)
    assert reload(row).state == PaymentState.DEFERRED
    mark(runtime.engine(), row.id, next_attempt_at=utcnow() - timedelta(seconds=1))
    dispatch.release_deferred()
    assert send_payment(row.id) == (SendResult.ACCEPTED, None)
    second = reload(row)
    assert finish(second, PaymentState.FAILED, result_code=1037)
    assert reload(row).state == PaymentState.FAILED
    prompts = [a for a in attempts_of(runtime.engine(), row.id) if a.outcome == AttemptOutcome.FAILURE]
    assert len(prompts) == 2 and len(provider.pushes) == 2


def test_no_reprompt_after_a_success_another_failure_or_without_the_option(provider: Provider) -> None:
    with_option = new_batch(reprompt=3, after_s=1)
    paid, broke = sent_row(with_option, 1), sent_row(with_option, 2)
    assert finish(paid, PaymentState.SUCCEEDED, result_code=0, receipt="SAE3YULR0Y")
    assert finish(broke, PaymentState.FAILED, result_code=1)  # insufficient funds: not worth asking again
    plain = sent_row(new_batch(), 3)
    assert finish(plain, PaymentState.CANCELLED, result_code=1032)
    assert [reload(p).state for p in (paid, broke, plain)] == [
        PaymentState.SUCCEEDED,
        PaymentState.FAILED,
        PaymentState.CANCELLED,
    ]


def test_a_replayed_callback_reprompts_nobody_twice(provider: Provider) -> None:
    row = sent_row(new_batch(reprompt=2, after_s=60))
    assert finish(row, PaymentState.CANCELLED, result_code=1032)
    first = reload(row)
    assert not finish(row, PaymentState.CANCELLED, result_code=1032)  # the same attempt again
    assert reload(row).reason == first.reason == "re-prompt 1 of 2: prompt cancelled"
    assert reload(row).next_attempt_at == first.next_attempt_at


@pytest.mark.parametrize(
    ("reprompt", "after", "field"),
    [
        (6, 60, "reprompt"),
        (-1, 60, "reprompt"),
        (2, None, "reprompt_after"),
        (0, 60, "reprompt_after"),
        (1, 0, "reprompt_after"),
        (1, 8 * 86400, "reprompt_after"),
    ],
)
def test_bad_reprompt_options_name_the_field(reprompt: int, after: int | None, field: str) -> None:
    with pytest.raises(reprompts.RepromptError) as caught:
        reprompts.check(reprompt, after)
    assert caught.value.field == field


def test_reprompt_after_reads_units() -> None:
    assert [reprompts.parse_after(text) for text in ("4h", "30m", "90s", "2d", "45")] == [
        14400,
        1800,
        90,
        172800,
        45,
    ]
    with pytest.raises(reprompts.RepromptError):
        reprompts.parse_after("soon")


def test_a_steady_batch_finishes_when_its_failures_fit_the_sliding_windows() -> None:
    # 100 prompts, half fail, bulk lane 40 failures per 100 s window, fast prompts: the first 80 prompts fit the
    # first window; the 20 left wait for the window to slide past the first failures.
    finish_at = forecast.project_finish(
        now=NOW, prompts=100, failure_rate=0.5, prompt_s=0.5, max_inflight=20, bulk_budget=40, window_s=100
    )
    assert finish_at is not None
    assert 100 <= (finish_at - NOW).total_seconds() <= 106
    # No failures: only the pace counts (100 prompts, 20 at a time, 0.5 s each = 2.5 s).
    quick = forecast.project_finish(
        now=NOW, prompts=100, failure_rate=0.0, prompt_s=0.5, max_inflight=20, bulk_budget=40, window_s=100
    )
    assert quick is not None and 2.4 <= (quick - NOW).total_seconds() <= 3.1


def test_the_budget_frees_when_the_oldest_failure_leaves_the_window(provider: Provider) -> None:
    settings = runtime.settings()
    now = utcnow()
    oldest = now - timedelta(seconds=settings.account_window_s - 120)
    payment = new_payment("F-1")
    with session_scope(runtime.engine()) as session:
        for n, at in enumerate([oldest, now - timedelta(seconds=60)]):
            session.add(
                SendAttempt(
                    id=f"{payment.id}.f{n}",
                    payment_id=payment.id,
                    account="unit",
                    number=n + 1,
                    outcome=AttemptOutcome.FAILURE,
                    outcome_at=at,
                    guard_resolved_at=at,
                )
            )
        session.commit()
    budget = forecast.budget_forecast(runtime.engine(), "unit", settings, now)
    assert budget.failures_in_window == 2
    assert budget.next_free_at is not None
    assert (
        abs((budget.next_free_at - (oldest + timedelta(seconds=settings.account_window_s))).total_seconds())
        < 1
    )
    assert budget.bulk_free_at is None  # the bulk lane has room
    series = forecast.window_series(runtime.engine(), "unit", settings, now)
    assert len(series) == 73 and series[-1]["failures"] == 2 and series[0]["failures"] == 0
    with session_scope(runtime.engine()) as session:
        assert len(session.exec(select(SendAttempt)).all()) == 2


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--reprompt", "9", "--reprompt-after", "4h"], "--reprompt:"),
        (["--reprompt", "2"], "--reprompt-after:"),
        (["--reprompt", "1", "--reprompt-after", "soon"], "--reprompt-after:"),
    ],
)
def test_stkpush_batch_refuses_bad_reprompt_options_naming_them_and_records_nothing(
    provider: Provider, tmp_path: Path, options: list[str], named: str
) -> None:
    from click.testing import CliRunner

    from worker.cli.main import main

    batch_file = tmp_path / "invoices.csv"
    batch_file.write_text("external_reference,phone_number,amount\nINV-1,0712345678,10\n")
    result = CliRunner().invoke(main, ["batch", str(batch_file), *options])
    assert result.exit_code == 2
    assert named in result.output
    with session_scope(runtime.engine()) as session:
        assert session.exec(select(Batch)).all() == [] and session.exec(select(Payment)).all() == []
