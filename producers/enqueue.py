"""enqueue_payment: validate, record the payment (PENDING), then publish `stk_push(payment_id)` after the commit."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from producers.validation import (
    FieldError,
    PaymentRequest,
    PaymentValidationError,
    expires_in_error,
    validate_payment,
)
from worker import runtime
from worker.accounts import ACCOUNT_NAME, AccountConfig, UnknownAccount
from worker.dispatch import publish_payment
from worker.ledger import (
    Payment,
    PaymentState,
    find_by_reference,
    new_external_reference,
    session_scope,
    utcnow,
)
from worker.migrations import migration_problem
from worker.phones import mask_phone

log = logging.getLogger("stkpush.producers")


def resolve_account(account: Any) -> AccountConfig:
    """The account a producer names (None: the environment's), or PaymentValidationError naming `account`."""
    if account is not None and (not isinstance(account, str) or not ACCOUNT_NAME.fullmatch(account)):
        raise PaymentValidationError(
            [FieldError("account", "must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")]
        )
    try:
        config = runtime.account(account)
    except UnknownAccount:
        raise PaymentValidationError([FieldError("account", "is not a configured account")]) from None
    if config.disabled:
        raise PaymentValidationError([FieldError("account", "is disabled: nothing is sent for it")])
    return config


class PaymentConflictError(ValueError):
    """The external_reference is already used by a payment with other details."""

    def __init__(self, external_reference: str, fields: list[str]) -> None:
        self.external_reference = external_reference
        self.fields = fields
        super().__init__(
            f"external_reference {external_reference!r} is already used by a payment with a different "
            + ", ".join(fields)
        )


@dataclass(frozen=True)
class PaymentHandle:
    id: str
    external_reference: str
    state: PaymentState
    queued: bool  # a stk_push message is on the broker (False: recorded, the dispatcher will queue it later)
    created: bool  # False when an identical earlier request was found
    note: str = ""


def differing_fields(existing: Payment, request: PaymentRequest, channel_id: int) -> list[str]:
    differences = []
    if existing.amount != request.amount:
        differences.append("amount")
    if existing.phone != request.phone:
        differences.append("phone_number")
    if (existing.customer_name or None) != request.customer_name:
        differences.append("customer_name")
    if existing.channel_id != channel_id:
        differences.append("channel_id")
    return differences


def enqueue_payment(
    amount: Any,
    phone_number: Any,
    external_reference: Any = None,
    customer_name: Any = None,
    channel_id: Any = None,
    *,
    queue: str = "single",
    expires_in: Any = None,
    account: Any = None,
) -> PaymentHandle:
    """Record one payment request and queue its STK push; idempotent per external_reference.

    `expires_in`: seconds the prompt is worth sending for (a customer leaves a checkout); past it, a payment not
    yet sent ends EXPIRED. None: INTERACTIVE_EXPIRES_IN_S for single payments, no deadline for bulk ones. A
    repeated request keeps the first request's deadline.

    `account`: the UpesiPay account it is collected through (worker/accounts.py); None: the environment's. Its
    channel_id, when given, must be one of the account's channels (any, for the environment's account).

    Raises PaymentValidationError (every bad field named) or PaymentConflictError. When Redis can't be reached
    the payment stays recorded as PENDING and the handle says `queued=False`.
    """
    settings = runtime.settings()
    deadline_error = expires_in_error(expires_in)
    try:
        request = validate_payment(
            {
                "amount": amount,
                "phone_number": phone_number,
                "external_reference": external_reference,
                "customer_name": customer_name,
                "channel_id": channel_id,
            },
            amount_min=settings.amount_min,
            amount_max=settings.amount_max,
        )
    except PaymentValidationError as error:
        raise PaymentValidationError(error.errors + ([deadline_error] if deadline_error else [])) from None
    if deadline_error is not None:
        raise PaymentValidationError([deadline_error])
    if expires_in is None and queue == "single":
        expires_in = settings.interactive_expires_in_s
    config = resolve_account(account)
    account = config.name
    channel = request.channel_id or config.default_channel
    if not config.allows_channel(channel):
        raise PaymentValidationError([FieldError("channel_id", "must be one of the account's channel ids")])
    reference = request.external_reference or new_external_reference()
    engine = runtime.engine()
    payment = Payment(
        account=account,
        external_reference=reference,
        phone=request.phone,
        amount=request.amount,
        customer_name=request.customer_name,
        channel_id=channel,
        queue=queue,
        expires_at=utcnow() + timedelta(seconds=expires_in) if expires_in is not None else None,
    )
    try:
        with session_scope(engine) as session:
            session.add(payment)
            session.commit()
    except (OperationalError, ProgrammingError):
        # "no such table: payment" says less than the web app and the workers do; and the driver's message
        # carries the statement's parameters (a phone number).
        problem = migration_problem(engine)
        if problem is not None:
            raise problem from None
        raise
    except IntegrityError:
        existing = find_by_reference(engine, account, reference)
        if existing is None:  # pragma: no cover - the unique constraint is the only integrity rule
            raise
        differences = differing_fields(existing, request, channel)
        if differences:
            raise PaymentConflictError(reference, differences) from None
        queued = existing.queued_at is not None
        if not queued and existing.state == PaymentState.PENDING:
            # The first call recorded it but could not queue it: this call finishes the job. A duplicate
            # message is harmless (the task's claim is conditional).
            queued = publish_payment(existing.id, queue=existing.queue)
        return PaymentHandle(
            existing.id, reference, existing.state, queued, created=False, note="already recorded"
        )
    log.info("payment %s recorded for %s amount %d", payment.id, mask_phone(payment.phone), payment.amount)
    queued = publish_payment(payment.id, queue=queue)
    note = (
        ""
        if queued
        else "recorded but not yet queued: the broker is unreachable; the dispatcher will queue it"
    )
    return PaymentHandle(payment.id, reference, PaymentState.PENDING, queued, created=True, note=note)
