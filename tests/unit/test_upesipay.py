"""The UpesiPay client through httpx's transport seam (the real client stack, no network) and a real socket.

Each classification is what the "What an answer proves" table (docs/ARCHITECTURE.md) needs to decide a payment.
"""

from __future__ import annotations

import email.utils
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from worker.settings import load_settings
from worker.upesipay import (
    PushOutcome,
    PushRequest,
    PushResult,
    RestrictionScope,
    TransactionStatus,
    UpesiPayClient,
)

BASE = "https://upesipay.test"
TOKEN = "tok-9f8e7d6c5b4a"
PHONE = "254787677677"
LOCAL_PHONE = "0787677677"
ACCEPTED_BODY = {
    "success": True,
    "status": "QUEUED",
    "reference": "E8UWT7CLUW",
    "CheckoutRequestID": "ws_CO_0201",
}

Handler = Callable[[httpx.Request], httpx.Response]


def push_request(**overrides: Any) -> PushRequest:
    fields: dict[str, Any] = {
        "amount": 100,
        "phone": PHONE,
        "channel_id": 2133,
        "external_reference": "INV-009",
        "customer_name": "John Doe",
        "callback_url": "https://merchant.test/callbacks/upesipay/p1/sig",
    }
    return PushRequest(**(fields | overrides))


def client_for(handler: Handler, base_url: str = BASE) -> UpesiPayClient:
    return UpesiPayClient(base_url, TOKEN, transport=httpx.MockTransport(handler))


def answering(
    status: int, body: Any = None, *, text: str | None = None, headers: dict[str, str] | None = None
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def push(status: int, body: Any = None, **kwargs: Any) -> PushResult:
    with client_for(answering(status, body, **kwargs)) as client:
        return client.initiate_push(push_request())


def raising(error: type[Exception]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated")

    return handler


# --- the request itself -------------------------------------------------------------------------------------


def test_push_sends_the_documented_request_with_the_basic_token_and_local_phone() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=ACCEPTED_BODY)

    with UpesiPayClient(
        BASE + "/", TOKEN, connect_timeout_s=2.5, read_timeout_s=20, transport=httpx.MockTransport(handler)
    ) as client:
        client.initiate_push(push_request(customer_name=None))

    [sent] = seen
    assert sent.method == "POST"
    assert str(sent.url) == "https://upesipay.test/api/v2/payments"
    assert sent.headers["Authorization"] == f"Basic {TOKEN}"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["User-Agent"].startswith("stkpush/")
    assert sent.extensions["timeout"] == {"connect": 2.5, "read": 20, "write": 20, "pool": 2.5}
    assert json.loads(sent.content) == {
        "amount": 100,
        "phone_number": LOCAL_PHONE,
        "channel_id": 2133,
        "provider": "m-pesa",
        "external_reference": "INV-009",
        "callback_url": "https://merchant.test/callbacks/upesipay/p1/sig",
    }  # customer_name and credential_id were None: not sent at all


def test_credential_id_is_sent_when_given() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json=ACCEPTED_BODY)

    with client_for(handler) as client:
        client.initiate_push(push_request(credential_id="cred-1", phone="254112345678"))
    assert bodies[0]["credential_id"] == "cred-1"
    assert bodies[0]["phone_number"] == "0112345678"


@pytest.mark.parametrize("phone", ["0787677677", "+254787677677", "2547876776", "25478767767x"])
def test_push_request_refuses_a_non_canonical_phone_without_repeating_it(phone: str) -> None:
    with pytest.raises(ValueError) as raised:
        push_request(phone=phone)
    assert phone not in str(raised.value)


@pytest.mark.parametrize("amount", [0, -5, True, 10.5])
def test_push_request_refuses_an_amount_that_is_not_positive_whole_shillings(amount: Any) -> None:
    with pytest.raises(ValueError):
        push_request(amount=amount)


def test_push_request_repr_masks_the_phone_and_hides_name_and_callback() -> None:
    text = repr(push_request())
    assert PHONE not in text and "2547****677" in text
    assert "John Doe" not in text and "sig" not in text


@pytest.mark.parametrize("token", ["", "has space", "new\nline", "tök"])
def test_client_refuses_an_unusable_token_without_repeating_it(token: str) -> None:
    with pytest.raises(ValueError) as raised:
        UpesiPayClient(BASE, token)
    assert not token or token not in str(raised.value)


def test_from_settings_reads_url_token_and_timeouts() -> None:
    settings = load_settings(
        upesipay_base_url="https://upesipay.test",
        upesipay_auth_token=TOKEN,
        upesipay_channel_id=2133,
        upesipay_read_timeout_s=12,
        callback_base_url="https://merchant.test",
        callback_secret="s" * 32,
    )
    with UpesiPayClient.from_settings(settings) as client:
        assert repr(client) == "UpesiPayClient(base_url='https://upesipay.test')"
        assert client._http.timeout.read == 12
        assert client._http.timeout.connect == settings.upesipay_connect_timeout_s


def test_a_closed_client_sends_nothing() -> None:
    with client_for(answering(201, ACCEPTED_BODY)) as client:
        pass
    with pytest.raises(RuntimeError):
        client.initiate_push(push_request())


# --- classification of answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_success_with_a_reference_is_accepted(status: int) -> None:
    result = push(status, ACCEPTED_BODY)
    assert result.outcome == PushOutcome.ACCEPTED
    assert (result.status_code, result.reference, result.checkout_request_id) == (
        status,
        "E8UWT7CLUW",
        "ws_CO_0201",
    )
    assert result.scope is None and result.retry_after_s is None
    assert result.latency_s >= 0


@pytest.mark.parametrize(
    ("status", "kwargs"),
    [
        (201, {"text": "<html>oops</html>"}),
        (201, {"body": {"success": True, "status": "QUEUED"}}),
        (201, {"body": {"success": True, "reference": ""}}),
        (200, {"body": {"success": False, "reference": "E8UWT7CLUW"}}),
        (201, {"body": ["E8UWT7CLUW"]}),
        (202, {"text": ""}),
    ],
)
def test_a_2xx_without_a_usable_reference_is_ambiguous(status: int, kwargs: dict[str, Any]) -> None:
    result = push(status, **kwargs)
    assert result.outcome == PushOutcome.AMBIGUOUS
    assert result.reference is None


@pytest.mark.parametrize("status", [400, 422])
def test_a_plain_400_or_422_is_rejected_with_the_providers_message(status: int) -> None:
    result = push(status, {"error_message": "Invalid request"})
    assert result.outcome == PushOutcome.REJECTED
    assert result.status_code == status
    assert "Invalid request" in result.detail
    assert result.raw == '{"error_message":"Invalid request"}'


@pytest.mark.parametrize(
    ("status", "message", "scope", "wait"),
    [
        (400, "This phone number is blocked for 24 hours", RestrictionScope.PHONE, 24 * 3600.0),
        (403, "STK abuse protection: 0787677677 blocked", RestrictionScope.PHONE, None),
        (403, "Account restricted from STK push for 4 hours", RestrictionScope.ACCOUNT, 4 * 3600.0),
        (401, "Too many failed requests", RestrictionScope.UNKNOWN, None),
        (422, "Your account has been restricted due to abuse", RestrictionScope.ACCOUNT, None),
    ],
)
def test_abuse_text_on_a_4xx_means_rate_limited(
    status: int, message: str, scope: RestrictionScope, wait: float | None
) -> None:
    result = push(status, {"message": message})
    assert result.outcome == PushOutcome.RATE_LIMITED
    assert result.scope == scope
    assert result.retry_after_s == wait
    assert "0787677677" not in result.detail


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_without_abuse_text_refuse_the_credentials(status: int) -> None:
    result = push(status, {"message": "Unauthenticated."})
    assert result.outcome == PushOutcome.CREDENTIALS_REFUSED
    assert "UPESIPAY_AUTH_TOKEN" in result.detail


def test_429_with_retry_after_seconds() -> None:
    result = push(429, {"message": "Too many requests"}, headers={"Retry-After": "120"})
    assert result.outcome == PushOutcome.RATE_LIMITED
    assert result.retry_after_s == 120.0
    assert result.scope == RestrictionScope.UNKNOWN


def test_429_with_retry_after_as_an_http_date() -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    result = push(429, {"message": "slow down"}, headers={"Retry-After": when})
    assert result.retry_after_s is not None and 110 <= result.retry_after_s <= 120


def test_429_with_a_retry_after_date_in_the_past_means_now() -> None:
    result = push(429, None, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert result.retry_after_s == 0.0


@pytest.mark.parametrize("header", [None, "soon", "-5", "nan", "inf", ""])
def test_429_with_no_or_garbage_retry_after_gives_none(header: str | None) -> None:
    headers = {"Retry-After": header} if header is not None else None
    result = push(429, {"message": "slow down"}, headers=headers)
    assert result.outcome == PushOutcome.RATE_LIMITED
    assert result.retry_after_s is None


def test_429_reads_until_an_iso_time_in_the_message_when_no_header() -> None:
    until = (datetime.now(UTC) + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = push(429, {"message": f"Account restricted until {until}"})
    assert result.scope == RestrictionScope.ACCOUNT
    assert result.retry_after_s is not None and 4 * 3600 - 10 <= result.retry_after_s <= 4 * 3600


def test_429_header_wins_over_the_message() -> None:
    result = push(429, {"message": "blocked until 2099-01-01T00:00:00Z"}, headers={"Retry-After": "30"})
    assert result.retry_after_s == 30.0


@pytest.mark.parametrize(
    ("message", "scope"),
    [
        ("Phone number blocked for this account", RestrictionScope.PHONE),
        ("Too many requests to this number", RestrictionScope.PHONE),
        ("Merchant account rate limited", RestrictionScope.ACCOUNT),
        ("Slow down", RestrictionScope.UNKNOWN),
    ],
)
def test_429_scope_follows_the_message(message: str, scope: RestrictionScope) -> None:
    assert push(429, {"error_message": message}).scope == scope


@pytest.mark.parametrize("status", [404, 405, 301, 308])
def test_no_payments_endpoint_at_the_base_url_is_not_sent(status: int) -> None:
    result = push(status, text="<html>Not Found</html>")
    assert result.outcome == PushOutcome.NOT_SENT
    assert "UPESIPAY_BASE_URL" in result.detail


@pytest.mark.parametrize("status", [402, 410, 413, 418])
def test_other_4xx_are_rejected(status: int) -> None:
    assert push(status, {"message": "nope"}).outcome == PushOutcome.REJECTED


@pytest.mark.parametrize(
    ("status", "body"),
    [(409, {"message": "Conflict"}), (422, {"errors": {"external_reference": ["has already been taken."]}})],
)
def test_a_duplicate_external_reference_is_ambiguous_not_rejected(status: int, body: dict[str, Any]) -> None:
    # UpesiPay holds an earlier send of this payment: rejecting it could lose a paid invoice.
    assert push(status, body).outcome == PushOutcome.AMBIGUOUS


@pytest.mark.parametrize("status", [500, 502, 503, 504, 303])
def test_5xx_is_ambiguous(status: int) -> None:
    result = push(status, text="upstream error", headers={"Retry-After": "10"})
    assert result.outcome == PushOutcome.AMBIGUOUS
    assert result.status_code == status


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
        httpx.ProxyError,
        httpx.UnsupportedProtocol,
    ],
)
def test_failing_before_anything_left_this_machine_is_not_sent(error: type[Exception]) -> None:
    with client_for(raising(error)) as client:
        result = client.initiate_push(push_request())
    assert result.outcome == PushOutcome.NOT_SENT
    assert result.status_code is None and result.raw is None
    assert error.__name__ in result.detail


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.RemoteProtocolError,
        httpx.ReadError,
        httpx.WriteError,
        httpx.LocalProtocolError,
        httpx.CloseError,
        httpx.DecodingError,
    ],
)
def test_failing_after_connecting_is_ambiguous(error: type[Exception]) -> None:
    with client_for(raising(error)) as client:
        result = client.initiate_push(push_request())
    assert result.outcome == PushOutcome.AMBIGUOUS
    assert error.__name__ in result.detail


@pytest.mark.parametrize("base_url", ["http://[::1/upesi", "ftp://upesipay.test", "upesipay.test"])
def test_an_invalid_base_url_is_not_sent(base_url: str) -> None:
    with UpesiPayClient(base_url, TOKEN) as client:
        result = client.initiate_push(push_request())
    assert result.outcome == PushOutcome.NOT_SENT
    assert "UPESIPAY_BASE_URL" in result.detail


# --- secrets and personal data ------------------------------------------------------------------------------


def test_raw_masks_every_phone_form_and_is_truncated_to_2_kib() -> None:
    body = {
        "error_message": "Invalid request",
        "phone_number": LOCAL_PHONE,
        "echo": f"+{PHONE} / {PHONE} / 0112345678 / +254 787 677 677",
        "CheckoutRequestID": "ws_CO_02012026103543427709099876",
        "padding": "x" * 5000,
    }
    result = push(400, body)
    assert result.raw is not None
    assert len(result.raw.encode()) <= 2048
    for leaked in (LOCAL_PHONE, PHONE, "0112345678", "787 677 677"):
        assert leaked not in result.raw
    assert "0787****677" in result.raw and "2547****677" in result.raw and "0112****678" in result.raw
    assert "ws_CO_02012026103543427709099876" in result.raw  # ids are not phone numbers


def test_the_token_and_phone_never_reach_results_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's included
    echo = {"message": f"blocked: Basic {TOKEN} for {LOCAL_PHONE}", "phone": PHONE}
    handlers: list[Handler] = [
        answering(201, ACCEPTED_BODY),
        answering(400, echo),
        answering(401, echo),
        answering(429, echo, headers={"Retry-After": "5"}),
        answering(500, text=f"trace: Authorization: Basic {TOKEN} phone={PHONE}"),
        answering(201, text=f"{TOKEN} {PHONE}"),
        raising(httpx.ConnectError),
        raising(httpx.ReadTimeout),
    ]
    texts: list[str] = []
    for handler in handlers:
        with client_for(handler) as client:
            result = client.initiate_push(push_request())
            status = client.transaction_status("E8UWT7CLUW")
            texts += [
                result.detail,
                result.raw or "",
                repr(result),
                repr(client),
                repr(status),
                status.detail,
            ]
    texts += [repr(push_request()), caplog.text]
    assert caplog.records, "each call logs a line"
    assert any(record.name == "stkpush.upesipay" for record in caplog.records)
    for text in texts:
        assert TOKEN not in text
        assert PHONE not in text and LOCAL_PHONE not in text


def test_each_push_logs_one_line_with_outcome_status_and_latency(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stkpush.upesipay")
    push(429, {"message": "Too many requests"})
    [line] = [record.getMessage() for record in caplog.records if record.name == "stkpush.upesipay"]
    assert "outcome=rate-limited" in line and "http=429" in line and "latency=" in line


# --- transaction status -------------------------------------------------------------------------------------


def status_body(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "transaction_date": "2026-01-02 10:35:43",
        "provider": "m-pesa",
        "success": status == "SUCCESS",
        "merchant": "Shop",
        "payment_reference": "E8UWT7CLUW",
        "third_party_reference": None,
        "status": status,
        "reference": "E8UWT7CLUW",
        "CheckoutRequestID": "ws_CO_0201",
        "provider_reference": None,
    } | extra


def test_transaction_status_asks_for_the_reference() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=status_body("QUEUED"))

    with client_for(handler) as client:
        result = client.transaction_status("E8UWT7CLUW")
    [sent] = seen
    assert (sent.method, sent.url.path, dict(sent.url.params)) == (
        "GET",
        "/api/v2/transaction-status",
        {"reference": "E8UWT7CLUW"},
    )
    assert sent.headers["Authorization"] == f"Basic {TOKEN}"
    assert result.status == TransactionStatus.QUEUED
    assert (result.reference, result.checkout_request_id, result.receipt) == (
        "E8UWT7CLUW",
        "ws_CO_0201",
        None,
    )


@pytest.mark.parametrize(
    ("body", "status", "receipt"),
    [
        (status_body("SUCCESS", provider_reference="SAE3YULR0Y"), TransactionStatus.SUCCESS, "SAE3YULR0Y"),
        (status_body("SUCCESS", third_party_reference="TPR1"), TransactionStatus.SUCCESS, "TPR1"),
        (status_body("FAILED"), TransactionStatus.FAILED, None),
        (status_body("queued"), TransactionStatus.QUEUED, None),
        ({"data": status_body("SUCCESS", provider_reference="R")}, TransactionStatus.SUCCESS, "R"),
    ],
)
def test_transaction_status_outcomes(
    body: dict[str, Any], status: TransactionStatus, receipt: str | None
) -> None:
    with client_for(answering(200, body)) as client:
        result = client.transaction_status("E8UWT7CLUW")
    assert (result.status, result.receipt) == (status, receipt)
    assert result.raw is not None and result.raw["reference"] == "E8UWT7CLUW"


def test_transaction_status_404_from_the_api_is_not_found() -> None:
    with client_for(answering(404, {"message": "Transaction not found"})) as client:
        result = client.transaction_status("E8UWT7CLUW")
    assert result.status == TransactionStatus.NOT_FOUND


@pytest.mark.parametrize(
    "handler",
    [
        answering(404, text="<!doctype html><title>404</title>"),  # a web server's page, not the API's answer
        answering(500, {"message": "Server Error"}),
        answering(503, text="unavailable"),
        answering(200, text="not json"),
        answering(200, ["E8UWT7CLUW"]),
        answering(200, status_body("REVERSED")),
        answering(200, status_body("SUCCESS", reference="OTHERREF")),
        answering(401, {"message": "Unauthenticated."}),
        raising(httpx.ReadTimeout),
        raising(httpx.ConnectError),
    ],
)
def test_transaction_status_without_a_usable_answer_is_error(handler: Handler) -> None:
    with client_for(handler) as client:
        assert client.transaction_status("E8UWT7CLUW").status == TransactionStatus.ERROR


# --- the transactions list ----------------------------------------------------------------------------------


def transactions(
    count: int, *, with_total: bool = True, fail_page: int | None = None
) -> tuple[Handler, list[int]]:
    """A list endpoint holding `count` transactions, newest first; it ignores the filter, as it may."""
    items = [status_body("FAILED", reference=f"R{n}", external_reference=f"INV-{n}") for n in range(count)]
    pages: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v2/transactions"
        page, per = int(request.url.params["page"]), int(request.url.params["per"])
        pages.append(page)
        if page == fail_page:
            return httpx.Response(502, text="bad gateway")
        body: dict[str, Any] = {"data": items[(page - 1) * per : page * per], "page": page, "per": per}
        return httpx.Response(200, json=body | ({"total": count} if with_total else {}))

    return handler, pages


def test_find_transaction_finds_it_on_page_2() -> None:
    handler, pages = transactions(250)
    with client_for(handler) as client:
        result = client.find_transaction("INV-130", per=100)
    assert result.status == TransactionStatus.FAILED
    assert (result.reference, result.external_reference) == ("R130", "INV-130")
    assert pages == [1, 2]


def test_find_transaction_sends_the_filter_and_paging() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [], "page": 1, "per": 50, "total": 0})

    with client_for(handler) as client:
        client.find_transaction("INV-009", per=50)
    assert dict(seen[0].url.params) == {"page": "1", "per": "50", "external_reference": "INV-009"}


def test_find_transaction_prefers_a_success_among_duplicates() -> None:
    data = [
        status_body("FAILED", reference="A", external_reference="INV-1"),
        status_body("SUCCESS", reference="B", external_reference="INV-1", provider_reference="RCPT"),
    ]
    with client_for(answering(200, {"data": data, "total": 2})) as client:
        result = client.find_transaction("INV-1")
    assert (result.status, result.reference, result.receipt) == (TransactionStatus.SUCCESS, "B", "RCPT")


@pytest.mark.parametrize("with_total", [True, False])
def test_find_transaction_is_not_found_only_after_reading_every_page(with_total: bool) -> None:
    handler, pages = transactions(250, with_total=with_total)
    with client_for(handler) as client:
        result = client.find_transaction("INV-999", per=100)
    assert result.status == TransactionStatus.NOT_FOUND
    assert result.external_reference == "INV-999"
    # With a total the third page ends the list; without one only an empty page does.
    assert pages == ([1, 2, 3] if with_total else [1, 2, 3, 4])


def test_find_transaction_is_error_when_a_page_cannot_be_read() -> None:
    handler, pages = transactions(250, fail_page=2)
    with client_for(handler) as client:
        result = client.find_transaction("INV-999", per=100)
    assert result.status == TransactionStatus.ERROR
    assert pages == [1, 2]


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
def test_find_transaction_is_error_when_the_request_fails(error: type[Exception]) -> None:
    with client_for(raising(error)) as client:
        assert client.find_transaction("INV-1").status == TransactionStatus.ERROR


@pytest.mark.parametrize("body", [{"items": []}, {"data": "none"}, ["x"], None])
def test_find_transaction_is_error_on_a_malformed_page(body: Any) -> None:
    with client_for(answering(200, body)) as client:
        assert client.find_transaction("INV-1").status == TransactionStatus.ERROR


def test_find_transaction_is_error_when_the_list_outlasts_max_pages() -> None:
    handler, pages = transactions(1000)
    with client_for(handler) as client:
        result = client.find_transaction("INV-999999", max_pages=3, per=100)
    assert result.status == TransactionStatus.ERROR
    assert pages == [1, 2, 3]


def test_find_transaction_is_error_when_the_page_parameter_is_ignored() -> None:
    page = {"data": [status_body("FAILED", reference=f"R{n}", external_reference=f"I{n}") for n in range(3)]}
    with client_for(answering(200, page | {"total": 9})) as client:
        result = client.find_transaction("INV-1", per=3)
    assert result.status == TransactionStatus.ERROR
    assert "page 2 repeats" in result.detail  # noticed at once, not after max_pages identical pages


# --- one real socket ----------------------------------------------------------------------------------------


class _ProviderHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        behaviour = self.server.behaviour  # type: ignore[attr-defined]
        if behaviour == "close":
            self.close_connection = True  # the request arrived whole; the answer never comes
            return
        if behaviour == "slow":
            time.sleep(0.5)
        payload = json.dumps(ACCEPTED_BODY).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except BrokenPipeError:  # the slow case: the client has given up waiting
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def provider() -> Iterator[Callable[[str], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(behaviour: str) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProviderHandler)
        server.daemon_threads = True
        server.behaviour = behaviour  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_over_a_real_socket_201_close_timeout_and_refused(
    provider: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def send(base_url: str) -> PushResult:
        with UpesiPayClient(base_url, TOKEN, connect_timeout_s=1.0, read_timeout_s=0.2) as client:
            return client.initiate_push(push_request())

    accepted = send(provider("accept"))
    assert (accepted.outcome, accepted.reference) == (PushOutcome.ACCEPTED, "E8UWT7CLUW")
    closed = send(provider("close"))
    assert closed.outcome == PushOutcome.AMBIGUOUS, closed.detail
    timed_out = send(provider("slow"))
    assert timed_out.outcome == PushOutcome.AMBIGUOUS and "ReadTimeout" in timed_out.detail
    refused = send(f"http://127.0.0.1:{closed_port()}")
    assert refused.outcome == PushOutcome.NOT_SENT and "ConnectError" in refused.detail
