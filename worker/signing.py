"""Callback URLs carry an HMAC of the payment id: UpesiPay's callbacks are not signed, so the URL is the secret."""

from __future__ import annotations

import hashlib
import hmac

from worker.settings import Settings


def callback_signature(secret: str, payment_id: str) -> str:
    return hmac.new(secret.encode(), payment_id.encode(), hashlib.sha256).hexdigest()


def signature_matches(secret: str, payment_id: str, signature: str) -> bool:
    # Constant time: a timing difference would let a caller find a valid signature byte by byte.
    return hmac.compare_digest(callback_signature(secret, payment_id), signature)


def callback_url(settings: Settings, payment_id: str) -> str:
    base = str(settings.callback_base_url).rstrip("/")
    signature = callback_signature(settings.callback_secret.get_secret_value(), payment_id)
    return f"{base}/callbacks/upesipay/{payment_id}/{signature}"
