"""The one payment-request schema. Every entry point (Python, CLI, HTTP, batch files) validates through here."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.phones import PhoneNumberError, normalise_phone

REFERENCE_MAX = 64
NAME_MAX = 100
# References travel in URLs (GET /payments/{reference}) and in UpesiPay's records: no spaces, no slashes.
REFERENCE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:#-]*$")
# The ledger's integer columns are 32-bit on PostgreSQL; a larger channel id can only be a mistake (and would
# fail the insert, not the validation).
CHANNEL_ID_MAX = 2**31 - 1
# A field name is echoed in an error only when it looks like one: a JSON key or CSV header cell may as well be
# a phone number, a name or a spreadsheet formula from a file written the wrong way round.
FIELD_NAME_SHAPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
UNNAMED_FIELD = "(unnamed field)"


@dataclass(frozen=True)
class FieldError:
    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


class PaymentValidationError(ValueError):
    """Every bad field of one request, each with the rule it broke. Never echoes the values."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("invalid payment request: " + "; ".join(str(error) for error in errors))

    def as_dict(self) -> list[dict[str, str]]:
        return [{"field": error.field, "rule": error.rule} for error in self.errors]


@dataclass(frozen=True)
class PaymentRequest:
    amount: int
    phone: str  # canonical 2547XXXXXXXX
    external_reference: str | None
    customer_name: str | None
    channel_id: int | None


def strip_control(text: str) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")


def has_control(text: str) -> bool:
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def field_label(name: object) -> str:
    """How an error names a field the schema does not know: its name if it is shaped like one, else a stand-in."""
    text = str(name)
    return text if FIELD_NAME_SHAPE.fullmatch(text) else UNNAMED_FIELD


def _amount(value: Any, minimum: int, maximum: int, errors: list[FieldError]) -> int:
    # bool is an int subclass and True would be a payment of 1: refuse it, and floats and numeric strings too,
    # so a caller's type confusion never becomes a money request.
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(
            FieldError("amount", "must be a whole number of shillings (an integer, not text or a float)")
        )
        return 0
    if not minimum <= value <= maximum:
        errors.append(FieldError("amount", f"must be between {minimum} and {maximum} shillings"))
    return value


def _phone(value: Any, errors: list[FieldError]) -> str:
    if not isinstance(value, str):
        errors.append(FieldError("phone_number", "must be a string"))
        return ""
    try:
        return normalise_phone(value)
    except PhoneNumberError as error:
        errors.append(FieldError("phone_number", str(error)))
        return ""


def _reference(value: Any, errors: list[FieldError]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(FieldError("external_reference", "must be a string"))
        return None
    if has_control(value):
        # Dropping them would turn "INV\n009" into "INV009": two different client references would collide.
        errors.append(FieldError("external_reference", "must not contain control characters"))
        return None
    text = value.strip()
    if not text:
        return None
    if len(text) > REFERENCE_MAX:
        errors.append(FieldError("external_reference", f"must be at most {REFERENCE_MAX} characters"))
    elif not REFERENCE_PATTERN.match(text):
        errors.append(
            FieldError(
                "external_reference", "may contain only letters, digits and . _ : # - (no spaces or /)"
            )
        )
    return text


def _name(value: Any, errors: list[FieldError]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(FieldError("customer_name", "must be a string"))
        return None
    text = " ".join(strip_control(value).split())
    if len(text) > NAME_MAX:
        errors.append(FieldError("customer_name", f"must be at most {NAME_MAX} characters"))
    return text or None


def _channel(value: Any, errors: list[FieldError]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= CHANNEL_ID_MAX:
        errors.append(FieldError("channel_id", f"must be a positive integer at most {CHANNEL_ID_MAX}"))
        return None
    return value


KNOWN_FIELDS = frozenset({"amount", "phone_number", "external_reference", "customer_name", "channel_id"})


def validate_payment(raw: Mapping[str, Any], *, amount_min: int, amount_max: int) -> PaymentRequest:
    """Check one request; raise PaymentValidationError listing every bad field, or return it normalised."""
    errors: list[FieldError] = []
    for unknown in sorted(set(raw) - KNOWN_FIELDS):
        errors.append(FieldError(field_label(unknown), "is not a known field"))
    if "amount" not in raw:
        errors.append(FieldError("amount", "is required"))
        amount = 0
    else:
        amount = _amount(raw["amount"], amount_min, amount_max, errors)
    if "phone_number" not in raw:
        errors.append(FieldError("phone_number", "is required"))
        phone = ""
    else:
        phone = _phone(raw["phone_number"], errors)
    request = PaymentRequest(
        amount=amount,
        phone=phone,
        external_reference=_reference(raw.get("external_reference"), errors),
        customer_name=_name(raw.get("customer_name"), errors),
        channel_id=_channel(raw.get("channel_id"), errors),
    )
    if errors:
        raise PaymentValidationError(errors)
    return request


# A deadline longer than this is no deadline for a customer at a checkout, and keeps the check simple to reason
# about (a week, in seconds).
EXPIRES_IN_MAX_S = 7 * 24 * 3600


def expires_in_error(value: Any) -> FieldError | None:
    """The rule for `expires_in` (seconds a payment is worth prompting for), or None when it is fine or absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return FieldError("expires_in", "must be a whole number of seconds (an integer)")
    if not 1 <= value <= EXPIRES_IN_MAX_S:
        return FieldError("expires_in", f"must be between 1 and {EXPIRES_IN_MAX_S} seconds")
    return None
