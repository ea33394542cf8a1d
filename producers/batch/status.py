"""What a batch looks like now: its record, its payments by state, money requested and collected, why rows wait."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlmodel import col

from worker import forecast, runtime
from worker.ledger import Batch, BatchState, Payment, PaymentState, session_scope


def batch_status(batch_id: str, account: str | None = None) -> dict[str, Any] | None:
    """The batch record with its payments counted by state, money requested and collected, and why payments
    wait (DEFERRED reasons); None when `account` (None: the environment's) has no such batch."""
    engine = runtime.engine()
    with session_scope(engine) as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.account != (account or runtime.settings().upesipay_account):
        return None
    with engine.connect() as connection:
        by_state = {state.value: 0 for state in PaymentState}
        requested = collected = 0
        for state, count, amount in connection.execute(
            select(col(Payment.state), func.count(), func.coalesce(func.sum(col(Payment.amount)), 0))
            .where(col(Payment.batch_id) == batch_id)
            .group_by(Payment.state)
        ):
            by_state[PaymentState(state).value] = int(count)
            requested += int(amount)
            if PaymentState(state) == PaymentState.SUCCEEDED:
                collected = int(amount)
        deferred = {
            str(reason or "unspecified"): int(count)
            for reason, count in connection.execute(
                select(col(Payment.reason), func.count())
                .where(col(Payment.batch_id) == batch_id, col(Payment.state) == PaymentState.DEFERRED)
                .group_by(Payment.reason)
            )
        }
        not_queued = connection.execute(
            select(func.count()).where(
                col(Payment.batch_id) == batch_id,
                col(Payment.state) == PaymentState.PENDING,
                col(Payment.queued_at).is_(None),
            )
        ).scalar_one()
    return {
        "batch_id": batch.id,
        "source_name": batch.source_name,
        "state": BatchState(batch.state).value,
        "all_or_nothing": batch.all_or_nothing,
        "rows_total": batch.rows_total,
        "rows_recorded": batch.rows_recorded,
        "rows_rejected": batch.rows_rejected,
        "rows_skipped": batch.rows_skipped,
        "rows_conflicting": batch.rows_conflicting,
        "payments_by_state": by_state,
        "recorded_not_yet_queued": int(not_queued),
        "amount_requested": requested,
        "amount_collected": collected,
        "deferred_reasons": deferred,
        "rejects_path": batch.rejects_path,
        "error": batch.error,
        "created_at": batch.created_at.isoformat(),
        "finished_at": batch.finished_at.isoformat() if batch.finished_at else None,
        "paused": batch.paused_at is not None,
        "paused_at": batch.paused_at.isoformat() if batch.paused_at else None,
        "pause_reason": batch.pause_reason,
        "resumed_at": batch.resumed_at.isoformat() if batch.resumed_at else None,
        "reprompt": batch.reprompt_max,
        "reprompt_after_s": batch.reprompt_after_s,
        "forecast": _forecast(batch.id),
    }


def _forecast(batch_id: str) -> dict[str, Any] | None:
    """The batch's estimated finish and the account's failure budget (worker/forecast.py)."""
    eta = forecast.batch_forecast(runtime.engine(), batch_id, runtime.settings())
    if eta is None:
        return None
    budget = forecast.budget_forecast(runtime.engine(), eta.account, runtime.settings_of(eta.account))
    return {**eta.as_dict(), "budget": budget.as_dict()}
