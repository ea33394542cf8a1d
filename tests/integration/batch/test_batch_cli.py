"""`stkpush batch` and `stkpush batch-status` over real parts: the ledger, the stack's Redis (messages counted on
the bulk queue), the CLI as users run it."""

from __future__ import annotations

import csv
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner, Result

from producers.batch import REFERENCE_REQUIRED, ingest_batch
from producers.batch.reading import AMOUNT_TEXT_RULE, NOT_UTF8
from tests.integration.batch.conftest import HEADER, payment_count, payments_with_references, queue_length
from worker import runtime
from worker.cli import main
from worker.ledger import BatchState, PaymentState, transition, utcnow
from worker.local.embedded_redis import free_port
from worker.local.stack import Stack

AMOUNT_RANGE = "must be between 1 and 150000 shillings"


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def rejects_of(path: Path) -> list[tuple[int, str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        assert next(reader) == ["line", "field", "rule"]
        return [(int(line), field, rule) for line, field, rule in reader]


def every_kind_of_bad_row(p: str) -> bytes:
    rows = [
        f"{p}1,0712345601,100,Amina",  # 2 good
        f"{p}2,0202123456,100,",  # 3 a landline
        f"{p}3,+255712345678,100,",  # 4 a Tanzanian number
        f"{p}4,07123,100,",  # 5 too short
        f"{p}5,0712345605,0,",  # 6 amount 0
        f"{p}6,0712345606,-5,",  # 7 negative
        f"{p}7,0712345607,10.5,",  # 8 fractional
        f"{p}8,0712345608,99999999999999999999999,",  # 9 huge
        f"{p}9,0712345609,abc,",  # 10 text
        f"{p}10,0712345610,,",  # 11 no amount
        f"{p}11,0712345611",  # 12 missing columns
        f"{p}1,0712345601,100,Amina",  # 13 the reference of line 2 again
        f"{p}13,0712345613,1e3,",  # 14 an exponent
        ",0712345614,50,",  # 15 no reference
        f"{p}16,abc,0,",  # 16 two bad fields
        f"{p}17,0712345617,250,Baraka",  # 17 good
        f"{p}18,+254 712 345 618,75,",  # 18 good, another common form
    ]
    text = (HEADER + "\n".join(rows) + "\n").encode()
    # 19: a name saved in Latin-1 inside a UTF-8 file
    return text + f"{p}19,0712345619,60,Ren".encode() + b"\xe9e\n"


def test_a_file_with_every_kind_of_bad_row_records_the_good_rows_and_names_each_bad_one(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    path = write_file("invoices.csv", every_kind_of_bad_row(prefix))
    queued_before = queue_length(batch_stack)

    result = run_cli("batch", str(path), "--json")

    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["state"] == "INGESTED"
    assert (report["rows_total"], report["rows_recorded"], report["rows_rejected"]) == (18, 3, 15)
    assert report["amount_requested"] == 100 + 250 + 75
    assert report["rows_queued"] == 3 and report["rows_not_queued"] == 0
    assert queue_length(batch_stack) == queued_before + 3
    rejects_path = Path(report["rejects_path"])
    assert rejects_path == path.with_name("invoices.csv.rejects.csv")
    phone_rule = "must be a Kenyan mobile number"
    expected = [
        (3, "phone_number", phone_rule),
        (4, "phone_number", phone_rule),
        (5, "phone_number", phone_rule),
        (6, "amount", AMOUNT_RANGE),
        (7, "amount", AMOUNT_RANGE),
        (8, "amount", AMOUNT_TEXT_RULE),
        (9, "amount", AMOUNT_RANGE),
        (10, "amount", AMOUNT_TEXT_RULE),
        (11, "amount", "is required"),
        (12, "amount", "is missing from this row"),
        (12, "customer_name", "is missing from this row"),
        (13, "external_reference", "repeats the external_reference of line 2"),
        (14, "amount", AMOUNT_TEXT_RULE),
        (15, "external_reference", REFERENCE_REQUIRED),
        (16, "amount", AMOUNT_RANGE),
        (16, "phone_number", phone_rule),
        (19, "customer_name", NOT_UTF8),
    ]
    found = rejects_of(rejects_path)
    assert [(line, field) for line, field, _ in found] == [(line, field) for line, field, _ in expected]
    for (_, _, rule), (line, _, part) in zip(found, expected, strict=True):
        assert part in rule, (line, rule)
    text = rejects_path.read_text()
    for phone in ("0202123456", "255712345678", "07123,", "0712345613", "0712345619"):
        assert phone not in text and phone not in result.output

    recorded = payments_with_references([f"{prefix}1", f"{prefix}17", f"{prefix}18"])
    assert sorted(p.external_reference for p in recorded) == sorted(
        [f"{prefix}1", f"{prefix}17", f"{prefix}18"]
    )
    assert {(p.queue, p.batch_id, p.state) for p in recorded} == {
        ("bulk", report["batch_id"], PaymentState.PENDING)
    }
    assert all(p.queued_at is not None for p in recorded)
    assert {p.phone for p in recorded} == {"254712345601", "254712345617", "254712345618"}
    assert payments_with_references([f"{prefix}{n}" for n in range(2, 17)] + [f"{prefix}19"]) == []


def test_running_the_same_file_again_adds_nothing_and_reports_what_it_skipped(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},{10 + n},\n" for n in range(1, 6))
    path = write_file("run.csv", HEADER + rows)
    first = run_cli("batch", str(path))
    assert first.exit_code == 0, first.output
    queued, total = queue_length(batch_stack), payment_count()

    again = run_cli("batch", str(path), "--json")

    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert (report["rows_recorded"], report["rows_skipped"], report["rows_queued"]) == (0, 5, 0)
    assert report["skipped_lines"] == [2, 3, 4, 5, 6]
    assert (queue_length(batch_stack), payment_count()) == (queued, total)
    human = run_cli("batch", str(path))
    assert (
        "skipped" in human.stdout
        and "already recorded with the same details (lines 2, 3, 4, 5, 6)" in human.stdout
    )


def test_a_rerun_that_reuses_a_reference_with_other_details_is_a_conflict_and_changes_nothing(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    path = write_file("first.csv", HEADER + f"{prefix}1,0712345601,100,\n{prefix}2,0712345602,200,Wanjiru\n")
    assert run_cli("batch", str(path)).exit_code == 0
    before = {
        p.external_reference: (p.amount, p.phone, p.customer_name)
        for p in payments_with_references([f"{prefix}1", f"{prefix}2"])
    }
    changed = write_file(
        "changed.csv", HEADER + f"{prefix}1,0712345601,100,\n{prefix}2,0712345699,250,Wanjiru\n"
    )
    queued = queue_length(batch_stack)

    result = run_cli("batch", str(changed), "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["rows_skipped"], report["rows_conflicting"], report["rows_recorded"]) == (1, 1, 0)
    assert rejects_of(Path(report["rejects_path"])) == [
        (3, "external_reference", "reference already used with different amount, phone_number")
    ]
    after = {
        p.external_reference: (p.amount, p.phone, p.customer_name)
        for p in payments_with_references([f"{prefix}1", f"{prefix}2"])
    }
    assert after == before and queue_length(batch_stack) == queued


def test_all_or_nothing_records_nothing_when_one_row_is_bad_and_everything_when_none_is(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    good = "".join(f"{prefix}{n},07123456{n:02d},{n * 10},\n" for n in range(1, 5))
    bad = write_file("bad.csv", HEADER + good + f"{prefix}9,0712345609,12.50,\n")
    queued, total = queue_length(batch_stack), payment_count()

    result = run_cli("batch", str(bad), "--all-or-nothing", "--json")

    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert (report["state"], report["rows_recorded"], report["rows_rejected"]) == ("ABORTED", 0, 1)
    assert rejects_of(Path(report["rejects_path"])) == [(6, "amount", AMOUNT_TEXT_RULE)]
    assert (queue_length(batch_stack), payment_count()) == (queued, total)

    fixed = write_file("fixed.csv", HEADER + good)
    result = run_cli("batch", str(fixed), "--all-or-nothing", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert (report["state"], report["rows_recorded"], report["rows_queued"]) == ("INGESTED", 4, 4)
    assert queue_length(batch_stack) == queued + 4
    assert len(payments_with_references([f"{prefix}{n}" for n in range(1, 5)])) == 4


def test_all_or_nothing_catches_a_reference_repeated_across_chunks(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},10,\n" for n in range(1, 6)) + f"{prefix}1,0712345601,10,\n"
    path = write_file("repeat.csv", HEADER + rows)
    total = payment_count()

    report = ingest_batch(path, all_or_nothing=True, chunk_rows=2, rejects_path=path.with_suffix(".rej"))

    assert report.state == BatchState.ABORTED and payment_count() == total
    assert rejects_of(path.with_suffix(".rej")) == [
        (7, "external_reference", "repeats the external_reference of an earlier row in this file")
    ]


def test_a_reference_repeated_in_a_later_chunk_is_rejected_once_recorded(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},10,\n" for n in range(1, 4)) + f"{prefix}2,0712345602,10,\n"
    path = write_file("later.csv", HEADER + rows)

    report = ingest_batch(path, chunk_rows=2, rejects_path=path.with_suffix(".rej"))

    assert (report.counts.rows_recorded, report.counts.rows_rejected) == (3, 1)
    assert rejects_of(path.with_suffix(".rej")) == [
        (5, "external_reference", "repeats the external_reference of an earlier row in this file")
    ]


def test_a_file_missing_a_required_column_is_refused_whole(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    path = write_file("nocol.csv", f"external_reference,phone_number\n{prefix}1,0712345601\n")
    total = payment_count()

    result = run_cli("batch", str(path), "--json")

    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["state"] == "FAILED" and "amount: column is missing from the header" in report["error"]
    assert rejects_of(Path(report["rejects_path"])) == [(1, "amount", "column is missing from the header")]
    assert payment_count() == total


def test_empty_files_and_files_in_another_encoding_are_refused(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    total, queued = payment_count(), queue_length(batch_stack)
    cases = {
        "empty.csv": (b"", "is empty"),
        "header-only.csv": (HEADER.encode(), "holds a header but no payment rows"),
        "blank.jsonl": (b"\n  \n", "is empty"),
        "utf16.csv": ((HEADER + f"{prefix}1,0712345601,10,\n").encode("utf-16"), NOT_UTF8),
    }
    for name, (content, error) in cases.items():
        result = run_cli("batch", str(write_file(name, content)), "--json")
        assert result.exit_code == 2, name
        report = json.loads(result.stdout)
        assert report["state"] == "FAILED" and error in report["error"], (name, report)
    assert (payment_count(), queue_length(batch_stack)) == (total, queued)


def test_json_lines_rows_are_checked_like_python_calls(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    lines = [
        json.dumps({"external_reference": f"{prefix}1", "phone_number": "0712345601", "amount": 40}),
        json.dumps({"external_reference": f"{prefix}2", "phone_number": "0712345602", "amount": "100"}),
        "{not json",
        "[1, 2]",
        "",
        json.dumps(
            {"external_reference": f"{prefix}3", "phone_number": "0712345603", "amount": 5, "amuont": 5}
        ),
        json.dumps({"phone_number": "0712345604", "amount": 5}),
        json.dumps({"external_reference": f"{prefix}5", "phone_number": "0712345605", "amount": 5.0}),
    ]
    path = write_file("rows.jsonl", "\n".join(lines) + "\n")

    result = run_cli("batch", str(path), "--json")

    report = json.loads(result.stdout)
    assert (report["rows_total"], report["rows_recorded"], report["rows_rejected"]) == (7, 1, 6)
    assert [(line, field) for line, field, _ in rejects_of(Path(report["rejects_path"]))] == [
        (2, "amount"),
        (3, "line"),
        (4, "line"),
        (6, "amuont"),
        (7, "external_reference"),
        (8, "amount"),
    ]


def test_batch_status_counts_states_money_and_why_payments_wait(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},{n * 100},\n" for n in range(1, 5))
    report = json.loads(run_cli("batch", str(write_file("s.csv", HEADER + rows)), "--json").stdout)
    by_reference = {
        p.external_reference: p for p in payments_with_references([f"{prefix}{n}" for n in range(1, 5)])
    }
    engine = runtime.engine()
    assert transition(engine, by_reference[f"{prefix}1"].id, [PaymentState.PENDING], PaymentState.SUCCEEDED)
    for n in (2, 3):
        assert transition(
            engine,
            by_reference[f"{prefix}{n}"].id,
            [PaymentState.PENDING],
            PaymentState.DEFERRED,
            reason="guard: phone-busy",
            next_attempt_at=utcnow(),
        )

    result = run_cli("batch-status", report["batch_id"], "--json")

    status = json.loads(result.stdout)
    assert status["state"] == "INGESTED" and status["rows_recorded"] == 4
    assert {k: v for k, v in status["payments_by_state"].items() if v} == {
        "SUCCEEDED": 1,
        "DEFERRED": 2,
        "PENDING": 1,
    }
    assert (status["amount_requested"], status["amount_collected"]) == (1000, 100)
    assert status["deferred_reasons"] == {"guard: phone-busy": 2}
    human = run_cli("batch-status", report["batch_id"]).stdout
    assert "money collected: KES 100" in human and "guard: phone-busy" in human
    assert run_cli("batch-status", "0" * 32).exit_code == 1


def test_when_redis_is_down_rows_are_recorded_and_reported_not_yet_queued(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},10,\n" for n in range(1, 4))
    path = write_file("down.csv", HEADER + rows)
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"

    finished = subprocess.run(
        [sys.executable, "-m", "worker.cli", "batch", str(path), "--json"],
        env=batch_stack.child_env({"REDIS_URL": dead_redis}),
        capture_output=True,
        timeout=60,
        check=False,
    )

    report = json.loads(finished.stdout)
    assert (report["state"], report["rows_recorded"], report["rows_queued"]) == ("INGESTED", 3, 0)
    assert report["rows_not_queued"] == 3
    payments = payments_with_references([f"{prefix}{n}" for n in range(1, 4)])
    assert {(p.state, p.queued_at) for p in payments} == {(PaymentState.PENDING, None)}
    status = json.loads(run_cli("batch-status", report["batch_id"], "--json").stdout)
    assert status["recorded_not_yet_queued"] == 3


def test_progress_is_plain_lines_without_a_terminal_and_a_bar_on_one(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},0712{n:06d},10,\n" for n in range(1, 2501))
    path = write_file("progress.csv", HEADER + rows)

    plain = run_cli("batch", str(path))

    progress_lines = [line for line in plain.stderr.splitlines() if "rows read" in line]
    assert len(progress_lines) >= 3 and "2500 rows read (100%)" in progress_lines[-1]
    assert "\r" not in plain.stderr

    leader, follower = pty.openpty()
    again = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "batch", str(path)],
        env=batch_stack.child_env(),
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            piece = os.read(leader, 65536)
        except OSError:  # the other side closed
            break
        if not piece:
            break
        output += piece
    assert again.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode(errors="replace")
    assert "\r" in text and "100%" in text and "[####" in text
    assert "skipped" in text and "2500" in text


def test_all_or_nothing_records_a_clean_file_of_many_chunks_and_queues_every_row(
    batch_stack: Stack, prefix: str, write_file: Callable[..., Path]
) -> None:
    rows = "".join(f"{prefix}{n},07123456{n:02d},{n + 1},\n" for n in range(7))
    path = write_file("chunks.csv", HEADER + rows)
    queued = queue_length(batch_stack)
    phases: list[str] = []

    report = ingest_batch(
        path, all_or_nothing=True, chunk_rows=2, on_progress=lambda phase, *_: phases.append(phase)
    )

    assert (report.state, report.counts.rows_recorded, report.counts.rows_queued) == (
        BatchState.INGESTED,
        7,
        7,
    )
    assert report.counts.amount_requested == sum(range(1, 8)) and report.counts.rows_total == 7
    assert phases == ["checking"] * 4 + ["recording"] * 4
    assert queue_length(batch_stack) == queued + 7
    assert len(payments_with_references([f"{prefix}{n}" for n in range(7)])) == 7
