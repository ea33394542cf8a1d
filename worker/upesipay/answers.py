"""What UpesiPay's answers mean: the outcome types, and the reading of status codes, headers and message text.

Only the 201 and one 400 body are documented, so the rest is recognised defensively by status code plus message
text (docs/upesipay.md). The client (client.py) classifies every answer with these.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx

from worker.phones import mask_phone, to_api_form

PROVIDER = "m-pesa"  # the only `provider` value documented for STK push

# Kenyan mobile numbers in every documented form (07.., 01.., 2547.., 2541.., +254..), bounded by
# non-digits so that long digit runs (CheckoutRequestIDs, timestamps) are left alone.
_PHONE_RE = re.compile(r"(?<!\d)(?:\+?254[ -]?|0)[17]\d{2}[ -]?\d{3}[ -]?\d{3}(?!\d)")
# No body is documented for the abuse restrictions: these words are how any plausible wording says it.
_RESTRICTION_RE = re.compile(r"\b(?:block(?:ed)?|restrict(?:ed|ions?)?|abuse|too many)\b", re.I)
# The phone rule's wording names the number and often the account too ("... from the account"), so the
# phone is looked for first; a bare "mobile" is not a phone ("mobile money"), nor "number of ...".
_PHONE_SCOPE_RE = re.compile(
    r"\b(?:phone|msisdn|(?:this|the|that|mobile|customer)\s+number)\b|\d\*{3,}\d", re.I
)
_ACCOUNT_SCOPE_RE = re.compile(r"\b(?:account|merchant)\b", re.I)
# A 4xx saying the external reference exists means UpesiPay holds an earlier send of this very payment.
_DUPLICATE_RE = re.compile(r"\b(?:duplicate|already\s+(?:exists?|been\s+taken|used|submitted))\b", re.I)
_UNTIL_RE = re.compile(
    r"until\s+(\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)", re.I
)
_FOR_RE = re.compile(r"\bfor\s+(\d+(?:\.\d+)?)\s*(hours?|hrs?|minutes?|mins?|seconds?|secs?)\b", re.I)
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0}
_MESSAGE_KEYS = ("error_message", "message", "error", "errors", "detail", "description", "reason")
_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
_BAD_URL_ERRORS = (httpx.UnsupportedProtocol, httpx.InvalidURL)


class PushOutcome(StrEnum):
    ACCEPTED = "accepted"  # 201 with a reference: the customer is being prompted
    REJECTED = "rejected"  # UpesiPay refused the request itself; nobody was prompted
    CREDENTIALS_REFUSED = "credentials-refused"
    RATE_LIMITED = "rate-limited"  # 429 or an abuse restriction: see `scope` and `retry_after_s`
    NOT_SENT = "not-sent"  # provably never reached UpesiPay's payments endpoint: safe to send again
    AMBIGUOUS = "ambiguous"  # may have been recorded: settle, never resend blindly


class RestrictionScope(StrEnum):
    ACCOUNT = "account"
    PHONE = "phone"
    UNKNOWN = "unknown"


class TransactionStatus(StrEnum):
    QUEUED = "queued"  # no outcome yet
    SUCCESS = "success"
    FAILED = "failed"
    NOT_FOUND = "not-found"  # UpesiPay answered that it holds no such transaction
    ERROR = "error"  # no usable answer: proves nothing either way


_STATUSES = {
    s.name: s for s in (TransactionStatus.QUEUED, TransactionStatus.SUCCESS, TransactionStatus.FAILED)
}
_PRIORITY = {"SUCCESS": 0, "QUEUED": 1, "FAILED": 2}  # which of several matches settles a payment


@dataclass(frozen=True)
class PushRequest:
    amount: int
    phone: str  # canonical 2547XXXXXXXX; sent in the documented local form
    channel_id: int
    external_reference: str | None
    customer_name: str | None
    callback_url: str | None
    credential_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 1:
            raise ValueError("amount must be a positive whole number of shillings")
        if not isinstance(self.phone, str) or not re.fullmatch(r"254[17]\d{8}", self.phone):
            raise ValueError("phone must be in the canonical form 2547XXXXXXXX (see worker.phones)")
        if isinstance(self.channel_id, bool) or not isinstance(self.channel_id, int) or self.channel_id < 1:
            raise ValueError("channel_id must be a positive integer")

    def __repr__(self) -> str:
        # The phone, the customer's name and the signed callback URL stay out of tracebacks and logs.
        return (
            f"PushRequest(amount={self.amount}, phone={mask_phone(self.phone)!r}, "
            f"channel_id={self.channel_id}, external_reference={self.external_reference!r})"
        )

    def api_body(self) -> dict[str, Any]:
        """The documented JSON body; optional fields left empty are not sent at all."""
        optional = {
            "external_reference": self.external_reference,
            "customer_name": self.customer_name,
            "callback_url": self.callback_url,
            "credential_id": self.credential_id,
        }
        body = {"amount": self.amount, "phone_number": to_api_form(self.phone), "channel_id": self.channel_id}
        return body | {"provider": PROVIDER} | {key: value for key, value in optional.items() if value}


@dataclass(frozen=True)
class PushResult:
    outcome: PushOutcome
    status_code: int | None
    reference: str | None
    checkout_request_id: str | None
    retry_after_s: float | None
    scope: RestrictionScope | None
    detail: str  # short, for people: no secrets, no phone numbers
    raw: str | None  # the response body, phones masked, at most RAW_LIMIT_BYTES
    latency_s: float


@dataclass(frozen=True)
class StatusResult:
    status: TransactionStatus
    reference: str | None
    checkout_request_id: str | None
    external_reference: str | None
    receipt: str | None  # provider_reference, else third_party_reference
    detail: str
    raw: dict[str, Any] | None  # the transaction (or error body) as UpesiPay sent it, phones masked


def _no_transaction(
    status: TransactionStatus,
    detail: str,
    raw: dict[str, Any] | None = None,
    *,
    reference: str | None = None,
    external_reference: str | None = None,
) -> StatusResult:
    return StatusResult(status, reference, None, external_reference, None, detail, raw)


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _message(body: Any, text: str) -> str:
    """The provider's own words: the known message fields of a JSON body, else the whole body."""

    def flatten(value: Any) -> str:
        if isinstance(value, dict):
            value = list(value.values())
        return (
            " ".join(map(flatten, value)) if isinstance(value, list) else "" if value is None else str(value)
        )

    if not isinstance(body, dict):
        return text
    return " ".join(flatten(body[key]) for key in _MESSAGE_KEYS if key in body).strip() or text


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as delta seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        return _seconds_until(email.utils.parsedate_to_datetime(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _wait_from_text(message: str) -> float | None:
    """`until <ISO time>` or `for N hours` in the provider's message."""
    if match := _UNTIL_RE.search(message):
        try:
            return _seconds_until(datetime.fromisoformat(match.group(1)))
        except ValueError:
            pass
    if match := _FOR_RE.search(message):
        return float(match.group(1)) * _UNIT_S[match.group(2)[0].lower()]
    return None


def _seconds_until(when: datetime) -> float:
    # No zone is read as UTC: if UpesiPay meant Nairobi time (UTC+3) that errs late, never early.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)) / timedelta(seconds=1), 0.0)


@dataclass(frozen=True)
class TransactionsPage:
    """One page of the transactions list, in whichever shape it came (the list's answer is undocumented)."""

    items: list[dict[str, Any]]
    total: int | None  # how many the whole list holds, when the answer says
    last: bool | None  # True when the answer says no page follows, None when it does not say


def _transactions_page(body: Any) -> TransactionsPage | None:
    """The sandbox's {"data": [...], "total"} or PayHero's {"transactions": [...], "pagination": {...}}; None for
    anything else (an answer we cannot read proves nothing)."""
    if not isinstance(body, dict):
        return None
    items = body.get("data", body.get("transactions"))
    if not isinstance(items, list):
        return None
    total, last = body.get("total"), None
    pagination = body.get("pagination")
    if isinstance(pagination, dict):
        total = pagination.get("count", total)
        page, pages = pagination.get("page"), pagination.get("num_pages")
        if "next_page" in pagination:
            last = pagination["next_page"] in (None, "", 0)
        elif type(page) is int and type(pages) is int:
            last = page >= pages
    return TransactionsPage(
        items=[item for item in items if isinstance(item, dict)],
        total=total if type(total) is int else None,
        last=last,
    )


def _transaction_time(item: dict[str, Any]) -> datetime | None:
    for key in ("transaction_date", "created_at", "updated_at"):
        value = item.get(key)
        if isinstance(value, str) and value:
            try:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            # No zone is read as UTC: if UpesiPay meant Nairobi time (UTC+3) the failure counts 3 h longer.
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return None


@dataclass(frozen=True)
class ListedPush:
    """A push the transactions list shows as failed: what counting it in the guard's window needs."""

    reference: str
    external_reference: str | None
    failed_at: datetime | None  # None when the list gives no readable time


def _failed_push(item: dict[str, Any]) -> ListedPush | None:
    """The item as a failed push, or None: only an explicit FAILED (or cancelled) status says so."""
    if str(item.get("status", "")).upper() not in {"FAILED", "FAILURE", "CANCELLED"}:
        return None
    reference = _text(item.get("reference")) or _text(item.get("transaction_reference"))
    if reference is None:
        return None
    external = _text(item.get("external_reference")) or _text(item.get("ExternalReference"))
    return ListedPush(reference=reference, external_reference=external, failed_at=_transaction_time(item))
