"""Callback URLs carry an HMAC of the attempt id (the payment id in URLs from before send attempts): UpesiPay's
callbacks are not signed, so the URL is the secret."""

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


def attempt_signature(secret: str, attempt_id: str) -> str:
    # A prefix of its own, so a payment's signature can never pass as an attempt's or the other way round.
    return callback_signature(secret, "attempt:" + attempt_id)


def attempt_signature_matches(secret: str, attempt_id: str, signature: str) -> bool:
    return hmac.compare_digest(attempt_signature(secret, attempt_id), signature)


def account_attempt_signature(secret: str, account: str, attempt_id: str) -> str:
    # The account is signed with the attempt: a URL of one account's attempt can't be replayed as another's.
    return callback_signature(secret, f"account:{account}:attempt:{attempt_id}")


def account_attempt_signature_matches(secret: str, account: str, attempt_id: str, signature: str) -> bool:
    return hmac.compare_digest(account_attempt_signature(secret, account, attempt_id), signature)


def attempt_callback_url(settings: Settings, attempt_id: str, account: str | None = None) -> str:
    """The URL UpesiPay calls back for one send attempt: a late callback then settles that attempt only.

    The environment's account keeps the URL shape it always had; another account's URL names the account, and
    the receiver checks that the attempt is that account's."""
    base = str(settings.callback_base_url).rstrip("/")
    secret = settings.callback_secret.get_secret_value()
    if account is None or account == settings.upesipay_account:
        return f"{base}/callbacks/upesipay/attempts/{attempt_id}/{attempt_signature(secret, attempt_id)}"
    signature = account_attempt_signature(secret, account, attempt_id)
    return f"{base}/callbacks/upesipay/accounts/{account}/attempts/{attempt_id}/{signature}"
