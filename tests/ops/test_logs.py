"""Logs carry no personal data and no secrets, and are JSON lines when not written to a terminal.

Unit cases prove the Redactor on each form a number or secret takes; the last tests scan every line the Procfile's
processes wrote during a full run (one payment per outcome, callbacks, settlement, API and dashboard reads).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.ops.conftest import RUN_NAMES, ProcfileRun
from worker.logs import JsonFormatter, Redactor, log_state_change, setup_logging
from worker.phones import normalise_phone
from worker.signing import callback_signature


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go through setup_logging's handler into a string (restored afterwards)."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging(stream=stream, extra_secrets=["sbx_Secret_Token_123", "very-long-callback-secret"])
    try:
        yield logging.getLogger("stkpush.test"), stream
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


@pytest.mark.parametrize(
    "written",
    [
        "0712345678",
        "0712 345 678",
        "0712-345-678",
        "254712345678",
        "+254712345678",
        "+254 712 345 678",
        "712345678",
        "0112345678",
        "254112345678",
    ],
)
def test_every_common_form_of_a_kenyan_number_is_masked(written: str) -> None:
    text = Redactor().redact(f"sending to {written}, then done")
    digits = re.sub(r"\D", "", written)
    assert digits[-9:] not in re.sub(r"\D", "", text), text
    assert "****" in text and text.endswith(", then done")


@pytest.mark.parametrize(
    ("written", "masked"),
    [
        ("/payments/%2B254712345678", "/payments/2547****678"),
        ("/payments/0712%20345%20678", "/payments/0712****678"),
        ("/payments/%252B254712345678", "/payments/2547****678"),
        ("/payments/x?phone=0712+345+678", "/payments/x?phone=0712****678"),
        ("/payments/%30712345678", "/payments/0712****678"),
    ],
)
def test_numbers_hidden_by_url_encoding_are_masked(written: str, masked: str) -> None:
    # Issue 15, item 6: uvicorn's access log writes the raw, still percent-encoded path.
    line = Redactor().redact(f'127.0.0.1:5000 - "GET {written} HTTP/1.1" 404')
    assert line == f'127.0.0.1:5000 - "GET {masked} HTTP/1.1" 404'


def test_percent_encoded_text_without_a_number_is_left_as_it_was() -> None:
    line = '"GET /payments/INV%2D009?x=a%20b HTTP/1.1" 404'
    assert Redactor().redact(line) == line


def test_ids_amounts_and_times_are_left_alone() -> None:
    redactor = Redactor()
    for text in (
        "payment 0712345678abcdef0712345678abcdef",  # a hex id that happens to hold digits
        "amount 150000 after 1732752000 s",
        "latency=0.712345678s",
        "2026-11-28T02:00:42.144+00:00",
    ):
        assert redactor.redact(text) == text


def test_secrets_credentials_in_urls_and_callback_signatures_are_removed() -> None:
    redactor = Redactor(["sbx_Secret_Token_123"])
    text = redactor.redact(
        "token sbx_Secret_Token_123 url postgresql://stkpush:pg-pass-1@db/stkpush "
        'header Authorization: Basic dXNlcjpwYXNzd29yZA== path "POST /callbacks/upesipay/abc123/'
        + "f" * 64
        + ' HTTP/1.1"'
    )
    assert "sbx_Secret_Token_123" not in text and "pg-pass-1" not in text and "dXNlcjpwYXNzd29yZA" not in text
    assert "f" * 64 not in text
    assert "/callbacks/upesipay/abc123/[signature]" in text


def test_a_log_record_is_one_json_line_with_its_fields_masked(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info(
        "payment %s deferred for %s", "p1", "0712345678", extra={"payment_id": "p1", "state": "DEFERRED"}
    )
    line = stream.getvalue().strip()
    document = json.loads(line)
    assert document["message"] == "payment p1 deferred for 0712****678"
    assert document["payment_id"] == "p1" and document["state"] == "DEFERRED" and document["level"] == "INFO"


def test_tracebacks_are_masked_too(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad phone 254712345678 with very-long-callback-secret")
    except ValueError:
        logger.exception("failed")
    document = json.loads(stream.getvalue().strip())
    assert (
        "254712345678" not in document["exception"]
        and "very-long-callback-secret" not in document["exception"]
    )
    assert "2547****678" in document["exception"]


def test_a_terminal_gets_plain_text() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    handler = setup_logging(stream=Terminal())
    try:
        assert not isinstance(handler.formatter, JsonFormatter)
    finally:
        logging.getLogger().removeHandler(handler)


# ---- a full run ---------------------------------------------------------------------------------------------


def _phone_forms(phone: str) -> set[str]:
    canonical = normalise_phone(phone)
    local = canonical[3:]
    return {canonical, "+" + canonical, "0" + local, local}


def test_a_full_runs_logs_hold_no_number_name_token_or_secret(procfile_run: ProcfileRun) -> None:
    # Given a run that sent, called back, settled, and served the API, metrics and dashboard
    for path in ("/metrics", "/dashboard", "/dashboard/data"):
        assert httpx.get(procfile_run.web_url + path, timeout=10).status_code == 200
    env = procfile_run.env
    # When we read everything the Procfile's processes logged
    text = procfile_run.output_text()
    assert "/callbacks/upesipay/" in text, "the run's logs should include the callbacks it received"
    # Then no number appears in any form, nor a customer's name, a secret, or a callback signature
    forbidden = {
        "UPESIPAY_AUTH_TOKEN": env["UPESIPAY_AUTH_TOKEN"],
        "CALLBACK_SECRET": env["CALLBACK_SECRET"],
        "API_KEYS": env["API_KEYS"],
        "FLOWER_BASIC_AUTH password": procfile_run.flower_password,
    }
    for payment in procfile_run.payments.values():
        for form in _phone_forms(payment["phone"]):
            forbidden[f"phone {form}"] = form
        forbidden[f"signature of {payment['id']}"] = callback_signature(env["CALLBACK_SECRET"], payment["id"])
    for name in RUN_NAMES:
        forbidden[f"name {name}"] = name
    leaks = [label for label, value in forbidden.items() if value in text]
    assert not leaks, leaks
    assert "[signature]" in text and "2547****" in text


def test_a_full_runs_log_lines_are_json(procfile_run: ProcfileRun) -> None:
    records = []
    for line in procfile_run.output_text().splitlines():
        _prefix, _bar, body = line.partition(" | ")
        if body.startswith("{"):
            records.append(json.loads(body))
    loggers = {record["logger"] for record in records}
    assert {"stkpush.sending", "stkpush.web", "uvicorn.access", "celery.app.trace"} <= loggers, loggers
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)


def test_a_state_change_is_one_line_with_id_state_and_masked_reason(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    _logger, stream = captured
    log_state_change("p42", "DEFERRED", "UpesiPay rate limit (phone) for 254712345678")
    document = json.loads(stream.getvalue().strip())
    assert document["message"] == "payment p42 -> DEFERRED: UpesiPay rate limit (phone) for 2547****678"
    assert (document["payment_id"], document["state"]) == ("p42", "DEFERRED")
    assert document["reason"] == "UpesiPay rate limit (phone) for 2547****678"
