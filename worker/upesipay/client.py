"""The UpesiPay API client: one STK push, one status lookup, one scan of the transactions list.

Synchronous (Celery tasks are). Nothing here raises for an HTTP or transport failure: every answer is
classified by what it proves about the payment (docs/ARCHITECTURE.md, "What an answer proves"), above all
whether the request may have reached UpesiPay (AMBIGUOUS: never resend blindly) or provably did not
(NOT_SENT: safe to retry). Only the 201 and one 400 body are documented, so the rest is recognised
defensively by status code plus message text.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from importlib import metadata
from typing import TYPE_CHECKING, Any, Self

import httpx

from worker.phones import mask_phone
from worker.upesipay.answers import (
    _ACCOUNT_SCOPE_RE,
    _BAD_URL_ERRORS,
    _DUPLICATE_RE,
    _NOT_SENT_ERRORS,
    _PHONE_RE,
    _PHONE_SCOPE_RE,
    _PRIORITY,
    _RESTRICTION_RE,
    _STATUSES,
    ListedPush,
    PushOutcome,
    PushRequest,
    PushResult,
    RestrictionScope,
    StatusResult,
    TransactionStatus,
    _failed_push,
    _json,
    _message,
    _no_transaction,
    _retry_after_s,
    _text,
    _transactions_page,
    _wait_from_text,
)

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger("stkpush.upesipay")

PAYMENTS_PATH = "/api/v2/payments"
STATUS_PATH = "/api/v2/transaction-status"
TRANSACTIONS_PATH = "/api/v2/transactions"
RAW_LIMIT_BYTES = 2048  # the response body kept for the operator; the ledger keeps no more
DETAIL_LIMIT = 200  # short enough for a log line and the ledger's `reason`

try:
    USER_AGENT = f"stkpush/{metadata.version('stkpush')}"
except metadata.PackageNotFoundError:  # a checkout that was never installed
    USER_AGENT = "stkpush/dev"


class UpesiPayClient:
    """One pooled httpx client per process; the token travels only in the Authorization header."""

    def __init__(
        self,
        base_url: str,
        auth_token: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 10,
    ) -> None:
        # Checked here with a message that never repeats it: h11 would quote an illegal header value.
        if not re.fullmatch(r"[\x21-\x7e]+", auth_token):
            raise ValueError("auth_token must be non-empty printable ASCII without spaces")
        if connect_timeout_s <= 0 or read_timeout_s <= 0 or max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        self._base_url = base_url.rstrip("/")
        self._token = auth_token
        headers = {
            "Authorization": f"Basic {auth_token}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._http = httpx.Client(
            transport=transport,
            headers=headers,
            # A write that stalls midway may already have delivered the request: bounded like a read.
            timeout=httpx.Timeout(connect_timeout_s, read=read_timeout_s, write=read_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,  # re-POSTing somewhere else could send the payment twice
        )

    @classmethod
    def from_settings(cls, settings: Settings, auth_token: str | None = None) -> UpesiPayClient:
        """The client of the environment's account, or (given its token) of another account."""
        return cls(
            str(settings.upesipay_base_url),
            settings.upesipay_auth_token.get_secret_value() if auth_token is None else auth_token,
            connect_timeout_s=settings.upesipay_connect_timeout_s,
            read_timeout_s=settings.upesipay_read_timeout_s,
        )

    def __repr__(self) -> str:
        return f"UpesiPayClient(base_url={self._base_url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def initiate_push(self, request: PushRequest) -> PushResult:
        started = time.monotonic()
        body = json.dumps(request.api_body()).encode()
        try:
            response = self._http.post(
                self._base_url + PAYMENTS_PATH, content=body, headers={"Content-Type": "application/json"}
            )
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            result = self._push_failure(error, time.monotonic() - started)
        else:
            result = self._classify_push(response, time.monotonic() - started)
        _log("push", result.outcome, result.status_code, started)
        return result

    def transaction_status(self, reference: str) -> StatusResult:
        if not reference:
            raise ValueError("reference must not be empty")
        started, code = time.monotonic(), None
        try:
            response = self._http.get(self._base_url + STATUS_PATH, params={"reference": reference})
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            result = _no_transaction(TransactionStatus.ERROR, f"status not read ({type(error).__name__})")
        else:
            result, code = self._status_answer(response, reference), response.status_code
        _log("transaction-status", result.status, code, started)
        return result

    def find_transaction(
        self, external_reference: str, *, max_pages: int = 5, per: int = 100
    ) -> StatusResult:
        """Scan the transactions list for `external_reference`, matching here too (the API's filter is
        undocumented). NOT_FOUND only when the whole list was read: it licenses sending the payment again."""
        if not external_reference or max_pages < 1 or per < 1:
            raise ValueError("external_reference must not be empty; max_pages and per at least 1")
        started = time.monotonic()
        result, pages = self._scan(external_reference, max_pages, per)
        _log(f"transactions ({pages} pages)", result.status, None, started)
        return result

    def _scan(self, external_reference: str, max_pages: int, per: int) -> tuple[StatusResult, int]:
        seen: set[str] = set()
        for page in range(1, max_pages + 1):
            params: dict[str, str | int] = {
                "page": page,
                "per": per,
                "external_reference": external_reference,
            }
            try:
                response = self._http.get(self._base_url + TRANSACTIONS_PATH, params=params)
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                detail = f"transactions page {page} not read ({type(error).__name__})"
                return _no_transaction(TransactionStatus.ERROR, detail), page
            body = _json(response)
            listed = _transactions_page(body) if response.is_success else None
            if listed is None:
                detail = f"transactions page {page}: unusable answer (HTTP {response.status_code})"
                return _no_transaction(TransactionStatus.ERROR, detail, self._raw(body)), page
            items = listed.items
            keys = {json.dumps(item, sort_keys=True, default=str) for item in items}
            matches = [
                item
                for item in items
                if isinstance(item, dict)
                and external_reference in (item.get("external_reference"), item.get("ExternalReference"))
            ]
            if matches:
                best = min(matches, key=lambda item: _PRIORITY.get(str(item.get("status", "")).upper(), 3))
                return self._status_of(best, None), page
            if items and keys <= seen:  # the page parameter was ignored: what was read proves nothing
                return _no_transaction(TransactionStatus.ERROR, f"transactions page {page} repeats"), page
            seen |= keys
            if not items or listed.last or (listed.total is not None and len(seen) >= listed.total):
                detail = f"no transaction with this external reference among {len(seen)} listed"
                return _no_transaction(
                    TransactionStatus.NOT_FOUND, detail, external_reference=external_reference
                ), page
        detail = f"not in the first {max_pages} pages of transactions, and the list goes on"
        return _no_transaction(TransactionStatus.ERROR, detail), max_pages

    def recent_failed_pushes(
        self, *, max_pages: int = 2, per: int = 100
    ) -> tuple[list[ListedPush], str | None]:
        """Failed pushes among the newest `max_pages` pages of the transactions list, and why the list could not
        be read (None when it could). Bounded: it never reads further, whatever the list holds."""
        if max_pages < 1 or per < 1:
            raise ValueError("max_pages and per must be at least 1")
        started, failed = time.monotonic(), list[ListedPush]()
        for page in range(1, max_pages + 1):
            try:
                response = self._http.get(
                    self._base_url + TRANSACTIONS_PATH, params={"page": page, "per": per}
                )
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                return failed, f"transactions page {page} not read ({type(error).__name__})"
            listed = _transactions_page(_json(response)) if response.is_success else None
            if listed is None:
                return failed, f"transactions page {page}: unusable answer (HTTP {response.status_code})"
            failed.extend(push for push in map(_failed_push, listed.items) if push is not None)
            if not listed.items or listed.last or (listed.total is not None and page * per >= listed.total):
                break
        _log(f"transactions ({page} pages, recent)", "read", None, started)
        return failed, None

    def _status_answer(self, response: httpx.Response, reference: str) -> StatusResult:
        body, code = _json(response), response.status_code
        # A JSON (or empty) 404 is the API's answer; an HTML page is some web server's, proving nothing.
        if code == 404 and not response.text.lstrip().startswith("<"):
            detail = "UpesiPay has no such reference"
            return _no_transaction(TransactionStatus.NOT_FOUND, detail, self._raw(body), reference=reference)
        if not response.is_success or not isinstance(body, dict):
            detail = f"transaction status: unusable answer (HTTP {code})"
            return _no_transaction(TransactionStatus.ERROR, detail, self._raw(body))
        if "status" not in body and isinstance(body.get("data"), dict):
            body = body["data"]
        return self._status_of(body, reference)

    def _status_of(self, item: dict[str, Any], reference: str | None) -> StatusResult:
        raw, got = self._raw(item), _text(item.get("reference"))
        status = _STATUSES.get(str(item.get("status", "")).upper())
        if status is None:
            return _no_transaction(TransactionStatus.ERROR, "unrecognised transaction status", raw)
        if reference is not None and got is not None and got != reference:
            return _no_transaction(TransactionStatus.ERROR, "the answer is for another reference", raw)
        return StatusResult(
            status=status,
            reference=got or reference,
            checkout_request_id=_text(item.get("CheckoutRequestID")),
            external_reference=_text(item.get("external_reference")) or _text(item.get("ExternalReference")),
            receipt=_text(item.get("provider_reference")) or _text(item.get("third_party_reference")),
            detail=f"UpesiPay reports {status.value}",
            raw=raw,
        )

    def _push_failure(self, error: Exception, latency_s: float) -> PushResult:
        name = type(error).__name__
        result = PushResult(PushOutcome.NOT_SENT, None, None, None, None, None, "", None, latency_s)
        if isinstance(error, _BAD_URL_ERRORS):
            return replace(result, detail=f"invalid URL, nothing sent ({name}); check UPESIPAY_BASE_URL")
        if isinstance(error, _NOT_SENT_ERRORS):
            detail = f"could not connect to UpesiPay, nothing sent ({name}: {self._scrub(str(error))})"
            return replace(result, detail=detail[:DETAIL_LIMIT])
        # Anything once connected (timeouts, resets, protocol errors): the request may have arrived whole.
        detail = f"no answer after sending ({name}): UpesiPay may have recorded the request"
        return replace(result, outcome=PushOutcome.AMBIGUOUS, detail=detail)

    def _classify_push(self, response: httpx.Response, latency_s: float) -> PushResult:
        code, body = response.status_code, _json(response)
        message = _message(body, response.text)
        shown = " ".join(self._scrub(message).split())[:120] or response.reason_phrase
        raw = self._scrub(response.text).encode()[:RAW_LIMIT_BYTES].decode(errors="ignore") or None
        result = PushResult(PushOutcome.AMBIGUOUS, code, None, None, None, None, "", raw, latency_s)

        def answer(outcome: PushOutcome, detail: str) -> PushResult:
            return replace(result, outcome=outcome, detail=detail[:DETAIL_LIMIT])

        if response.is_success:
            reference = _text(body.get("reference")) if isinstance(body, dict) else None
            if isinstance(body, dict) and body.get("success") is True and reference:
                checkout = _text(body.get("CheckoutRequestID"))
                return replace(
                    answer(PushOutcome.ACCEPTED, "accepted"),
                    reference=reference,
                    checkout_request_id=checkout,
                )
            return answer(
                PushOutcome.AMBIGUOUS, f"HTTP {code} without a reference: it may have been accepted"
            )
        if code == 429 or (code in (400, 401, 403, 422) and _RESTRICTION_RE.search(message)):
            scope = RestrictionScope.UNKNOWN
            if _PHONE_SCOPE_RE.search(message) or _PHONE_RE.search(message):
                scope = RestrictionScope.PHONE
            elif _ACCOUNT_SCOPE_RE.search(message):
                scope = RestrictionScope.ACCOUNT
            wait = _retry_after_s(response.headers.get("Retry-After"))
            wait = _wait_from_text(message) if wait is None else wait
            return replace(
                answer(PushOutcome.RATE_LIMITED, f"HTTP {code}: {shown}"), retry_after_s=wait, scope=scope
            )
        if code == 409 or (code in (400, 422) and _DUPLICATE_RE.search(message)):
            return answer(
                PushOutcome.AMBIGUOUS, f"HTTP {code}: UpesiPay already holds this reference ({shown})"
            )
        if code in (401, 403):
            return answer(
                PushOutcome.CREDENTIALS_REFUSED,
                f"HTTP {code}: credentials refused; check UPESIPAY_AUTH_TOKEN",
            )
        if code in (301, 302, 307, 308, 404, 405):  # no payments endpoint here (a 303 stays AMBIGUOUS)
            return answer(PushOutcome.NOT_SENT, f"HTTP {code}: no payments endpoint; check UPESIPAY_BASE_URL")
        if response.is_client_error:  # 400 and 422 above all
            return answer(PushOutcome.REJECTED, f"HTTP {code}: {shown}")
        # 5xx and anything else unexpected: the request reached someone who may have recorded it.
        return answer(PushOutcome.AMBIGUOUS, f"HTTP {code}: UpesiPay may have recorded the request")

    def _scrub(self, text: str) -> str:
        return _PHONE_RE.sub(lambda match: mask_phone(match.group()), text.replace(self._token, "[token]"))

    def _raw(self, value: Any) -> dict[str, Any] | None:
        """A JSON object for StatusResult.raw, every string in it scrubbed; None for anything else."""

        def scrub(item: Any) -> Any:
            if isinstance(item, str):
                return self._scrub(item)
            if isinstance(item, list):
                return [scrub(inner) for inner in item]
            return {key: scrub(inner) for key, inner in item.items()} if isinstance(item, dict) else item

        return scrub(value) if isinstance(value, dict) else None


def _log(call: str, outcome: str, code: int | None, started: float) -> None:
    # One line per call; never the phone, the token or the provider's words (they may name the customer).
    log.info("upesipay %s outcome=%s http=%s latency=%.3fs", call, outcome, code, time.monotonic() - started)
