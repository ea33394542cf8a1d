"""The catalogue of hostile inputs for batch files: `POST /batches` and `stkpush batch` (real files).

A bad line is that line's reject (line, field, rule); the good lines are recorded and queued. For every case:
exactly those rows recorded and queued, a rejects file a spreadsheet can open inertly, and no unmasked phone or
name in the answers, the rejects file, the CLI's output or the web process's log. Add a row for each new case.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hostile.conftest import (
    NAME,
    PHONE,
    assert_no_personal_data,
    ledger_state,
    payments_of_batch,
    reference,
)
from tests.support import api_key, wait_for_batch
from worker.local.stack import Stack

DEEP = 5_000  # far deeper than Python's JSON parser recurses


# ---- batch files: POST /batches and `stkpush batch` -----------------------------------------------------------
@dataclass(frozen=True)
class BatchCase:
    name: str
    file_format: str  # csv or jsonl
    make_content: Callable[[], str]
    state: str  # the batch's end state
    rejects: set[tuple[int, str]]  # (line, field)
    good_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def jsonl(*rows: Any) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def good(**changes: Any) -> dict[str, Any]:
    return {
        "external_reference": reference(),
        "phone_number": PHONE,
        "amount": 10,
        "customer_name": NAME,
    } | changes


HEADER = "external_reference,phone_number,amount,customer_name"
BATCH_CASES = [
    BatchCase(
        "csv-without-header",
        "csv",
        lambda: f"{reference()},{PHONE},100,{NAME}\n{reference()},{PHONE},200,{NAME}\n",
        "FAILED",
        {(1, "header")},
    ),
    BatchCase(
        "csv-channel-id-overflow",
        "csv",
        lambda: (
            f"{HEADER},channel_id\n{reference()},{PHONE},100,{NAME},99999999999999999999\n"
            f"{reference()},{PHONE},100,{NAME},2133\n"
        ),
        "INGESTED",
        {(2, "channel_id")},
        good_rows=1,
    ),
    BatchCase(
        "csv-formula-header-cell",
        "csv",
        lambda: f"{HEADER},=cmd|' /C calc'!A0\n{reference()},{PHONE},100,{NAME},x\n",
        "FAILED",
        {(1, "column 5")},
    ),
    BatchCase(
        "csv-phone-as-header-cell",
        "csv",
        lambda: f"external_reference,phone_number,amount,{PHONE}\n{reference()},{PHONE},100,x\n",
        "FAILED",
        {(1, "column 4")},
    ),
    BatchCase(
        "csv-control-bytes-in-header-cell",
        "csv",
        lambda: f"{HEADER},\x1b[31mred\x07\n{reference()},{PHONE},100,{NAME},x\n",
        "FAILED",
        {(1, "column 5")},
    ),
    BatchCase(
        "csv-reference-with-nul",
        "csv",
        lambda: f"{HEADER}\nINV\x00009,{PHONE},100,{NAME}\n{reference()},{PHONE},100,{NAME}\n",
        "INGESTED",
        {(2, "external_reference")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-nested-5000-deep",
        "jsonl",
        lambda: jsonl(good(), '{"a":' * DEEP + "1" + "}" * DEEP, good()),
        "INGESTED",
        {(2, "line")},
        good_rows=2,
    ),
    BatchCase(
        "jsonl-formula-keys",
        "jsonl",
        lambda: jsonl(
            good(**{'=HYPERLINK("http://x","y")': 1}),
            good(**{"+1+1": 1}),
            good(**{"-2+3": 1}),
            good(**{"@SUM(A1)": 1}),
            good(),
        ),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)"), (3, "(unnamed field)"), (4, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-personal-data-as-keys",
        "jsonl",
        lambda: jsonl(good(**{PHONE: 1}), good(**{NAME: 1}), good()),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-control-bytes-in-keys",
        "jsonl",
        lambda: jsonl(good(**{"amount\x07": 1}), good(**{"\x1b[2J": 1}), good()),
        "INGESTED",
        {(1, "(unnamed field)"), (2, "(unnamed field)")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-references-with-control-characters",
        "jsonl",
        lambda: jsonl(good(external_reference="INV\n009"), good(external_reference="INV\x00009"), good()),
        "INGESTED",
        {(1, "external_reference"), (2, "external_reference")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-huge-integers",
        "jsonl",
        lambda: jsonl(good(channel_id=2**63), good(amount=2**63), good()),
        "INGESTED",
        {(1, "channel_id"), (2, "amount")},
        good_rows=1,
    ),
    BatchCase(
        "jsonl-receipt-shaped-objects",
        "jsonl",
        lambda: jsonl(good(customer_name={"name": NAME}), good(phone_number=[PHONE]), good()),
        "INGESTED",
        {(1, "customer_name"), (2, "phone_number")},
        good_rows=1,
    ),
]
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def assert_rejects_file_is_inert(text: str, expected: set[tuple[int, str]]) -> None:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["line", "field", "rule"]
    assert {(int(line), field_name) for line, field_name, _rule in rows[1:]} == expected
    for row in rows[1:]:
        for cell in row:
            assert not cell.startswith(FORMULA_STARTS), f"a formula cell in the rejects file: {cell!r}"
            assert cell.isprintable(), f"a control character in the rejects file: {cell!r}"
    assert_no_personal_data(text)


@pytest.mark.parametrize("case", BATCH_CASES, ids=[case.name for case in BATCH_CASES])
def test_post_batches_rejects_each_bad_line_by_line_and_field_and_records_the_good_ones(
    hostile_stack: Stack, case: BatchCase
) -> None:
    before = ledger_state(hostile_stack)
    log_offset = len(hostile_stack.log_text("web"))
    accepted = httpx.post(
        f"{hostile_stack.web_url}/batches?format={case.file_format}&name=hostile.{case.file_format}",
        content=case.make_content().encode(),
        headers=api_key(hostile_stack),
        timeout=10,
    )
    assert accepted.status_code == 202, accepted.text
    status = wait_for_batch(hostile_stack, accepted.json()["batch_id"])

    assert status["state"] == case.state, status
    assert status["rows_recorded"] == case.good_rows
    assert {(int(r["line"]), r["field"]) for r in status["rejects"]} == case.rejects
    assert len(payments_of_batch(status["batch_id"])) == case.good_rows
    after = ledger_state(hostile_stack)
    assert (after.payments, after.single_queue, after.bulk_queue) == (
        before.payments + case.good_rows,
        before.single_queue,
        before.bulk_queue + case.good_rows,
    )
    rejects = httpx.get(
        f"{hostile_stack.web_url}/batches/{status['batch_id']}/rejects", headers=api_key(hostile_stack)
    )
    assert rejects.status_code == 200
    assert_rejects_file_is_inert(rejects.text, case.rejects)
    assert_no_personal_data(json.dumps(status), hostile_stack.log_text("web")[log_offset:])


@pytest.mark.parametrize("case", BATCH_CASES, ids=[case.name for case in BATCH_CASES])
def test_stkpush_batch_rejects_each_bad_line_by_line_and_field_and_records_the_good_ones(
    hostile_stack: Stack, case: BatchCase, tmp_path: Path
) -> None:
    before = ledger_state(hostile_stack)
    upload = tmp_path / f"hostile.{case.file_format}"
    upload.write_text(case.make_content(), encoding="utf-8")
    for as_json_flag in ((), ("--json",)):
        # Twice: the human report and the JSON one; the second run records nothing again.
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "batch", str(upload), *as_json_flag],
            env=hostile_stack.child_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == (2 if case.state == "FAILED" else 1), done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert_no_personal_data(done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["state"] == case.state
    after = ledger_state(hostile_stack)
    assert (after.payments, after.single_queue, after.bulk_queue) == (
        before.payments + case.good_rows,
        before.single_queue,
        before.bulk_queue + case.good_rows,
    )
    assert_rejects_file_is_inert(
        (tmp_path / f"hostile.{case.file_format}.rejects.csv").read_text(encoding="utf-8"), case.rejects
    )
