"""Kenyan mobile numbers: one canonical form (2547XXXXXXXX / 2541XXXXXXXX), the form the API documents, masking."""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import PhoneNumberType

RULE = "must be a Kenyan mobile number such as 07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX"
# Digits with the usual separators only: phonenumbers would otherwise read "0712345678x" or vanity letters.
_PHONE_CHARACTERS = re.compile(r"^\+?[0-9][0-9 ().-]*$")


class PhoneNumberError(ValueError):
    """The text is not a Kenyan mobile number. The message never repeats the text."""


def normalise_phone(raw: str) -> str:
    """Return the canonical `2547XXXXXXXX` form, or raise PhoneNumberError."""
    if not isinstance(raw, str):
        raise PhoneNumberError("must be a string")
    text = raw.strip()
    if not text or len(text) > 20 or not _PHONE_CHARACTERS.match(text):
        raise PhoneNumberError(RULE)
    # Bare international digits without '+' ("2547...") parse as national numbers otherwise.
    if text.startswith("254") and text[3:4] in {"1", "7"}:
        text = "+" + text
    try:
        parsed = phonenumbers.parse(text, "KE")
    except phonenumbers.NumberParseException:
        raise PhoneNumberError(RULE) from None
    if (
        parsed.country_code != 254
        or not phonenumbers.is_valid_number(parsed)
        or phonenumbers.number_type(parsed) != PhoneNumberType.MOBILE
    ):
        raise PhoneNumberError(RULE)
    return f"254{parsed.national_number}"


def to_api_form(canonical: str) -> str:
    """The local form UpesiPay's documentation shows (`0787677677`)."""
    return "0" + canonical.removeprefix("254")


def mask_phone(phone: str | None) -> str:
    """`2547****677`: enough for an operator to tell numbers apart, not enough to call one."""
    if not phone:
        return "-"
    digits = "".join(ch for ch in phone if ch.isdigit())
    if len(digits) < 8:
        return "****"
    return f"{digits[:4]}****{digits[-3:]}"
