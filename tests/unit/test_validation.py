"""The one payment schema: every bad field is named with its rule, values are never echoed."""

from __future__ import annotations

from typing import Any

import pytest

from producers.validation import (
    EXPIRES_IN_MAX_S,
    PaymentValidationError,
    expires_in_error,
    validate_payment,
)


def check(**raw: Any) -> Any:
    return validate_payment(raw, amount_min=1, amount_max=150_000)


def fields_of(error: PaymentValidationError) -> dict[str, str]:
    return {e.field: e.rule for e in error.errors}


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("0712345678", "254712345678"),
        ("0112345678", "254112345678"),
        ("254712345678", "254712345678"),
        ("+254712345678", "254712345678"),
        ("+254 712 345 678", "254712345678"),
        ("0712-345-678", "254712345678"),
        (" 0712345678 ", "254712345678"),
    ],
)
def test_kenyan_mobile_numbers_in_every_common_form_are_normalised(given: str, canonical: str) -> None:
    assert check(amount=10, phone_number=given).phone == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "0202345678",
        "071234567",
        "07123456789",
        "+255712345678",
        "254812345678",
        "1" * 30,
        "0712345678x",
    ],
)
def test_anything_but_a_kenyan_mobile_number_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number=bad)
    assert "phone_number" in fields_of(caught.value)
    if bad.strip():
        assert bad not in str(caught.value)


@pytest.mark.parametrize(
    ("amount", "rule_part"),
    [
        (True, "whole number"),
        (False, "whole number"),
        (10.0, "whole number"),
        (10.5, "whole number"),
        ("100", "whole number"),
        (None, "whole number"),
        (0, "between 1 and 150000"),
        (-5, "between 1 and 150000"),
        (150_001, "between 1 and 150000"),
    ],
)
def test_amount_must_be_an_integer_within_bounds(amount: Any, rule_part: str) -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=amount, phone_number="0712345678")
    assert rule_part in fields_of(caught.value)["amount"]


def test_amount_bounds_are_configurable() -> None:
    with pytest.raises(PaymentValidationError):
        validate_payment({"amount": 600, "phone_number": "0712345678"}, amount_min=1, amount_max=500)
    assert (
        validate_payment({"amount": 500, "phone_number": "0712345678"}, amount_min=1, amount_max=500).amount
        == 500
    )


def test_every_bad_field_is_listed_in_one_error() -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount="x", phone_number=12, external_reference="has space", customer_name=5, channel_id=-1)
    assert set(fields_of(caught.value)) == {
        "amount",
        "phone_number",
        "external_reference",
        "customer_name",
        "channel_id",
    }


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(PaymentValidationError) as caught:
        validate_payment({}, amount_min=1, amount_max=10)
    assert fields_of(caught.value) == {"amount": "is required", "phone_number": "is required"}


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number="0712345678", amuont=10)
    assert fields_of(caught.value) == {"amuont": "is not a known field"}


def test_names_are_stripped_of_control_characters_and_bounded() -> None:
    request = check(amount=10, phone_number="0712345678", customer_name=" John\x07   Doe\t")
    assert request.customer_name == "John Doe"
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number="0712345678", external_reference="R" * 65, customer_name="N" * 101)
    assert set(fields_of(caught.value)) == {"external_reference", "customer_name"}


@pytest.mark.parametrize("reference", ["INV\n009", "INV\x00009", "INV-009\n", "INV\u200b009", "INV\x7f9"])
def test_references_with_control_characters_are_refused_not_altered(reference: str) -> None:
    # Issue 15, item 9: dropping the characters made "INV\n009" the reference "INV009", another client's.
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number="0712345678", external_reference=reference)
    assert caught.value.as_dict() == [
        {"field": "external_reference", "rule": "must not contain control characters"}
    ]


@pytest.mark.parametrize("channel_id", [2**31, 2**63, 99999999999999999999])
def test_channel_ids_beyond_the_ledger_column_are_refused(channel_id: int) -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number="0712345678", channel_id=channel_id)
    assert list(fields_of(caught.value)) == ["channel_id"]


@pytest.mark.parametrize("key", ["0712345678", "=HYPERLINK(1)", "John Doe", "+254712345678", "x" * 41])
def test_unknown_fields_not_shaped_like_names_are_not_echoed(key: str) -> None:
    with pytest.raises(PaymentValidationError) as caught:
        check(amount=10, phone_number="0712345678", **{key: 1})
    assert caught.value.as_dict() == [{"field": "(unnamed field)", "rule": "is not a known field"}]
    assert key not in str(caught.value)


def test_reference_may_not_hold_slashes_or_spaces() -> None:
    for bad in ("INV/1", "INV 1", "-INV"):
        with pytest.raises(PaymentValidationError):
            check(amount=10, phone_number="0712345678", external_reference=bad)


def test_empty_optional_fields_mean_absent() -> None:
    request = check(amount=10, phone_number="0712345678", external_reference="  ", customer_name="")
    assert request.external_reference is None and request.customer_name is None


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "600", EXPIRES_IN_MAX_S + 1])
def test_expires_in_must_be_whole_seconds_within_a_week(bad: object) -> None:
    error = expires_in_error(bad)
    assert error is not None and error.field == "expires_in"
    assert "seconds" in error.rule


@pytest.mark.parametrize("good", [None, 1, 600, EXPIRES_IN_MAX_S])
def test_expires_in_accepts_absent_or_whole_seconds(good: int | None) -> None:
    assert expires_in_error(good) is None
