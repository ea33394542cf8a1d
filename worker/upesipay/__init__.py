"""The UpesiPay API client (`client.py`) and what each of UpesiPay's answers means (`answers.py`)."""

from worker.upesipay.answers import (
    ListedPush,
    PushOutcome,
    PushRequest,
    PushResult,
    RestrictionScope,
    StatusResult,
    TransactionStatus,
)
from worker.upesipay.client import UpesiPayClient

__all__ = [
    "ListedPush",
    "PushOutcome",
    "PushRequest",
    "PushResult",
    "RestrictionScope",
    "StatusResult",
    "TransactionStatus",
    "UpesiPayClient",
]
