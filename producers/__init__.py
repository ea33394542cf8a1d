"""What a web app imports to request payments."""

from producers.enqueue import PaymentConflictError, PaymentHandle, enqueue_payment
from producers.validation import FieldError, PaymentRequest, PaymentValidationError, validate_payment

__all__ = [
    "FieldError",
    "PaymentConflictError",
    "PaymentHandle",
    "PaymentRequest",
    "PaymentValidationError",
    "enqueue_payment",
    "validate_payment",
]
