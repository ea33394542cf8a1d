"""The bulk lane's release order, as one policy object (`BULK_ORDER`, docs/batches.md "Release order").

Within a batch's turn (worker.bulk_turns, worker.dispatch._bulk_turns: which batch goes next is unchanged), the
waiting rows go out
- `score`: likeliest payer first (Payment.score, worker/scoring.py; every batch row has one: ingestion sets it and
  the migration gave rows of older batches the score of a number without history), ties oldest first;
- `fifo`: in the order they became due, then oldest first (the order before issue 13).
The order decides only which admissible row is asked for next: the guard still admits or refuses every send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlmodel import col

from worker import runtime
from worker.guard import RefusalReason
from worker.ledger import Payment, PaymentState

__all__ = ["BulkOrder", "current"]


@dataclass(frozen=True, slots=True)
class BulkOrder:
    name: Literal["fifo", "score"]

    def waiting(self) -> tuple[Any, ...]:
        """ORDER BY for waiting (DEFERRED, due) rows of one batch."""
        if self.name == "score":
            # ix_payment_batch_order gives the scores in order; only rows of one score are sorted by age.
            return (col(Payment.score).desc(), col(Payment.created_at))
        return (col(Payment.next_attempt_at), col(Payment.created_at))

    def pending(self) -> tuple[Any, ...]:
        """ORDER BY for PENDING rows of one batch (a bulk message's turn)."""
        if self.name == "score":
            return self.waiting()
        return (col(Payment.created_at),)

    def releasable(self, due: Any) -> Any:
        """Which DEFERRED batch rows the dispatcher may release now: the due ones, and also those waiting only for
        the bulk lane or the budget, under either order. Their due time is only a retry hint (30 s when the lane
        was full of sends in flight), while the lane may have room again at the next tick, once a failure slides
        out of the window (no resolve comes then to release a row). The dispatcher releases within the lane's
        headroom only, in this order's `waiting()` order, so a better (or older) row is not overtaken by a worse
        one that happens to be due."""
        reasons = [
            f"guard: {reason.value}"
            for reason in (RefusalReason.BULK_LANE_FULL, RefusalReason.ACCOUNT_BUDGET)
        ]
        return due | ((col(Payment.state) == PaymentState.DEFERRED) & col(Payment.reason).in_(reasons))

    @property
    def by_score(self) -> bool:
        return self.name == "score"


def current() -> BulkOrder:
    return BulkOrder(runtime.settings().bulk_order)
