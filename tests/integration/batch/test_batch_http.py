"""The producer HTTP API over the real web server (uvicorn, its own process): keys, validation, uploads."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlmodel import func, select

from tests.integration.batch.conftest import HEADER, payment_count, payments_with_references, queue_length
from tests.support import api_key, wait_for_batch
from worker import runtime
from worker.ledger import Batch, session_scope
from worker.local.stack import Stack


def batch_count() -> int:
    with session_scope(runtime.engine()) as session:
        return int(session.exec(select(func.count()).select_from(Batch)).one())


@pytest.mark.parametrize(
    "headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}], ids=["none", "wrong", "empty"]
)
def test_every_producer_endpoint_refuses_a_missing_or_wrong_key_and_changes_nothing(
    batch_stack: Stack, prefix: str, headers: dict[str, str]
) -> None:
    payments, batches, queued = payment_count(), batch_count(), queue_length(batch_stack, "single")
    base = batch_stack.web_url
    payment = {"amount": 10, "phone_number": "0712345601", "external_reference": f"{prefix}1"}
    upload = (HEADER + f"{prefix}2,0712345602,10,\n").encode()

    answers = [
        httpx.post(f"{base}/payments", json=payment, headers=headers, timeout=5),
        httpx.post(f"{base}/batches?format=csv", content=upload, headers=headers, timeout=5),
        httpx.get(f"{base}/batches/{'0' * 32}", headers=headers, timeout=5),
        httpx.get(f"{base}/batches/{'0' * 32}/rejects", headers=headers, timeout=5),
    ]

    assert [answer.status_code for answer in answers] == [401, 401, 401, 401]
    time.sleep(0.3)  # a wrongly accepted upload would be ingesting by now
    assert (payment_count(), batch_count(), queue_length(batch_stack, "single")) == (
        payments,
        batches,
        queued,
    )
    assert payments_with_references([f"{prefix}1", f"{prefix}2"]) == []


def test_post_payment_records_it_on_the_single_queue_idempotently(batch_stack: Stack, prefix: str) -> None:
    url = f"{batch_stack.web_url}/payments"
    body = {
        "amount": 120,
        "phone_number": "0712345601",
        "external_reference": f"{prefix}1",
        "customer_name": "Amina",
    }
    queued = queue_length(batch_stack, "single")

    first = httpx.post(url, json=body, headers=api_key(batch_stack), timeout=10)

    assert first.status_code == 201
    view = first.json()
    assert (view["state"], view["queue"], view["queued"], view["created"]) == (
        "PENDING",
        "single",
        True,
        True,
    )
    assert view["phone"] == "2547****601" and "0712345601" not in first.text
    assert queue_length(batch_stack, "single") == queued + 1
    again = httpx.post(url, json=body, headers=api_key(batch_stack), timeout=10)
    assert (again.status_code, again.json()["id"], again.json()["created"]) == (200, view["id"], False)
    conflict = httpx.post(url, json={**body, "amount": 121}, headers=api_key(batch_stack), timeout=10)
    assert conflict.status_code == 409 and conflict.json()["fields"] == ["amount"]
    assert [p.amount for p in payments_with_references([f"{prefix}1"])] == [120]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"amount": 0, "phone_number": "0202123456", "amuont": 5}, {"amount", "phone_number", "amuont"}),
        (
            {"amount": "100", "phone_number": "0712345601", "customer_name": "x" * 101},
            {"amount", "customer_name"},
        ),
        (
            {"phone_number": 712345601, "external_reference": "bad ref/1"},
            {"amount", "phone_number", "external_reference"},
        ),
        ({"amount": 10.5, "phone_number": "0712345601", "channel_id": 0}, {"amount", "channel_id"}),
        ({"amount": 0, "phone_number": "0712345601", "expires_in": 0}, {"amount", "expires_in"}),
        ({"amount": 10, "phone_number": "0712345601", "expires_in": "600"}, {"expires_in"}),
        ([1, 2], {"body"}),
        (b"{not json", {"body"}),
    ],
    ids=[
        "range-landline-unknown",
        "string-amount-long-name",
        "missing-amount",
        "float-channel",
        "zero-deadline",
        "text-deadline",
        "list",
        "not-json",
    ],
)
def test_post_payment_names_every_bad_field_with_422_and_records_nothing(
    batch_stack: Stack, body: Any, fields: set[str]
) -> None:
    before = payment_count()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()

    answer = httpx.post(
        f"{batch_stack.web_url}/payments",
        content=content,
        headers={**api_key(batch_stack), "content-type": "application/json"},
        timeout=10,
    )

    assert answer.status_code == 422
    assert {error["field"] for error in answer.json()["errors"]} == fields
    assert all(error["rule"] for error in answer.json()["errors"])
    assert "0202123456" not in answer.text
    assert payment_count() == before


def test_post_payment_takes_a_deadline_and_defaults_to_the_interactive_one(batch_stack: Stack) -> None:
    def post(body: dict[str, Any]) -> dict[str, Any]:
        answer = httpx.post(
            f"{batch_stack.web_url}/payments", json=body, headers=api_key(batch_stack), timeout=10
        )
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    given = post({"amount": 10, "phone_number": "0712345602", "expires_in": 120})
    default = post({"amount": 10, "phone_number": "0712345603"})
    deadlines = [
        datetime.fromisoformat(view["expires_at"]) - datetime.fromisoformat(view["created_at"])
        for view in (given, default)
    ]
    assert abs(deadlines[0].total_seconds() - 120) < 5
    assert abs(deadlines[1].total_seconds() - runtime.settings().interactive_expires_in_s) < 5


def test_post_batch_answers_with_the_batch_id_at_once_and_ingests_in_the_background(
    batch_stack: Stack, prefix: str
) -> None:
    rows = "".join(f"{prefix}{n},0713{n:06d},{n % 900 + 1},\n" for n in range(1, 4001))
    upload = (HEADER + rows + f"{prefix}bad,0712345601,1.5,\n").encode()
    queued = queue_length(batch_stack)

    started = time.monotonic()
    answer = httpx.post(
        f"{batch_stack.web_url}/batches?name=march.csv",
        content=upload,
        headers={**api_key(batch_stack), "content-type": "text/csv"},
        timeout=30,
    )
    answered_after = time.monotonic() - started

    assert answer.status_code == 202
    batch_id = answer.json()["batch_id"]
    assert answer.headers["location"] == f"/batches/{batch_id}" == answer.json()["status_url"]
    early = httpx.get(
        f"{batch_stack.web_url}/batches/{batch_id}", headers=api_key(batch_stack), timeout=5
    ).json()
    status = wait_for_batch(batch_stack, batch_id)
    ingested_after = time.monotonic() - started
    assert early["state"] == "INGESTING" and early["rows_recorded"] < 4000
    assert answered_after < ingested_after / 2
    assert (status["state"], status["source_name"], status["rows_recorded"], status["rows_rejected"]) == (
        "INGESTED",
        "march.csv",
        4000,
        1,
    )
    assert status["payments_by_state"]["PENDING"] == 4000 and status["recorded_not_yet_queued"] == 0
    assert status["amount_requested"] == sum(n % 900 + 1 for n in range(1, 4001))
    assert status["rejects"] == [{"line": 4002, "field": "amount", "rule": status["rejects"][0]["rule"]}]
    assert queue_length(batch_stack) == queued + 4000
    rejects = httpx.get(
        f"{batch_stack.web_url}{status['rejects_url']}", headers=api_key(batch_stack), timeout=5
    )
    assert rejects.status_code == 200 and rejects.text.splitlines()[0] == "line,field,rule"
    assert rejects.text.splitlines()[1].startswith("4002,amount,")


def test_post_batch_takes_json_lines_by_content_type_and_all_or_nothing(
    batch_stack: Stack, prefix: str
) -> None:
    lines = [
        json.dumps({"external_reference": f"{prefix}1", "phone_number": "0712345601", "amount": 10}),
        json.dumps({"external_reference": f"{prefix}2", "phone_number": "0712345602", "amount": "10"}),
    ]
    answer = httpx.post(
        f"{batch_stack.web_url}/batches?all_or_nothing=true",
        content="\n".join(lines).encode(),
        headers={**api_key(batch_stack), "content-type": "application/x-ndjson"},
        timeout=10,
    )
    assert answer.status_code == 202
    status = wait_for_batch(batch_stack, answer.json()["batch_id"])
    assert (status["state"], status["all_or_nothing"], status["rows_recorded"]) == ("ABORTED", True, 0)
    assert [(r["line"], r["field"]) for r in status["rejects"]] == [(2, "amount")]
    assert payments_with_references([f"{prefix}1", f"{prefix}2"]) == []


def test_post_batch_refuses_an_unknown_format_and_an_empty_body(batch_stack: Stack) -> None:
    batches = batch_count()
    unknown = httpx.post(
        f"{batch_stack.web_url}/batches",
        content=b"a,b\n",
        headers={**api_key(batch_stack), "content-type": "application/octet-stream"},
        timeout=5,
    )
    empty = httpx.post(
        f"{batch_stack.web_url}/batches?format=csv", content=b"", headers=api_key(batch_stack), timeout=5
    )
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "format"
    assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "body"
    assert batch_count() == batches
    missing = httpx.get(f"{batch_stack.web_url}/batches/{'0' * 32}", headers=api_key(batch_stack), timeout=5)
    assert missing.status_code == 404


def test_openapi_documents_the_producer_endpoints(batch_stack: Stack) -> None:
    spec = httpx.get(f"{batch_stack.web_url}/openapi.json", timeout=5).json()
    paths = spec["paths"]
    assert {"post"} <= set(paths["/payments"]) and {"post"} <= set(paths["/batches"])
    assert "get" in paths["/batches/{batch_id}"]
    assert {"201", "401", "409", "422"} <= set(paths["/payments"]["post"]["responses"])
    assert (
        "amount"
        in paths["/payments"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert {"text/csv", "application/x-ndjson"} <= set(paths["/batches"]["post"]["requestBody"]["content"])
    assert {"202", "401", "422"} <= set(paths["/batches"]["post"]["responses"])
