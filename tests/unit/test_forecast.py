"""A batch's forecast reads its rows' scores: the rows still to go fail as their scores say, corrected by how the
ended prompts of their score band did, and a batch whose prompts have barely ended takes the account's recent pace
(ledger on SQLite; docs/batches.md "Forecasts")."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.unit import test_sending
from tests.unit.test_collect_order import batch_row, new_batch
from tests.unit.test_sending import new_payment
from worker import forecast, runtime
from worker.ledger import AttemptOutcome, PaymentState, SendAttempt, mark, session_scope, utcnow
from worker.settings import get_settings

provider = test_sending.provider


def ended(payment_id: str, failed: bool, took_s: float = 1.0) -> None:
    """One prompt of `payment_id`, claimed `took_s` before it ended a moment ago."""
    done = utcnow() - timedelta(seconds=1)
    with session_scope(runtime.engine()) as session:
        session.add(
            SendAttempt(
                id=f"{payment_id}.1",
                payment_id=payment_id,
                account="unit",
                number=1,
                lane="bulk",
                created_at=done - timedelta(seconds=took_s),
                sent_at=done - timedelta(seconds=took_s),
                outcome=AttemptOutcome.FAILURE if failed else AttemptOutcome.SUCCESS,
                outcome_at=done,
            )
        )
        session.commit()
    state = PaymentState.CANCELLED if failed else PaymentState.SUCCEEDED
    mark(runtime.engine(), payment_id, state=state)


def scored_batch(ended_scores: list[float | None], failures: int, left_scores: list[float | None]) -> str:
    batch_id = new_batch()
    for n, score in enumerate(ended_scores):
        ended(batch_row(batch_id, n, score).id, failed=n < failures)
    for n, score in enumerate(left_scores, start=len(ended_scores)):
        batch_row(batch_id, n, score)  # PENDING
    return batch_id


@pytest.mark.usefixtures("provider")
def test_the_rows_left_fail_as_their_scores_say_calibrated_by_the_ended_ones() -> None:
    # Five likely payers (0.8) went first and one failed. The five left score 0.3, so 70% of them should fail, not
    # the 2 in 7 the ended prompts alone would say.
    batch_id = scored_batch([0.8] * 5, 1, [0.3] * 5)
    eta = forecast.batch_forecast(runtime.engine(), batch_id, get_settings())
    assert eta is not None and eta.remaining == 5 and eta.prompts_ended == 5
    assert eta.failure_rate == pytest.approx(0.7)
    # The band below the others (a score with 1 taken off) is read as the score it had.
    banded = scored_batch([0.8] * 5, 1, [0.3 - 1.0] * 5)
    eta = forecast.batch_forecast(runtime.engine(), banded, get_settings())
    assert eta is not None and eta.failure_rate == pytest.approx(0.7)


@pytest.mark.usefixtures("provider")
def test_a_band_takes_its_own_outcomes_as_they_come_and_leaves_the_other_bands_to_their_scores() -> None:
    # 0.8-rows: five ended, three failed, against 1.0 expected; the band's rate is (3 + 2 * 0.2) / (5 + 2). The
    # 0.1-rows have no outcome yet: their scores' 0.9 stands (the 0.8-band's luck says nothing of theirs).
    batch_id = scored_batch([0.8] * 5, 3, [0.8] * 4 + [0.1] * 4)
    eta = forecast.batch_forecast(runtime.engine(), batch_id, get_settings())
    assert eta is not None
    assert eta.failure_rate == pytest.approx(((3 + 2 * 0.2) / 7 + 0.9) / 2)


@pytest.mark.usefixtures("provider")
def test_without_history_the_rate_is_the_observed_one_smoothed() -> None:
    batch_id = scored_batch([None] * 6, 2, [None] * 10)
    eta = forecast.batch_forecast(runtime.engine(), batch_id, get_settings())
    assert eta is not None and eta.failure_rate == pytest.approx((2 + 1) / (6 + 2))


@pytest.mark.usefixtures("provider")
def test_a_batch_with_few_ended_prompts_takes_the_accounts_recent_pace() -> None:
    # Another payment of the account took 2 s a moment ago; the batch's one ended prompt took 1 s.
    ended(new_payment("CHECKOUT-1", phone="254711000001").id, failed=False, took_s=2.0)
    batch_id = scored_batch([None], 0, [None] * 10)
    eta = forecast.batch_forecast(runtime.engine(), batch_id, get_settings())
    assert eta is not None and eta.prompt_s == pytest.approx(1.5, abs=0.01)
    # Nothing ended at all on the account: the default.
    fresh = scored_batch([], 0, [None] * 3)
    with session_scope(runtime.engine()) as session:
        for attempt in session.query(SendAttempt).all():
            session.delete(attempt)
        session.commit()
    eta = forecast.batch_forecast(runtime.engine(), fresh, get_settings())
    assert eta is not None and eta.prompt_s == forecast.DEFAULT_PROMPT_S
