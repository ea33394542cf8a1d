"""The `Stkpush-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, Stripe's scheme.

Signing the timestamp with the body lets a receiver refuse a replay older than a few minutes; the receiver side
(verification) is the example in docs/webhooks.md, which merchants copy and tests/integration/test_webhooks.py runs.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "Stkpush-Signature"
EVENT_ID_HEADER = "Stkpush-Event-Id"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"
