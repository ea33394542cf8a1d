"""What a web app imports to request payments."""

from producers.batch import ingest_batch
from producers.enqueue import PaymentConflictError, PaymentHandle, enqueue_payment
from producers.validation import FieldError, PaymentRequest, PaymentValidationError, validate_payment

__all__ = [
    "FieldError",
    "PaymentConflictError",
    "PaymentHandle",
    "PaymentRequest",
    "PaymentValidationError",
    "enqueue_payment",
    "ingest_batch",
    "validate_payment",
]
