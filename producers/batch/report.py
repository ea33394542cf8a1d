"""What one ingestion did: the counts and the report ingest_batch returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.ledger import BatchState


@dataclass
class BatchCounts:
    rows_total: int = 0
    rows_recorded: int = 0
    rows_rejected: int = 0  # bad rows (listed in the rejects file)
    rows_skipped: int = 0  # already recorded with the same details
    rows_conflicting: int = 0  # reference already used with other details (listed in the rejects file)
    amount_requested: int = 0
    rows_queued: int = 0  # stk_push messages published by this run

    @property
    def bad_rows(self) -> int:
        return self.rows_rejected + self.rows_conflicting


@dataclass(frozen=True)
class BatchReport:
    """What one ingestion did."""

    batch_id: str
    state: BatchState
    counts: BatchCounts
    rejects_path: str | None
    error: str | None = None
    skipped_lines: tuple[int, ...] = ()  # the first few, for the operator
    not_queued: int = 0  # this batch's rows recorded but not (yet) on the broker: the dispatcher queues them

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "state": self.state.value,
            **asdict(self.counts),
            "rows_not_queued": self.not_queued,
            "rejects_path": self.rejects_path,
            "error": self.error,
            "skipped_lines": list(self.skipped_lines),
        }
