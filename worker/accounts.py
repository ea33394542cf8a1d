"""UpesiPay accounts as data: several merchants, each with its own account, channels, limits and token, in one
deployment (docs/operations.md, "Adding a merchant").

The environment's account (UPESIPAY_ACCOUNT, UPESIPAY_AUTH_TOKEN, UPESIPAY_CHANNEL_ID and the guard settings) is
the default account and is never stored: a deployment with no `account` rows runs exactly as before. Every other
account is an `account` row (worker.ledger.Account) whose token is encrypted under ACCOUNT_TOKEN_KEY
(worker.secrets_box); it is decrypted only into an `AccountConfig`, whose token is a SecretStr.

Its own limits may be lower than the provider's, never higher (PROVIDER_LIMITS): UpesiPay counts each account's
failures on its own, so one account's limits say nothing about another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import col, select

from worker.guard import GuardLimits
from worker.ledger import Account, session_scope, utcnow
from worker.secrets_box import TokenBox, TokenKeyError
from worker.settings import PROVIDER_LIMITS, Settings

__all__ = [
    "AccountConfig",
    "AccountError",
    "UnknownAccount",
    "account_for_api_key",
    "account_names",
    "account_view",
    "add_account",
    "any_account_key",
    "environment_account",
    "list_accounts",
    "load_account",
    "new_api_key",
    "rotate_key",
    "update_account",
]

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# UpesiPay's channel ids are 32-bit; an account names a few, the first being the default one.
MAX_CHANNELS = 16
CHANNEL_MAX = 2**31 - 1
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")
# The limits an account may set for itself; None keeps the settings' value.
LIMIT_FIELDS = ("phone_streak_limit", "account_failure_limit", "interactive_reserve", "bulk_max_inflight")


class AccountError(ValueError):
    """Bad account input: names the field and its rule, never a token."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class UnknownAccount(AccountError):
    def __init__(self, name: str) -> None:
        super().__init__("account", f"no account named {name[:64]!r}")


@dataclass(frozen=True, slots=True)
class AccountConfig:
    name: str
    channel_ids: tuple[int, ...]
    token: SecretStr
    phone_streak_limit: int | None = None
    account_failure_limit: int | None = None
    interactive_reserve: int | None = None
    bulk_max_inflight: int | None = None
    disabled: bool = False
    from_environment: bool = False  # the settings' account: any channel id a payment names is its own

    @property
    def default_channel(self) -> int:
        return self.channel_ids[0]

    def allows_channel(self, channel_id: int) -> bool:
        return self.from_environment or channel_id in self.channel_ids

    def _limit_overrides(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS if getattr(self, name) is not None}

    def guard_limits(self, settings: Settings) -> GuardLimits:
        limits = GuardLimits.from_settings(settings)
        overrides = self._limit_overrides()
        return dataclasses.replace(limits, **overrides) if overrides else limits

    def with_limits(self, settings: Settings) -> Settings:
        """`settings` with this account's own limits in place of the deployment's (what forecasts read)."""
        overrides = self._limit_overrides()
        return settings.model_copy(update=overrides) if overrides else settings


def environment_account(settings: Settings) -> AccountConfig:
    return AccountConfig(
        name=settings.upesipay_account,
        channel_ids=(settings.upesipay_channel_id,),
        token=settings.upesipay_auth_token,
        from_environment=True,
    )


def _box(settings: Settings) -> TokenBox:
    return TokenBox(settings.account_token_key.get_secret_value())


def _config(row: Account, settings: Settings) -> AccountConfig:
    return AccountConfig(
        name=row.name,
        channel_ids=tuple(int(part) for part in row.channel_ids.split(",") if part),
        token=SecretStr(_box(settings).decrypt(row.token_ciphertext)),
        phone_streak_limit=row.phone_streak_limit,
        account_failure_limit=row.account_failure_limit,
        interactive_reserve=row.interactive_reserve,
        bulk_max_inflight=row.bulk_max_inflight,
        disabled=row.disabled,
    )


def load_account(engine: Engine, settings: Settings, name: str) -> AccountConfig | None:
    """The account named `name` (the environment's without reading the database), None when there is none."""
    if name == settings.upesipay_account:
        return environment_account(settings)
    if not isinstance(name, str) or not ACCOUNT_NAME.fullmatch(name):
        return None
    with session_scope(engine) as session:
        row = session.get(Account, name)
    return None if row is None else _config(row, settings)


def account_names(engine: Engine, settings: Settings, *, enabled_only: bool = True) -> list[str]:
    """The environment's account first, then the stored ones by name."""
    with session_scope(engine) as session:
        query = select(Account.name).order_by(col(Account.name))
        if enabled_only:
            query = query.where(col(Account.disabled).is_(False))
        stored = list(session.exec(query).all())
    return [settings.upesipay_account, *(name for name in stored if name != settings.upesipay_account)]


def account_view(row: Account | AccountConfig) -> dict[str, Any]:
    """What an operator or the admin API may see of an account: everything but the token."""
    if isinstance(row, AccountConfig):
        channels = list(row.channel_ids)
        source = "environment" if row.from_environment else "database"
    else:
        channels = [int(part) for part in row.channel_ids.split(",") if part]
        source = "database"
    view: dict[str, Any] = {"name": row.name, "channel_ids": channels, "source": source}
    view.update({name: getattr(row, name) for name in LIMIT_FIELDS})
    view["disabled"] = row.disabled
    return view


def list_accounts(engine: Engine, settings: Settings) -> list[dict[str, Any]]:
    with session_scope(engine) as session:
        rows = session.exec(select(Account).order_by(col(Account.name))).all()
    return [account_view(environment_account(settings))] + [account_view(row) for row in rows]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(engine: Engine, settings: Settings, name: str) -> str:
    """A fresh API key for stored account `name` (replacing its old one); returned once, only its hash kept."""
    if name == settings.upesipay_account:
        raise AccountError("name", "is the environment's account: its keys are API_KEYS")
    key = f"sk_{name}_" + secrets.token_urlsafe(24)
    with session_scope(engine) as session:
        row = session.get(Account, name) if ACCOUNT_NAME.fullmatch(name or "") else None
        if row is None:
            raise UnknownAccount(name)
        row.api_key_hash = _key_hash(key)
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    return key


def account_for_api_key(engine: Engine, key: str) -> str | None:
    """The enabled stored account whose API key this is, or None. Looked up by the key's hash: the time taken
    says nothing about how close a wrong key is."""
    if not key:
        return None
    with session_scope(engine) as session:
        row = session.exec(
            select(Account.name).where(
                col(Account.api_key_hash) == _key_hash(key), col(Account.disabled).is_(False)
            )
        ).first()
    return row


def any_account_key(engine: Engine) -> bool:
    with session_scope(engine) as session:
        return (
            session.exec(select(Account.name).where(col(Account.api_key_hash).is_not(None)).limit(1)).first()
            is not None
        )


def _check_name(name: object, settings: Settings) -> str:
    if not isinstance(name, str) or not ACCOUNT_NAME.fullmatch(name):
        raise AccountError("name", "must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    if name == settings.upesipay_account:
        raise AccountError(
            "name", "is the environment's account (UPESIPAY_ACCOUNT), configured by the settings"
        )
    return name


def _check_channels(channel_ids: object) -> str:
    if not isinstance(channel_ids, list | tuple) or not channel_ids:
        raise AccountError("channel_ids", "must list at least one channel id")
    if len(channel_ids) > MAX_CHANNELS:
        raise AccountError("channel_ids", f"must list at most {MAX_CHANNELS} channel ids")
    for value in channel_ids:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= CHANNEL_MAX:
            raise AccountError("channel_ids", f"each must be an integer between 1 and {CHANNEL_MAX}")
    if len(set(channel_ids)) != len(channel_ids):
        raise AccountError("channel_ids", "must not repeat a channel id")
    return ",".join(str(value) for value in channel_ids)


def _check_token(token: object) -> str:
    # The rule only: a token is never quoted back.
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise AccountError("token", "must be 1-512 printable ASCII characters without spaces")
    return token


def _check_limits(limits: dict[str, Any], settings: Settings) -> None:
    for name, value in limits.items():
        if name not in LIMIT_FIELDS:
            raise AccountError(name, f"is not an account limit (one of {', '.join(LIMIT_FIELDS)})")
        if value is None:
            continue
        least = 0 if name == "interactive_reserve" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise AccountError(name, f"must be an integer >= {least}")
        if name in PROVIDER_LIMITS and value > PROVIDER_LIMITS[name][0]:
            most, rule = PROVIDER_LIMITS[name]
            raise AccountError(name, f"must be at most {most}: {rule}")
    failure_limit = limits.get("account_failure_limit") or settings.account_failure_limit
    reserve = limits.get("interactive_reserve")
    if reserve is None:
        reserve = settings.interactive_reserve
    if reserve >= failure_limit:
        raise AccountError("interactive_reserve", "must be below the account's account_failure_limit")


def add_account(
    engine: Engine,
    settings: Settings,
    name: Any,
    channel_ids: Any,
    token: Any,
    limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store a new account; AccountError (nothing stored) on bad input or a name already taken. The arguments
    may be any JSON value: each is checked here."""
    limits = dict(limits or {})
    row = Account(
        name=_check_name(name, settings),
        channel_ids=_check_channels(channel_ids),
        token_ciphertext="",
    )
    _check_limits(limits, settings)
    token = _check_token(token)
    try:
        row.token_ciphertext = _box(settings).encrypt(token)
    except TokenKeyError as error:
        raise AccountError("ACCOUNT_TOKEN_KEY", str(error).split(": ", 1)[-1]) from None
    for field, value in limits.items():
        setattr(row, field, value)
    with session_scope(engine) as session:
        if session.get(Account, row.name) is not None:
            raise AccountError("name", "is already taken by another account")
        session.add(row)
        session.commit()
        session.refresh(row)
    return account_view(row)


_UNSET: Any = object()


def update_account(
    engine: Engine,
    settings: Settings,
    name: str,
    *,
    channel_ids: Any = None,
    token: str | None = None,
    limits: dict[str, Any] | None = None,
    disabled: bool | None = None,
) -> dict[str, Any]:
    """Change a stored account (a limit given as None goes back to the settings' value)."""
    if name == settings.upesipay_account:
        raise AccountError("name", "is the environment's account: change its settings instead")
    with session_scope(engine) as session:
        row = session.get(Account, name) if ACCOUNT_NAME.fullmatch(name or "") else None
        if row is None:
            raise UnknownAccount(name)
        if channel_ids is not None:
            row.channel_ids = _check_channels(channel_ids)
        if limits:
            merged = {field: getattr(row, field) for field in LIMIT_FIELDS} | limits
            _check_limits(merged, settings)
            for field, value in limits.items():
                setattr(row, field, value)
        if token is not None:
            try:
                row.token_ciphertext = _box(settings).encrypt(_check_token(token))
            except TokenKeyError as error:
                raise AccountError("ACCOUNT_TOKEN_KEY", str(error).split(": ", 1)[-1]) from None
            row.token_updated_at = utcnow()
        if disabled is not None:
            row.disabled = disabled
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
        session.refresh(row)
    return account_view(row)


def rotate_key(engine: Engine, settings: Settings) -> int:
    """Re-encrypt every stored token under ACCOUNT_TOKEN_KEY's first key; returns how many were rewritten."""
    box = _box(settings)
    with session_scope(engine) as session:
        rows = session.exec(select(Account)).all()
        for row in rows:
            row.token_ciphertext = box.rotate(row.token_ciphertext)
            session.add(row)
        session.commit()
    return len(rows)
