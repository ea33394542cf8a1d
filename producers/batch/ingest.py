"""Bulk invoice batches: stream a CSV or JSON Lines file, validate every row with the one schema, record the good
rows in bulk, publish them in bulk on the `bulk` queue, and write every bad row to a rejects file.

The file is read a chunk of rows at a time (`CHUNK_ROWS`): memory holds one chunk, whatever the file's length.
For each chunk: one SELECT finds references already recorded (same details: skipped; other details: a conflict;
recorded by this very batch: a duplicate inside the file), one multi-row INSERT ... ON CONFLICT DO NOTHING records
the rest (a concurrent writer that wins a race is then judged like an existing row), and one Redis pipeline
publishes their stk_push messages. Running the same file again therefore records nothing twice.

`all_or_nothing` takes two passes: the first reads the file, writes nothing to the ledger, finds every bad row and
spools the validated rows to a temporary file; only when no row is bad are the spooled rows recorded, in one
transaction, and published after its commit. A bad file never takes the write lock, and a clean one holds it
only while its rows are inserted.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import Connection, Engine, func, select, update
from sqlmodel import col

from producers.batch.publish import publish_bulk
from producers.batch.reading import (
    BatchFileError,
    FileFormat,
    FileRow,
    ReadProgress,
    format_for_name,
    read_rows,
)
from producers.batch.rejects import RejectsFile
from producers.batch.report import BatchCounts, BatchReport
from producers.enqueue import differing_fields, resolve_account
from producers.validation import FieldError, PaymentRequest, PaymentValidationError, validate_payment
from worker import reprompts, runtime
from worker.ledger import (
    Batch,
    BatchState,
    Payment,
    PaymentState,
    insert_ignoring_conflicts,
    new_payment_id,
    session_scope,
    utcnow,
)
from worker.scoring import scores_for

log = logging.getLogger("stkpush.batch")

# Rows per transaction, per existing-reference SELECT and per Redis pipeline: large enough that per-statement
# and per-round-trip costs vanish, small enough that SQLite's write lock is held for well under a second and a
# chunk's parameters stay far below the database's bind-parameter limits.
CHUNK_ROWS = 1000
# How many skipped line numbers a report lists (the count is always exact).
SKIPPED_LINES_SHOWN = 10
REFERENCE_REQUIRED = "is required in a batch file (it is what makes running the file again safe)"


class _Mode(Enum):
    CHECK = "checking"  # all-or-nothing, first pass: judge every row, write nothing
    ATOMIC = "recording"  # all-or-nothing, second pass: one transaction, publish after commit
    CHUNKED = "recording and queueing"  # commit and publish chunk by chunk


ProgressCallback = Callable[[str, ReadProgress, BatchCounts], None]


@dataclass(frozen=True)
class _Recorded:
    """The columns of an already recorded payment that judging a row needs. Building full Payment objects
    instead costs ~0.5 ms each (SQLModel's validation machinery): a re-run of a big file would crawl."""

    id: str
    external_reference: str
    amount: int
    phone: str
    customer_name: str | None
    channel_id: int
    batch_id: str | None
    state: str
    queued_at: datetime | None


@dataclass
class _Candidate:
    line: int
    request: PaymentRequest
    reference: str
    channel_id: int

    def to_spool(self) -> bytes:
        r = self.request
        return (
            json.dumps(
                [self.line, r.amount, r.phone, self.reference, r.customer_name, self.channel_id]
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_spool(cls, line: bytes) -> _Candidate:
        number, amount, phone, reference, name, channel = json.loads(line)
        return cls(number, PaymentRequest(amount, phone, reference, name, channel), reference, channel)


@dataclass
class _Pass:
    """One read of the file: what it counted, and the first lines it skipped."""

    mode: _Mode
    counts: BatchCounts = field(default_factory=BatchCounts)
    skipped_lines: list[int] = field(default_factory=list)
    spooled: int = 0  # all-or-nothing: rows the first pass validated and kept for the second
    bytes_read: int = 0


def open_batch(
    source_name: str,
    *,
    all_or_nothing: bool = False,
    account: str | None = None,
    reprompt: int = 0,
    reprompt_after_s: int | None = None,
) -> str:
    """Record a new batch (INGESTING) of `account` (None: the environment's) and return its id;
    ingest_batch(batch_id=...) fills it. PaymentValidationError naming `account` when it can't be used.
    `reprompt` further prompts, each at least `reprompt_after_s` after the last (worker/reprompts.py;
    RepromptError if invalid)."""
    reprompt, reprompt_after_s = reprompts.check(reprompt, reprompt_after_s)
    batch = Batch(
        account=resolve_account(account).name,
        source_name=Path(source_name).name[:255] or "batch",
        all_or_nothing=all_or_nothing,
        reprompt_max=reprompt,
        reprompt_after_s=reprompt_after_s,
    )
    with session_scope(runtime.engine()) as session:
        session.add(batch)
        session.commit()
    return batch.id


def ingest_batch(
    source: str | Path | IO[bytes],
    *,
    file_format: FileFormat | str | None = None,
    source_name: str | None = None,
    all_or_nothing: bool = False,
    rejects_path: str | Path | None = None,
    batch_id: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    on_progress: ProgressCallback | None = None,
    account: str | None = None,
    reprompt: int = 0,
    reprompt_after_s: int | None = None,
) -> BatchReport:
    """Ingest one bulk invoice file; see the module docstring. Never raises for bad rows or an unusable file:
    the report (and the batch record) say what happened. `account` (None: the environment's) is the new batch's
    account (raises PaymentValidationError when it can't be used); a given batch_id keeps its batch's."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    name = source_name or (str(source) if isinstance(source, str | Path) else "batch")
    if file_format is None:
        file_format = format_for_name(name)
        if file_format is None:
            raise ValueError("cannot tell the file's format from its name: give file_format (csv or jsonl)")
    fmt = FileFormat(file_format)
    if batch_id is None:
        batch_id = open_batch(
            name,
            all_or_nothing=all_or_nothing,
            account=account,
            reprompt=reprompt,
            reprompt_after_s=reprompt_after_s,
        )
    ingestion = _Ingestion(
        batch_id=batch_id,
        file_format=fmt,
        rejects=RejectsFile(Path(rejects_path) if rejects_path is not None else None),
        chunk_rows=chunk_rows,
        on_progress=on_progress,
    )
    if isinstance(source, str | Path):
        with open(source, "rb") as stream:
            return ingestion.run(stream, all_or_nothing=all_or_nothing)
    return ingestion.run(source, all_or_nothing=all_or_nothing)


class _Ingestion:
    def __init__(
        self,
        *,
        batch_id: str,
        file_format: FileFormat,
        rejects: RejectsFile,
        chunk_rows: int,
        on_progress: ProgressCallback | None,
    ) -> None:
        settings = runtime.settings()
        self.engine: Engine = runtime.engine()
        with session_scope(self.engine) as session:
            batch = session.get(Batch, batch_id)
        # The batch's account decides the rows' account and default channel.
        self.config = runtime.account(batch.account if batch is not None else None)
        self.account = self.config.name
        self.default_channel = self.config.default_channel
        self.amount_min, self.amount_max = settings.amount_min, settings.amount_max
        self.batch_id = batch_id
        self.file_format = file_format
        self.rejects = rejects
        self.chunk_rows = chunk_rows
        self.on_progress = on_progress
        self.broker_down = False

    # ---- the whole file -----------------------------------------------------------------------------------
    def run(self, stream: IO[bytes], *, all_or_nothing: bool) -> BatchReport:
        try:
            if all_or_nothing:
                return self._run_all_or_nothing(stream)
            result = self._read_file(stream, _Mode.CHUNKED)
            return self._finish(result, BatchState.INGESTED)
        except BatchFileError as error:
            for problem in error.problems:
                self.rejects.add(problem.line, problem.error)
            return self._finish(
                _Pass(_Mode.CHUNKED), BatchState.FAILED, error=f"unusable file: {error}"[:500]
            )
        except KeyboardInterrupt:
            self._finish(_Pass(_Mode.CHUNKED), BatchState.FAILED, error="interrupted", counted=False)
            raise
        except Exception as error:
            # The message of a database error carries the statement's parameters (phone numbers): name the type.
            log.error("batch %s stopped: %s", self.batch_id, type(error).__name__)
            return self._finish(
                _Pass(_Mode.CHUNKED),
                BatchState.FAILED,
                error=f"stopped: {type(error).__name__}",
                counted=False,
            )

    def _run_all_or_nothing(self, stream: IO[bytes]) -> BatchReport:
        with tempfile.TemporaryFile() as spool:
            check = self._read_file(stream, _Mode.CHECK, spool=spool)
            if check.counts.bad_rows:
                return self._finish(check, BatchState.ABORTED, recorded=False)
            spool.seek(0)
            with self.engine.connect() as connection:
                # Take the write lock first: on SQLite a transaction that reads and then writes can be refused
                # outright (a snapshot conflict) where one that starts by writing simply waits its turn. The
                # rows come validated from the spool, so the lock is held only for the inserts.
                connection.execute(update(Batch).where(col(Batch.id) == self.batch_id).values(rows_total=0))
                result = _Pass(_Mode.ATOMIC)
                self._process(self._spooled_chunks(spool, check), result, connection)
                result.counts.rows_total = check.counts.rows_total
                if result.counts.bad_rows:  # a duplicate across chunks, or a writer that raced us
                    connection.rollback()
                    return self._finish(result, BatchState.ABORTED, recorded=False)
                connection.commit()
        self._publish_recorded(result)
        return self._finish(result, BatchState.INGESTED)

    def _read_file(self, stream: IO[bytes], mode: _Mode, *, spool: IO[bytes] | None = None) -> _Pass:
        result = _Pass(mode)
        self._process(self._file_chunks(stream, result), result, None, spool=spool)
        return result

    def _file_chunks(
        self, stream: IO[bytes], result: _Pass
    ) -> Iterator[tuple[list[_Candidate], ReadProgress]]:
        """The file's rows a chunk at a time, each row judged by the schema (bad rows rejected on the way)."""
        progress = ReadProgress()
        rows = read_rows(stream, self.file_format, progress)
        while chunk := list(islice(rows, self.chunk_rows)):
            candidates = [c for c in (self._judge_safely(row, result) for row in chunk) if c is not None]
            result.counts.rows_total = progress.rows_read
            yield candidates, progress

    def _spooled_chunks(
        self, spool: IO[bytes], check: _Pass
    ) -> Iterator[tuple[list[_Candidate], ReadProgress]]:
        """Rows the first pass validated, back from the spool (progress shown against the file's size)."""
        progress = ReadProgress()
        lines = iter(spool)
        while chunk := list(islice(lines, self.chunk_rows)):
            candidates = [_Candidate.from_spool(line) for line in chunk]
            progress.rows_read += len(candidates)
            progress.bytes_read = check.bytes_read * progress.rows_read // max(check.spooled, 1)
            yield candidates, progress

    def _process(
        self,
        chunks: Iterator[tuple[list[_Candidate], ReadProgress]],
        result: _Pass,
        connection: Connection | None,
        *,
        spool: IO[bytes] | None = None,
    ) -> None:
        for candidates, progress in chunks:
            if result.mode is _Mode.CHUNKED:
                with self.engine.connect() as chunk_connection:
                    ids = self._record(chunk_connection, candidates, result)
                    self._save_counts(chunk_connection, result.counts)
                    chunk_connection.commit()
                self._publish(ids, result.counts)
            elif result.mode is _Mode.ATOMIC:
                assert connection is not None
                self._record(connection, candidates, result)
            else:
                fresh = self._check(candidates, result)
                if spool is not None:
                    spool.writelines(candidate.to_spool() for candidate in fresh)
                    result.spooled += len(fresh)
                result.bytes_read = progress.bytes_read
            self.rejects.flush()
            if self.on_progress is not None:
                self.on_progress(result.mode.value, progress, result.counts)

    # ---- one row ------------------------------------------------------------------------------------------
    def _judge_safely(self, row: FileRow, result: _Pass) -> _Candidate | None:
        """One row's judgement; a row that breaks the judging itself is that row's reject, not the batch's end."""
        try:
            return self._judge(row, result)
        except Exception as error:
            log.error(
                "batch %s: line %d could not be judged: %s", self.batch_id, row.line, type(error).__name__
            )
            self._reject(row.line, [FieldError("row", "could not be read as a payment")], result)
            return None

    def _judge(self, row: FileRow, result: _Pass) -> _Candidate | None:
        errors = list(row.errors)
        # A line that could not be read into fields at all (not JSON, not UTF-8, too long) has nothing to validate.
        if errors and not row.fields:
            self._reject(row.line, errors, result)
            return None
        reported = {error.field for error in errors}
        request: PaymentRequest | None = None
        try:
            request = validate_payment(row.fields, amount_min=self.amount_min, amount_max=self.amount_max)
        except PaymentValidationError as error:
            errors.extend(e for e in error.errors if e.field not in reported)
        reference_given = (
            request.external_reference is not None
            if request is not None
            else _value_given(row.fields.get("external_reference"))
        )
        if not reference_given and all(error.field != "external_reference" for error in errors):
            errors.append(FieldError("external_reference", REFERENCE_REQUIRED))
        if errors or request is None or request.external_reference is None:
            self._reject(row.line, errors, result)
            return None
        channel = request.channel_id or self.default_channel
        if not self.config.allows_channel(channel):
            self._reject(
                row.line, [FieldError("channel_id", "must be one of the account's channel ids")], result
            )
            return None
        return _Candidate(row.line, request, request.external_reference, channel)

    def _reject(self, line: int, errors: list[FieldError], result: _Pass, *, conflict: bool = False) -> None:
        for error in errors:
            self.rejects.add(line, error)
        if conflict:
            result.counts.rows_conflicting += 1
        else:
            result.counts.rows_rejected += 1

    def _skip(self, candidate: _Candidate, result: _Pass) -> None:
        result.counts.rows_skipped += 1
        if len(result.skipped_lines) < SKIPPED_LINES_SHOWN:
            result.skipped_lines.append(candidate.line)

    # ---- one chunk ----------------------------------------------------------------------------------------
    def _fresh(self, candidates: list[_Candidate], result: _Pass) -> list[_Candidate]:
        """Drop duplicates inside the chunk (rejected, naming the first line)."""
        first_line: dict[str, int] = {}
        fresh = []
        for candidate in candidates:
            earlier = first_line.get(candidate.reference)
            if earlier is not None:
                rule = f"repeats the external_reference of line {earlier}"
                self._reject(candidate.line, [FieldError("external_reference", rule)], result)
                continue
            first_line[candidate.reference] = candidate.line
            fresh.append(candidate)
        return fresh

    def _existing(self, connection: Connection, references: list[str]) -> dict[str, _Recorded]:
        if not references:
            return {}
        rows = connection.execute(
            select(
                col(Payment.id),
                col(Payment.external_reference),
                col(Payment.amount),
                col(Payment.phone),
                col(Payment.customer_name),
                col(Payment.channel_id),
                col(Payment.batch_id),
                col(Payment.state),
                col(Payment.queued_at),
            ).where(col(Payment.account) == self.account, col(Payment.external_reference).in_(references))
        ).all()
        return {row.external_reference: _Recorded(**row._asdict()) for row in rows}

    def _judge_existing(self, candidate: _Candidate, existing: _Recorded, result: _Pass) -> str | None:
        """Skip or reject a row whose reference is already recorded; the id to publish again, if any."""
        if existing.batch_id == self.batch_id:
            rule = "repeats the external_reference of an earlier row in this file"
            self._reject(candidate.line, [FieldError("external_reference", rule)], result)
            return None
        # The one comparison enqueue_payment uses; it reads only amount, phone, customer_name and channel_id.
        differences = differing_fields(cast(Payment, existing), candidate.request, candidate.channel_id)
        if differences:
            rule = "reference already used with different " + ", ".join(differences)
            self._reject(candidate.line, [FieldError("external_reference", rule)], result, conflict=True)
            return None
        self._skip(candidate, result)
        # Recorded by an earlier run that could not queue it: this run finishes the job (a duplicate message is
        # harmless, the task's claim is conditional).
        if existing.state == PaymentState.PENDING and existing.queued_at is None:
            return existing.id
        return None

    def _check(self, candidates: list[_Candidate], result: _Pass) -> list[_Candidate]:
        """Judge the chunk against the ledger without writing; the rows that survive the duplicate check."""
        fresh = self._fresh(candidates, result)
        with self.engine.connect() as connection:
            existing = self._existing(connection, [c.reference for c in fresh])
        for candidate in fresh:
            if candidate.reference in existing:
                self._judge_existing(candidate, existing[candidate.reference], result)
        return fresh

    def _record(self, connection: Connection, candidates: list[_Candidate], result: _Pass) -> list[str]:
        """Record the chunk's new rows; return the ids to publish (new rows and unqueued skipped rows)."""
        fresh = self._fresh(candidates, result)
        existing = self._existing(connection, [c.reference for c in fresh])
        to_publish: list[str] = []
        new = []
        for candidate in fresh:
            if candidate.reference in existing:
                again = self._judge_existing(candidate, existing[candidate.reference], result)
                if again is not None and result.mode is _Mode.CHUNKED:
                    to_publish.append(again)
            else:
                new.append(candidate)
        if not new:
            return to_publish
        inserted = self._insert(connection, new)
        result.counts.rows_recorded += len(inserted)
        lost = []
        for candidate in new:
            payment_id = inserted.get(candidate.reference)
            if payment_id is None:
                lost.append(candidate)
            else:
                result.counts.amount_requested += candidate.request.amount
                to_publish.append(payment_id)
        if lost:  # another writer recorded these references between our SELECT and our INSERT
            raced = self._existing(connection, [c.reference for c in lost])
            for candidate in lost:
                again = self._judge_existing(candidate, raced[candidate.reference], result)
                if again is not None and result.mode is _Mode.CHUNKED:
                    to_publish.append(again)
        return to_publish

    def _insert(self, connection: Connection, new: list[_Candidate]) -> dict[str, str]:
        now = utcnow()
        # Each row's release order under BULK_ORDER=score: its number's history, read in the chunk's transaction.
        scores = scores_for(connection, self.account, [c.request.phone for c in new], now)
        rows = [
            {
                "id": new_payment_id(),
                "account": self.account,
                "external_reference": c.reference,
                "phone": c.request.phone,
                "amount": c.request.amount,
                "customer_name": c.request.customer_name,
                "channel_id": c.channel_id,
                "queue": "bulk",
                "batch_id": self.batch_id,
                "state": PaymentState.PENDING,
                "attempts": 0,
                "score": scores[c.request.phone],
                "created_at": now,
                "updated_at": now,
            }
            for c in new
        ]
        table = Payment.metadata.tables[Payment.__tablename__]
        statement = insert_ignoring_conflicts(connection, table, ["account", "external_reference"]).returning(
            table.c.external_reference, table.c.id
        )
        return {reference: payment_id for reference, payment_id in connection.execute(statement, rows)}

    def _save_counts(self, connection: Connection, counts: BatchCounts, **extra: Any) -> None:
        values = {
            "rows_total": counts.rows_total,
            "rows_recorded": counts.rows_recorded,
            "rows_rejected": counts.rows_rejected,
            "rows_skipped": counts.rows_skipped,
            "rows_conflicting": counts.rows_conflicting,
            "amount_requested": counts.amount_requested,
            **extra,
        }
        connection.execute(update(Batch).where(col(Batch.id) == self.batch_id).values(**values))

    # ---- publishing ---------------------------------------------------------------------------------------
    def _publish(self, ids: list[str], counts: BatchCounts) -> None:
        if not ids or self.broker_down:
            return
        published = publish_bulk(ids)
        if published == 0:
            # Every later chunk would wait for the same dead broker: stop trying; the dispatcher queues the
            # recorded rows (PENDING, queued_at NULL) once Redis is back.
            self.broker_down = True
            log.warning(
                "batch %s: broker unavailable, recorded rows will be queued by the dispatcher", self.batch_id
            )
            return
        counts.rows_queued += published

    def _publish_recorded(self, result: _Pass) -> None:
        """After an all-or-nothing commit: publish this batch's rows, a chunk at a time, in id order."""
        last = ""
        while not self.broker_down:
            with self.engine.connect() as connection:
                ids = list(
                    connection.execute(
                        select(col(Payment.id))
                        .where(col(Payment.batch_id) == self.batch_id, col(Payment.queued_at).is_(None))
                        .where(col(Payment.id) > last)
                        .order_by(col(Payment.id))
                        .limit(self.chunk_rows)
                    ).scalars()
                )
            if not ids:
                return
            self._publish(ids, result.counts)
            last = ids[-1]

    # ---- the end ------------------------------------------------------------------------------------------
    def _finish(
        self,
        result: _Pass,
        state: BatchState,
        *,
        error: str | None = None,
        recorded: bool = True,
        counted: bool = True,
    ) -> BatchReport:
        """Close the batch record. `recorded=False`: the pass's rows were rolled back (or never written);
        `counted=False`: the pass stopped midway, so the record keeps the counts of the chunks it committed."""
        counts = result.counts
        if not recorded:
            counts.rows_recorded = counts.amount_requested = counts.rows_queued = 0
        self.rejects.close()
        rejects_path = str(self.rejects.path) if self.rejects.written and self.rejects.path else None
        closing = {"state": state, "error": error, "rejects_path": rejects_path, "finished_at": utcnow()}
        with self.engine.connect() as connection:
            if counted:
                self._save_counts(connection, counts, **closing)
            else:
                connection.execute(update(Batch).where(col(Batch.id) == self.batch_id).values(**closing))
                saved = connection.execute(select(Batch).where(col(Batch.id) == self.batch_id)).one()
                counts = BatchCounts(
                    rows_total=saved.rows_total,
                    rows_recorded=saved.rows_recorded,
                    rows_rejected=saved.rows_rejected,
                    rows_skipped=saved.rows_skipped,
                    rows_conflicting=saved.rows_conflicting,
                    amount_requested=saved.amount_requested,
                )
            connection.commit()
        not_queued = self._not_queued()
        if not counted:
            counts.rows_queued = max(counts.rows_recorded - not_queued, 0)
        log.info(
            "batch %s %s: %d rows, %d recorded, %d skipped, %d rejected, %d conflicting, %d not yet queued",
            self.batch_id,
            state.value,
            counts.rows_total,
            counts.rows_recorded,
            counts.rows_skipped,
            counts.rows_rejected,
            counts.rows_conflicting,
            not_queued,
        )
        return BatchReport(
            self.batch_id, state, counts, rejects_path, error, tuple(result.skipped_lines), not_queued
        )

    def _not_queued(self) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    select(func.count()).where(
                        col(Payment.batch_id) == self.batch_id,
                        col(Payment.state) == PaymentState.PENDING,
                        col(Payment.queued_at).is_(None),
                    )
                ).scalar_one()
            )


def _value_given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
