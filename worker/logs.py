"""Logging for every stkpush process: one line per event, JSON when stderr is not a terminal, nothing personal.

`setup_logging(settings)` installs one handler on the root logger. Its `Redactor` filter runs on every record
that reaches the handler, from any library: Kenyan phone numbers in any common form become `2547****677`, the
configured secrets (UpesiPay token, callback secret, API keys, passwords inside DATABASE_URL / REDIS_URL) become
`[secret]`, and so do credentials in URLs, Authorization headers and the signature part of callback URLs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from worker.phones import mask_phone

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["JsonFormatter", "Redactor", "log_state_change", "secrets_of", "setup_logging"]

SECRET = "[secret]"  # noqa: S105  (the placeholder that replaces secrets, not one)
# A Kenyan mobile number as people and systems write it: 07XX XXX XXX, 01XX..., 2547..., +254 7..., 7XXXXXXXX,
# with optional spaces or dashes between the groups. Letters or digits right beside it (or a decimal point before
# it) mean it is part of something else (a hex id, a longer number, a fraction), so it is left alone.
_PHONE = re.compile(
    r"(?<![0-9A-Za-z.])(?:\+?254[ -]?|0)?[17][0-9]{2}[ -]?[0-9]{3}[ -]?[0-9]{3}(?![0-9A-Za-z])"
)
# The callback URL's last segment is an HMAC that lets anyone post an outcome for that payment.
# The signature is the last segment of every callback URL shape: /{payment}/{sig}, /attempts/{attempt}/{sig} and
# /accounts/{account}/attempts/{attempt}/{sig}.
_CALLBACK_SIGNATURE = re.compile(
    r"(/callbacks/upesipay/(?:accounts/[0-9A-Za-z_.-]+/)?(?:attempts/)?[0-9A-Za-z_.-]+/)[^/\s\"'?#]+"
)
# A run of URL text holding percent escapes (an access log's raw path): `%2B254733445566`, `0733%20445%20567`.
_PERCENT_ENCODED = re.compile(r"[^\s\"'<>]*%[0-9A-Fa-f]{2}[^\s\"'<>]*")
# Enough to undo double encoding (`%252B`), not so many that a crafted line costs much.
_DECODE_ROUNDS = 3
_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
_AUTH_HEADER = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9+/._~=-]{8,}")
# Fields a record may carry (logger.info(..., extra={...})) that the JSON line keeps as its own keys.
_EXTRA_FIELDS = (
    "payment_id",
    "state",
    "from_state",
    "reason",
    "batch_id",
    "task_id",
    "result_code",
    "outcome",
)
# Secrets shorter than this are not searched for: replacing every "abc" in every line would hide real text, and
# the settings demand far longer ones (CALLBACK_SECRET >= 16 characters).
_MIN_SECRET_LEN = 6


def _url_password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


# `0733+445+567`: a query string's spaces.
_PLUS_SEPARATED = re.compile(
    r"(?<![0-9A-Za-z.])(?:\+?254\+?|0)?[17][0-9]{2}\+[0-9]{3}\+[0-9]{3}(?![0-9A-Za-z])"
)


def _decoded_if_phone(run: str) -> str:
    """The run decoded with its phone numbers masked when decoding reveals one; otherwise the run as it was."""
    decoded = run
    for _ in range(_DECODE_ROUNDS):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    masked = _PHONE.sub(lambda m: mask_phone(m.group(0)), decoded)
    if masked == decoded:
        masked = _PLUS_SEPARATED.sub(lambda m: mask_phone(m.group(0)), decoded)
    return masked if masked != decoded else run


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold, for the Redactor to take out of log lines."""
    values = [
        settings.upesipay_auth_token.get_secret_value(),
        settings.callback_secret.get_secret_value(),
        *settings.api_key_list(),
    ]
    for url in (settings.database_url, settings.redis_url):
        password = _url_password(url)
        if password:
            values.append(password)
    return values


class Redactor(logging.Filter):
    """Rewrites each record's message (and any traceback) with phone numbers masked and secrets removed."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, SECRET)
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + SECRET + "@", text)
        text = _AUTH_HEADER.sub(lambda m: m.group(1) + " " + SECRET, text)
        text = _CALLBACK_SIGNATURE.sub(lambda m: m.group(1) + "[signature]", text)
        if "%" in text or "+" in text:
            text = _PERCENT_ENCODED.sub(lambda m: _decoded_if_phone(m.group(0)), text)
            text = _PLUS_SEPARATED.sub(lambda m: mask_phone(m.group(0)), text)
        return _PHONE.sub(lambda m: mask_phone(m.group(0)), text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the event, nor leak its raw arguments
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.redact(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, process, and known extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName if record.processName != "MainProcess" else record.process,
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = record.stack_info
        return json.dumps(document, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Loggers whose own handlers would bypass ours (uvicorn installs them); their records go to the root instead.
_ADOPTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "alembic")


def setup_logging(
    settings: Settings | None = None,
    *,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    json_lines: bool | None = None,
    extra_secrets: Iterable[str] = (),
) -> logging.Handler:
    """Route every log record through one redacting handler on the root logger; returns that handler.

    JSON lines unless `stream` (stderr by default) is a terminal. Calling it again replaces the handler.
    """
    target = stream if stream is not None else sys.stderr
    if json_lines is None:
        json_lines = not (hasattr(target, "isatty") and target.isatty())
    handler = logging.StreamHandler(target)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Redactor([*(secrets_of(settings) if settings else ()), *extra_secrets]))
    handler.set_name("stkpush")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "stkpush"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in _ADOPTED_LOGGERS:
        adopted = logging.getLogger(name)
        adopted.handlers.clear()
        adopted.propagate = True
    # Alembic says "Context impl SQLiteImpl." each time a process checks its schema; worker.migrations logs the
    # revisions it moved the database between instead.
    for name in ("alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


_STATE_LOG = logging.getLogger("stkpush.ledger")


def log_state_change(payment_id: str, state: str, reason: str | None = None) -> None:
    """The one line a payment's state change deserves: its id, the new state and why (JSON fields of their own).

    Meant to be called where a transition's conditional UPDATE reports that it moved the row.
    """
    _STATE_LOG.info(
        "payment %s -> %s%s",
        payment_id,
        state,
        f": {reason}" if reason else "",
        extra={"payment_id": payment_id, "state": state, "reason": reason},
    )
