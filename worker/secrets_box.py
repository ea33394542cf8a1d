"""Account tokens encrypted at rest: Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`) under the keys of
ACCOUNT_TOKEN_KEY. Several comma-separated keys make a MultiFernet: the first encrypts, every one decrypts, so a
new key can be put first, `stkpush account rotate-key` re-encrypts every token under it, and the old key is then
dropped (docs/operations.md, "Rotating the encryption key").

Errors never quote a key or a token, only which rule failed.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["TokenBox", "TokenKeyError", "generate_key"]


class TokenKeyError(ValueError):
    """ACCOUNT_TOKEN_KEY is missing or malformed, or a stored token was encrypted under none of its keys."""


def generate_key() -> str:
    """A fresh key for ACCOUNT_TOKEN_KEY (32 random bytes, url-safe base64)."""
    return Fernet.generate_key().decode()


class TokenBox:
    def __init__(self, keys: str) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        if not parts:
            raise TokenKeyError(
                "ACCOUNT_TOKEN_KEY: is required to store account tokens (`stkpush account new-key` makes one)"
            )
        fernets = []
        for position, part in enumerate(parts, start=1):
            try:
                fernets.append(Fernet(part.encode()))
            except (ValueError, TypeError):
                raise TokenKeyError(
                    f"ACCOUNT_TOKEN_KEY: key {position} must be 32 url-safe base64-encoded bytes (a Fernet key)"
                ) from None
        self._box = MultiFernet(fernets)

    def encrypt(self, token: str) -> str:
        return self._box.encrypt(token.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._box.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise TokenKeyError(
                "ACCOUNT_TOKEN_KEY: no key decrypts this account's token (was the key it was stored under dropped?)"
            ) from None

    def rotate(self, ciphertext: str) -> str:
        """The same token encrypted under the first key."""
        try:
            return self._box.rotate(ciphertext.encode()).decode()
        except InvalidToken:
            raise TokenKeyError(
                "ACCOUNT_TOKEN_KEY: no key decrypts this account's token (was the key it was stored under dropped?)"
            ) from None
